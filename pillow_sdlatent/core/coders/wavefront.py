"""Wavefront coding order and decoding loop shared by the context coders (ctx1, ctx2).

A (C, H, W) latent is held in a flat copy with a zero border ``pad`` wide around every channel, so
a neighbour gather never leaves the array. Symbol (c, y, x) lies on wavefront
``slope*y + x + lag*c``; the taps a coder predicts a symbol from all lie on earlier wavefronts, so
the decoder evaluates its model on one whole wavefront at once, then reads the wavefront's
symbols with interleaved rANS lanes. Inside a wavefront symbols go by channel, then row.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .rans import RansDecoder, TruncatedStreamError, in_symbol_range, lane_count


@dataclass(frozen=True)
class WavefrontLayout:
    """Coding order of a (C, H, W) latent held in a zero-padded flat copy."""

    shape: tuple[int, int, int]
    pad: int
    stride: int  # padded row length
    plane: int  # padded channel size
    pos: np.ndarray  # int64 padded flat index of every symbol, coding order
    chan: np.ndarray  # int64 channel of every symbol, coding order
    steps: tuple[tuple[int, int], ...]  # [begin, end) of each non-empty wavefront, coding order
    lanes: int  # rANS lanes: the most symbols one rANS step handles

    def offsets(self, taps: Iterable[tuple[int, int, int]]) -> np.ndarray:
        """Flat offsets of the taps (channel, row, column), relative to a symbol."""
        return np.asarray([dc * self.plane + dy * self.stride + dx for dc, dy, dx in taps], dtype=np.int64)

    def padded(self, sym3: np.ndarray) -> np.ndarray:
        """The symbols as a flat int64 copy with the zero border."""
        c, h, w = self.shape
        p = self.pad
        padded = np.zeros((c, h + 2 * p, w + 2 * p), dtype=np.int64)
        padded[:, p : p + h, p : p + w] = sym3
        return padded.ravel()

    def unpadded(self, flat: np.ndarray) -> np.ndarray:
        """The (C, H, W) int32 symbols of a flat padded copy."""
        c, h, w = self.shape
        p = self.pad
        return flat.reshape(c, h + 2 * p, w + 2 * p)[:, p : p + h, p : p + w].astype(np.int32)


@functools.lru_cache(maxsize=8)
def wavefront_layout(shape: tuple[int, int, int], pad: int, slope: int, lag: int | None) -> WavefrontLayout:
    """The layout of wavefronts ``slope*y + x + lag*c``; ``lag=None`` codes channel after channel."""
    c, h, w = shape
    stride = w + 2 * pad
    plane = (h + 2 * pad) * stride
    ch, rest = np.divmod(np.arange(c * h * w, dtype=np.int64), h * w)
    ys, xs = np.divmod(rest, w)
    wave = slope * ys + xs + (slope * (h - 1) + w if lag is None else lag) * ch
    order = np.lexsort((ys, ch, wave))
    counts = np.bincount(wave)
    ends = np.cumsum(counts)
    steps = tuple((b, e) for b, e in zip((ends - counts).tolist(), ends.tolist(), strict=True) if e > b)
    pos = ch[order] * plane + (ys[order] + pad) * stride + xs[order] + pad
    pos.flags.writeable = False
    chan = ch[order]
    chan.flags.writeable = False
    return WavefrontLayout(shape, pad, stride, plane, pos, chan, steps, lane_count(c * h * w, int(counts.max())))


class WavefrontModel(Protocol):
    """A coder's probability model, evaluated one wavefront (``[begin, end)`` of the coding order) at a time."""

    def tables(self, begin: int, end: int) -> tuple[list[list[int]], np.ndarray]:
        """Per symbol: the entry boundaries of its rANS table (see ``RansDecoder.wave``) and the
        lowest value inside its window."""

    def store(self, begin: int, end: int, symbols: np.ndarray) -> None:
        """Record the wavefront's decoded symbols, which later wavefronts are predicted from."""


def decode_wavefronts(payload: bytes, lay: WavefrontLayout, model: WavefrontModel, name: str,
                      partial: bool = False) -> None:
    """Decode every wavefront in coding order into ``model``; ``ValueError`` on a damaged payload.

    ``partial``: ``payload`` is a prefix of the stream; decoding stops where it ends, and the
    symbols not reached keep the model's initial zeros.
    """
    channels, height, width = lay.shape
    try:
        dec = RansDecoder(payload, lay.lanes, channels * height * width, name, partial)
        for b, e in lay.steps:
            bounds, lowest = model.tables(b, e)
            s = lowest + dec.wave(bounds)
            if not in_symbol_range(s):
                raise ValueError(f"{name} payload decodes to an out-of-range symbol")
            model.store(b, e, s)
    except TruncatedStreamError:
        if partial:
            return
        raise
    dec.finish()
