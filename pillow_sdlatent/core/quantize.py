"""Latent quantizers: float latent <-> integer symbols.

A quantizer is described in the file by a name and a small parameter blob, so
any build can rebuild exactly the dequantizer that a file needs.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from ..weights import WEIGHTS_DIR
from .container import Region

#: quality maps log-linearly onto the step (latent units; TAESD latents have a standard
#: deviation of about 0.6) in two pieces: 1 -> MAX_STEP, 75 -> DEFAULT_STEP, 100 -> MIN_STEP.
#: DEFAULT_STEP puts the 24 Kodak photos near 0.14 bits per pixel with TAESD and the ctx2 coder (ctx1: 0.15).
MAX_STEP = 4.0
DEFAULT_STEP = 0.38
MIN_STEP = 0.03
DEFAULT_QUALITY = 75
MAX_CHANNELS = 64


#: model -> the encoder's rounding offset (``rounded``). Rounding toward zero by this much of a step
#: makes fewer and smaller symbols: fewer bits for a little more error. On 6 held-out training photos
#: (``python benchmarks/rounding_offset.py --model taesd3``, docs/rounding_offset), BD-rate against plain
#: rounding for taesd3 (klt, ctx1): offset 0.1 PSNR -13.2%, MS-SSIM -8.6%, ST-LPIPS -4.7%; 0.15 gains
#: 1.7 points more PSNR but gives back ST-LPIPS (-0.4%), 0.2 loses it (+7.2%). taesd (ctx2 and the
#: restorer, trained on plain rounding) loses ST-LPIPS at any offset (0.1: +13.3%), so it keeps 0.
ROUNDING_OFFSETS: dict[str, float] = {"taesd3": 0.1}


def rounded(values: np.ndarray, offset: float) -> np.ndarray:
    """``sign(v) * floor(|v| + 1/2 - offset)``: nearest rounding with the thresholds moved ``offset``
    toward zero; offset 0 is ``rint``.

    Only the encoder rounds; a reader multiplies symbols back (FORMAT.md), so this is the encoder's choice.
    """
    if offset == 0:
        return np.rint(values)
    return np.copysign(np.floor(np.abs(values) + (0.5 - offset)), values)


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


def step_factors(regions: tuple[Region, ...], height: int, width: int) -> np.ndarray | None:
    """(H, W) float64 factor on the step at each latent position: the smallest of the regions that hold it,
    1 elsewhere (FORMAT.md, QREG); None without regions."""
    if not regions:
        return None
    factors = np.ones((height, width), dtype=np.float64)
    for region in regions:
        inside = factors[region.y0:region.y1, region.x0:region.x1]
        np.minimum(inside, region.factor, out=inside)
    return factors


@dataclass(frozen=True)
class UniformQuantizer:
    """Mid-tread uniform scalar quantizer with one step per latent channel.

    The steps are stored as float32 so that the reader reproduces the
    dequantized latent bit for bit.
    """

    steps: tuple[float, ...]
    #: the encoder's rounding (``rounded``); a reader never uses it
    rounding_offset: float = 0.0
    #: where the steps are finer (the file's QREG chunk)
    regions: tuple[Region, ...] = ()
    name = "uniform"

    @classmethod
    def for_quality(cls, quality: int, channels: int) -> UniformQuantizer:
        return cls.with_step(step_for_quality(quality), channels)

    @classmethod
    def with_step(cls, step: float, channels: int, rounding_offset: float = 0.0) -> UniformQuantizer:
        step32 = float(np.float32(step))
        return cls((step32,) * channels, rounding_offset)

    def quantize(self, latent: np.ndarray) -> np.ndarray:
        """(C, H, W) float latent -> (C, H, W) int32 symbols."""
        steps = np.asarray(self.steps, dtype=np.float32).reshape(-1, 1, 1)
        factors = step_factors(self.regions, *latent.shape[1:])
        if factors is not None:
            steps = steps * factors.astype(np.float32)
        return rounded(latent.astype(np.float32) / steps, self.rounding_offset).astype(np.int32)

    def dequantize(self, symbols: np.ndarray) -> np.ndarray:
        """(C, H, W) int symbols -> (C, H, W) float32 latent: ``symbol * step``, then ``* factor`` in a region,
        each a float32 product."""
        steps = np.asarray(self.steps, dtype=np.float32).reshape(-1, 1, 1)
        latent = symbols.astype(np.float32) * steps
        factors = step_factors(self.regions, *symbols.shape[1:])
        return latent if factors is None else latent * factors.astype(np.float32)

    def to_params(self) -> bytes:
        return struct.pack(f">{len(self.steps)}f", *self.steps)

    @classmethod
    def from_params(cls, params: bytes, channels: int) -> UniformQuantizer:
        if len(params) != 4 * channels:
            raise ValueError("uniform quantizer parameters do not match the channel count")
        return cls(_stored_steps(params, channels, cls.name))


#: model -> its shipped KLT file (training/fit_klt.py) under pillow_sdlatent/weights
KLT_FILES = {"taesd3": "klt_taesd3.safetensors"}
KLT_DIGEST_BYTES = 8


@dataclass(frozen=True, eq=False)
class KltTransform:
    """A fixed orthonormal transform across latent channels, with its fitted per-component step weights.

    ``matrix`` rows are the components (largest variance first); ``digest`` names it in a file.
    """

    matrix: np.ndarray = field(repr=False)  # (C, C) float64
    mean: np.ndarray = field(repr=False)  # (C,) float64
    step_weights: np.ndarray = field(repr=False)  # (C,) float64, geometric mean 1
    digest: bytes


def transform_digest(matrix: np.ndarray, mean: np.ndarray) -> bytes:
    """The first 8 bytes of SHA-256 over the matrix (row-major) then the mean, as float64 little-endian."""
    data = np.ascontiguousarray(matrix, dtype="<f8").tobytes() + np.ascontiguousarray(mean, dtype="<f8").tobytes()
    return hashlib.sha256(data).digest()[:KLT_DIGEST_BYTES]


@cache
def klt_for_model(model: str) -> KltTransform | None:
    """The shipped transform for ``model``'s latent space, if it has one (read once; safetensors, no torch)."""
    if model not in KLT_FILES:
        return None
    from safetensors.numpy import load

    tensors = load((WEIGHTS_DIR / KLT_FILES[model]).read_bytes())
    matrix, mean = tensors["matrix"].astype(np.float64), tensors["mean"].astype(np.float64)
    return KltTransform(matrix, mean, tensors["step_weights"].astype(np.float64), transform_digest(matrix, mean))


