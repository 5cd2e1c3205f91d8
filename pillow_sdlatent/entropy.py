"""Lossless coders for the quantized latent symbols.

Every coder maps a (C, H, W) int32 array to ``(params, payload)`` bytes and
back. The decoder is told the shape by the container, so it can bound every
allocation by what the header already justified.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import zstandard


class EntropyCoder(Protocol):
    name: str

    def encode(self, symbols: np.ndarray) -> tuple[bytes, bytes]:
        """(C, H, W) int32 symbols -> (params, payload)."""

    def decode(self, params: bytes, payload: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """Inverse of :meth:`encode`; ``ValueError`` on a damaged payload."""


class ZstdCoder:
    """Symbols as int8 (or int16 when they do not fit) planes, zstandard level 19."""

    name = "zstd"

    def __init__(self, level: int = 19) -> None:
        self.level = level

    def encode(self, symbols: np.ndarray) -> tuple[bytes, bytes]:
        width = 1 if symbols.size == 0 or (symbols.min() >= -128 and symbols.max() <= 127) else 2
        dtype = np.dtype("i1") if width == 1 else np.dtype("<i2")
        if width == 2 and (symbols.min() < -32768 or symbols.max() > 32767):
            raise ValueError("latent symbols exceed 16 bits; use a coarser quality")
        raw = np.ascontiguousarray(symbols, dtype=dtype).tobytes()
        return bytes([width]), zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decode(self, params: bytes, payload: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        if params not in (b"\x01", b"\x02"):
            raise ValueError("bad zstd coder parameters")
        width = params[0]
        expected = int(np.prod(shape)) * width
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise ValueError(f"damaged zstd payload: {exc}") from None
        if len(raw) != expected:
            raise ValueError("zstd payload does not hold the latent the header describes")
        dtype = np.dtype("i1") if width == 1 else np.dtype("<i2")
        return np.frombuffer(raw, dtype=dtype).astype(np.int32).reshape(shape)


CODERS: dict[str, EntropyCoder] = {ZstdCoder.name: ZstdCoder()}
DEFAULT_CODER = ZstdCoder.name


def get_coder(name: str) -> EntropyCoder:
    try:
        return CODERS[name]
    except KeyError:
        raise ValueError(f"unknown entropy coder {name!r} (this build knows {sorted(CODERS)})") from None
