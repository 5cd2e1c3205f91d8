"""Lossless coders for the quantized latent symbols.

Every coder maps a (C, H, W) int32 array to ``(params, payload)`` bytes and
back. The decoder is told the shape by the container, so it can bound every
allocation by what the header already justified.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np
import zstandard

from .ctx1 import ContextCoder
from .ctx2 import NETWORKS as LEARNED_NETWORKS
from .ctx2 import LearnedContextCoder


class EntropyCoder(Protocol):
    name: str

    def encode(self, symbols: np.ndarray) -> tuple[bytes, bytes]:
        """(C, H, W) int32 symbols -> (params, payload)."""

    def decode(self, params: bytes, payload: bytes, shape: tuple[int, int, int], partial: bool = False) -> np.ndarray:
        """Inverse of :meth:`encode`; ``ValueError`` on a damaged payload.

        ``partial``: ``payload`` is a prefix of the coded bytes (a truncated file); the symbols it
        holds decode exactly and the rest are 0.
        """


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

    def decode(self, params: bytes, payload: bytes, shape: tuple[int, int, int], partial: bool = False) -> np.ndarray:
        if params not in (b"\x01", b"\x02"):
            raise ValueError("bad zstd coder parameters")
        width = params[0]
        size = int(np.prod(shape)) * width
        raw = zstd_decompress_prefix(payload, size) if partial else zstd_decompress_exact(payload, size)
        dtype = np.dtype("i1") if width == 1 else np.dtype("<i2")
        return np.frombuffer(raw, dtype=dtype).astype(np.int32).reshape(shape)


def zstd_decompress_prefix(frame: bytes, size: int) -> bytes:
    """What the whole blocks at the start of a truncated zstd frame hold, zero-padded to ``size`` bytes.

    Read through a bounded stream, so a hostile frame never makes more than ``size`` bytes.
    """
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(frame), read_across_frames=False)
    raw = b""
    try:
        while len(raw) < size and (chunk := reader.read(size - len(raw))):
            raw += chunk
    except zstandard.ZstdError:
        pass  # the frame ends mid-block: keep what came before
    return raw.ljust(size, b"\0")


def zstd_decompress_exact(frame: bytes, size: int) -> bytes:
    """One zstd frame that must hold exactly ``size`` bytes; ``ValueError`` otherwise.

    The content size a frame declares is checked first: python-zstandard's
    ``decompress`` allocates that much even past ``max_output_size``.
    """
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in (-1, size):
            raise ValueError(f"zstd frame holds {declared} bytes, not the {size} expected")
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"damaged zstd frame: {exc}") from None
    if len(raw) != size:
        raise ValueError(f"zstd frame holds {len(raw)} bytes, not the {size} expected")
    return raw


CODERS: dict[str, EntropyCoder] = {
    coder.name: coder
    for coder in (ZstdCoder(), ContextCoder(), *(LearnedContextCoder(name) for name in LEARNED_NETWORKS))
}
#: the default coder per model: ctx2's network learned TAESD latents of photos (26.1% fewer payload
#: bytes than zstd at the default quality on Kodak, against ctx1's 19.1%), ctx3's taesd3 latents in klt
#: components (training/README.md); ctx1 fits any latent per image. sd-vae shares TAESD's latent
#: space, but ctx2 was never measured on its latents here.
DEFAULT_CODERS = {"taesd": "ctx2", "taesd3": "ctx3"}
FALLBACK_CODER = ContextCoder.name
#: the default coder of the default model
DEFAULT_CODER = DEFAULT_CODERS["taesd"]


def default_coder(model: str) -> str:
    return DEFAULT_CODERS.get(model, FALLBACK_CODER)


def codes_channels(name: str | None, channels: int) -> bool:
    """Whether the coder ``name`` (None: a model's default, which always fits) codes such latents."""
    return name is None or getattr(get_coder(name), "channels", channels) == channels


def check_coder(name: str, channels: int) -> None:
    """``ValueError`` when the coder is unknown or cannot code a latent with this many channels;
    ``OSError`` when it needs data it cannot load (ctx2's network), before any encoding starts."""
    if not codes_channels(name, channels):
        raise ValueError(f"coder {name!r} codes {get_coder(name).channels}-channel latents only; "
                         f"this model's have {channels}")
    prepare = getattr(get_coder(name), "prepare", None)
    if prepare is not None:
        prepare()


def get_coder(name: str) -> EntropyCoder:
    try:
        return CODERS[name]
    except KeyError:
        raise ValueError(f"unknown entropy coder {name!r} (this build knows {sorted(CODERS)})") from None