def klt_by_digest(digest: bytes) -> KltTransform | None:
    """The shipped transform a file names by its digest, if this build has it."""
    transforms = (klt_for_model(model) for model in KLT_FILES)
    return next((t for t in transforms if t is not None and t.digest == digest), None)


@dataclass(frozen=True)
class KltQuantizer:
    """Uniform quantizer with one step per component of a fixed channel transform (``KltTransform``).

    Symbols are ``rounded(M (x - mean) / step)``; the encoder side may compute them any way it likes.
    Dequantization is normative (FORMAT.md): float64 products and sums in component order, then float32.
    """

    steps: tuple[float, ...]
    transform: KltTransform
    #: the encoder's rounding (``rounded``); a reader never uses it
    rounding_offset: float = 0.0
    #: where the steps are finer (the file's QREG chunk)
    regions: tuple[Region, ...] = ()
    name = "klt"

    @classmethod
    def with_step(cls, step: float, transform: KltTransform, rounding_offset: float = 0.0) -> KltQuantizer:
        """Component k gets ``step`` times its fitted weight, stored as float32."""
        return cls(tuple(float(np.float32(step * w)) for w in transform.step_weights), transform, rounding_offset)

    def components(self, latent: np.ndarray) -> np.ndarray:
        """(C, H, W) latent -> (C, H, W) float64 transform coefficients."""
        centred = latent.astype(np.float64) - self.transform.mean[:, None, None]
        return np.tensordot(self.transform.matrix, centred, axes=1)

    def quantize(self, latent: np.ndarray) -> np.ndarray:
        steps = np.asarray(self.steps, dtype=np.float64).reshape(-1, 1, 1)
        factors = step_factors(self.regions, *latent.shape[1:])
        if factors is not None:
            steps = steps * factors
        return rounded(self.components(latent) / steps, self.rounding_offset).astype(np.int32)

    def dequantize(self, symbols: np.ndarray) -> np.ndarray:
        """Bit-exact on every IEEE-754 platform: each product and sum is one rounded float64 operation."""
        matrix, mean = self.transform.matrix, self.transform.mean
        values = [symbols[k].astype(np.float64) * self.steps[k] for k in range(len(self.steps))]
        factors = step_factors(self.regions, *symbols.shape[1:])
        if factors is not None:
            values = [value * factors for value in values]
        latent = np.empty(symbols.shape, dtype=np.float32)
        for c in range(len(self.steps)):
            total = np.zeros(symbols.shape[1:], dtype=np.float64)
            for k, value in enumerate(values):
                total = total + matrix[k, c] * value
            latent[c] = (total + mean[c]).astype(np.float32)
        return latent

    def to_params(self) -> bytes:
        return self.transform.digest + struct.pack(f">{len(self.steps)}f", *self.steps)

    @classmethod
    def from_params(cls, params: bytes, channels: int) -> KltQuantizer:
        if len(params) != KLT_DIGEST_BYTES + 4 * channels:
            raise ValueError("klt quantizer parameters do not match the channel count")
        digest = params[:KLT_DIGEST_BYTES]
        transform = klt_by_digest(digest)
        if transform is None:
            raise ValueError(f"the file needs KLT transform {digest.hex()}, which this build lacks; "
                             "upgrade pillow_sdlatent")
        if len(transform.mean) != channels:
            raise ValueError(f"KLT transform {digest.hex()} has {len(transform.mean)} channels, not {channels}")
        return cls(_stored_steps(params[KLT_DIGEST_BYTES:], channels, cls.name), transform)


