"""The normative read path: file -> symbols -> dequantized latent, bit for bit, without any network.

``read_latent`` serves pipelines that train on latents; the decoder side starts from ``latent_from_layout``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Iterator
from typing import IO

import numpy as np

from . import container, quantize
from .coders import get_coder
from .container import DamagedFileError, Header, Layout
from .registry import REGISTRY


def read_symbols(layout: Layout, payload: bytes, partial: bool = False) -> np.ndarray:
    """Entropy-decode the payload; ``DamagedFileError`` when it does not decode.

    ``partial``: the payload is the start of a truncated one; what it holds decodes, the rest is 0.
    """
    header = layout.header
    try:
        coder = get_coder(header.coder)
    except ValueError as exc:
        raise DamagedFileError(f"{exc}; upgrade pillow_sdlatent") from None
    try:
        return coder.decode(header.coder_params, payload, header.latent_shape, partial)
    except ValueError as exc:
        raise DamagedFileError(f"damaged SDL payload: {exc}") from None


def file_quantizer(header: Header) -> quantize.Quantizer:
    """The quantizer a file names; ``DamagedFileError`` when its parameters are bad."""
    try:
        return quantize.quantizer_from_params(header.quantizer, header.quantizer_params, header.latent_shape[0])
    except ValueError as exc:
        raise DamagedFileError(f"SDL quantizer: {exc}") from None


def dequantize(layout: Layout, symbols: np.ndarray) -> np.ndarray:
    """The float32 latent the file's symbols stand for (bit for bit, FORMAT.md), finer in its QREG regions."""
    return dataclasses.replace(file_quantizer(layout.header), regions=layout.regions).dequantize(symbols)


def read_payload(fp: IO[bytes], layout: Layout, allow_truncated: bool) -> bytes:
    """The payload bytes; with ``allow_truncated``, what a truncated file holds of them (a prefix the
    coders decode as far as it goes)."""
    try:
        return container.read_payload(fp, layout)
    except container.TruncatedPayloadError as exc:
        if not allow_truncated:
            raise
        return exc.partial


def latent_from_layout(fp: IO[bytes], layout: Layout, allow_truncated: bool = False) -> np.ndarray:
    """The dequantized (C, H, W) float32 latent of an opened file."""
    spec = REGISTRY.get(layout.header.model)
    if spec is not None and layout.header.latent_shape[0] != spec.channels:
        raise DamagedFileError(
            f"SDL header gives a {layout.header.model!r} latent {layout.header.latent_shape[0]} channels, "
            f"not {spec.channels}"
        )
    payload = read_payload(fp, layout, allow_truncated)
    return dequantize(layout, read_symbols(layout, payload, partial=len(payload) < layout.header.payload_length))


def read_latent(source: str | os.PathLike | IO[bytes] | bytes) -> np.ndarray:
    """The dequantized latent of an ``.sdl`` file as (C, H, W) float32, without any decoder.

    For pipelines that train on latents: no torch and no weights are needed. H and W are an
    eighth of the coded size, which is smaller than the image's for a file coded at a lower scale.
    """
    with open_binary(source) as fp:
        return latent_from_layout(fp, read_checked_layout(fp))


def read_checked_layout(fp: IO[bytes]) -> Layout:
    """``container.read_layout`` with Pillow's decompression-bomb rule, for reads that skip ``Image.open``."""
    layout = container.read_layout(fp)
    container.check_pixel_limit(layout.header.width, layout.header.height)
    return layout


@contextlib.contextmanager
def open_binary(source: str | os.PathLike | IO[bytes] | bytes) -> Iterator[IO[bytes]]:
    """A readable binary file for a path, bytes or an open file (which is left open)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fp:
            yield fp
    else:
        yield source
