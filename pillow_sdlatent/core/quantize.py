"""Latent quantizers: float latent <-> integer symbols.

A quantizer is described in the file by a name and a small parameter blob, so
any build can rebuild exactly the dequantizer that a file needs.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

#: quality maps log-linearly onto the step (latent units; TAESD latents have a standard
#: deviation of about 0.6) in two pieces: 1 -> MAX_STEP, 75 -> DEFAULT_STEP, 100 -> MIN_STEP.
#: DEFAULT_STEP puts the 24 Kodak photos near 0.14 bits per pixel with TAESD and the ctx2 coder (ctx1: 0.15).
MAX_STEP = 4.0
DEFAULT_STEP = 0.38
MIN_STEP = 0.03
DEFAULT_QUALITY = 75
MAX_CHANNELS = 64


def step_for_quality(quality: int) -> float:
    """The uniform step for a ``quality`` in 1..100; higher quality, finer step."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)):
        raise ValueError(f"quality must be an integer in 1..100, not {quality!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, not {quality}")
    if quality <= DEFAULT_QUALITY:
        t, coarse, fine = (quality - 1) / (DEFAULT_QUALITY - 1), MAX_STEP, DEFAULT_STEP
    else:
        t, coarse, fine = (quality - DEFAULT_QUALITY) / (100 - DEFAULT_QUALITY), DEFAULT_STEP, MIN_STEP
    return float(math.exp(math.log(coarse) + t * (math.log(fine) - math.log(coarse))))


@dataclass(frozen=True)
class UniformQuantizer:
    """Mid-tread uniform scalar quantizer with one step per latent channel.

    The steps are stored as float32 so that the reader reproduces the
    dequantized latent bit for bit.
    """

    steps: tuple[float, ...]
    name = "uniform"

    @classmethod
    def for_quality(cls, quality: int, channels: int) -> UniformQuantizer:
        return cls.with_step(step_for_quality(quality), channels)

    @classmethod
    def with_step(cls, step: float, channels: int) -> UniformQuantizer:
        step32 = float(np.float32(step))
        return cls((step32,) * channels)

    def quantize(self, latent: np.ndarray) -> np.ndarray:
        """(C, H, W) float latent -> (C, H, W) int32 symbols."""
        steps = np.asarray(self.steps, dtype=np.float32).reshape(-1, 1, 1)
        return np.rint(latent.astype(np.float32) / steps).astype(np.int32)

    def dequantize(self, symbols: np.ndarray) -> np.ndarray:
        """(C, H, W) int symbols -> (C, H, W) float32 latent."""
        steps = np.asarray(self.steps, dtype=np.float32).reshape(-1, 1, 1)
        return symbols.astype(np.float32) * steps

    def to_params(self) -> bytes:
        return struct.pack(f">{len(self.steps)}f", *self.steps)

    @classmethod
    def from_params(cls, params: bytes, channels: int) -> UniformQuantizer:
        if len(params) != 4 * channels:
            raise ValueError("uniform quantizer parameters do not match the channel count")
        steps = struct.unpack(f">{channels}f", params)
        if not all(math.isfinite(s) and 1e-6 < s < 1e6 for s in steps):
            raise ValueError("uniform quantizer step out of range")
        return cls(tuple(steps))


QUANTIZERS = {UniformQuantizer.name: UniformQuantizer}


def quantizer_from_params(name: str, params: bytes, channels: int) -> UniformQuantizer:
    """Rebuild the quantizer a file names; ValueError for one this build lacks."""
    try:
        cls = QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r} (this build knows {sorted(QUANTIZERS)})") from None
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"latent channel count {channels} out of range")
    return cls.from_params(params, channels)