def _stored_steps(data: bytes, channels: int, name: str) -> tuple[float, ...]:
    """``channels`` big-endian float32 steps; ``ValueError`` unless each is finite and in (1e-6, 1e6)."""
    steps = struct.unpack(f">{channels}f", data)
    if not all(math.isfinite(s) and 1e-6 < s < 1e6 for s in steps):
        raise ValueError(f"{name} quantizer step out of range")
    return steps


Quantizer = UniformQuantizer | KltQuantizer
QUANTIZERS: dict[str, type[UniformQuantizer] | type[KltQuantizer]] = {
    UniformQuantizer.name: UniformQuantizer, KltQuantizer.name: KltQuantizer}


def quantizer_for(model: str, step: float, channels: int, plain_rounding: bool = False) -> Quantizer:
    """The quantizer the encoder uses for ``model`` at base ``step``: ``klt`` where a transform ships,
    with the model's ``ROUNDING_OFFSETS`` unless ``plain_rounding``."""
    transform = klt_for_model(model)
    offset = 0.0 if plain_rounding else ROUNDING_OFFSETS.get(model, 0.0)
    if transform is not None and len(transform.mean) == channels:
        return KltQuantizer.with_step(step, transform, offset)
    return UniformQuantizer.with_step(step, channels, offset)


def quantizer_from_params(name: str, params: bytes, channels: int) -> Quantizer:
    """Rebuild the quantizer a file names; ValueError for one this build lacks."""
    try:
        cls = QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r} (this build knows {sorted(QUANTIZERS)})") from None
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"latent channel count {channels} out of range")
    return cls.from_params(params, channels)
