"""image <-> latent <-> symbols <-> bytes: the one pipeline the plugin and the CLI share."""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np
import zstandard
from PIL import Image

from . import container, entropy, quantize, refine
from .container import DamagedFileError, Header, Layout
from .models import DEFAULT_MODEL, REGISTRY, get_spec

#: given mode -> (working mode fed to the model, mode stored and decoded to)
MODE_RULES: dict[str, tuple[str, str]] = {
    "RGB": ("RGB", "RGB"),
    "L": ("L", "L"),
    "RGBA": ("RGBA", "RGBA"),
    "LA": ("LA", "LA"),
    "1": ("L", "1"),
    "RGBX": ("RGB", "RGB"),
    "CMYK": ("RGB", "RGB"),
    "YCbCr": ("RGB", "RGB"),
    "LAB": ("RGB", "RGB"),
    "HSV": ("RGB", "RGB"),
    "RGBa": ("RGBA", "RGBA"),
    "La": ("LA", "LA"),
    "PA": ("RGBA", "RGBA"),
}
ALPHA_ZSTD = 0


#: Model per rate, used when the caller names no ``model``. On held-out training photos (not Kodak;
#: ``python benchmarks/rd.py --codecs sdl --models taesd,taesd3,taef1 --images ../shared/data/train
#: --every 40``, docs/model_per_rate) taesd wins on ST-LPIPS up to about 0.29 bpp (PSNR: a tie from 0.28),
#: where its curve flattens at its own round-trip ceiling; above that the 16-channel taesd3 wins (taef1
#: never does). So a rate target from ``HIGH_RATE_BPP`` up, or a quality from ``HIGH_RATE_QUALITY`` up,
#: is coded with ``HIGH_RATE_MODEL``.
HIGH_RATE_MODEL = "taesd3"
HIGH_RATE_BPP = 0.30
HIGH_RATE_QUALITY = 89
#: taesd3's step at quality 89 and 100 (log-linear between): about 0.35 and 0.95 bpp on those photos,
#: so that quality 89 already lands where taesd3 is clearly ahead (ST-LPIPS 0.065 against taesd's 0.097)
HIGH_RATE_STEPS = (0.6, 0.1)
#: effort from which the encoder also codes the image with the other of these models and keeps the
#: closer picture (``closer_of_trial``): per image, taesd3 holds faces and small text that taesd rewrites
TRIAL_EFFORT = 1
TRIAL_MODELS = (DEFAULT_MODEL, HIGH_RATE_MODEL)


#: Scale per rate, for the models it was measured on (RATE_CURVES); see ``scale_for_rate``. At low
#: rates a smaller image with a finer step beats the whole image with a coarse one. On 10 held-out
#: training photos (7 Sun-Hays80, 3 Urban100; not Kodak; ``python benchmarks/scale_per_rate.py``,
#: docs/scale_per_rate; coder ctx2) the scale with the lowest mean ST-LPIPS is 0.5 below 0.032 bpp,
#: 0.625 to 0.056, 0.75 to 0.084 and 0.875 above. From 0.14 bpp up 0.875 leads 1 by under 4%, and the
#: Urban100 photos prefer 1, so the whole image is kept there (the default quality lands there too).
#: (bits per pixel below which, scale), lowest rate first
BPP_SCALES: tuple[tuple[float, float], ...] = ((0.032, 0.5), (0.056, 0.625), (0.084, 0.75), (0.14, 0.875))
#: model -> {scale: ((step, bpp), ...)}: on those photos, the mean rate (bits per pixel of the
#: full-size image) when coded at that scale with that step; between and beyond these points the
#: rate is interpolated log-log (``mean_bpp``)
RATE_CURVES: dict[str, dict[float, tuple[tuple[float, float], ...]]] = {
    "taesd": {
        0.5: ((0.030, 0.0969), (0.036, 0.0925), (0.087, 0.0729), (0.186, 0.0558), (0.482, 0.0361),
              (1.138, 0.0217)),
        0.625: ((0.030, 0.1483), (0.040, 0.1377), (0.081, 0.1129), (0.154, 0.0906), (0.270, 0.0717),
                (0.457, 0.0550), (0.932, 0.0358), (1.665, 0.0232)),
        0.75: ((0.044, 0.1906), (0.131, 0.1357), (0.215, 0.1112), (0.343, 0.0893), (0.520, 0.0709),
               (0.787, 0.0548), (1.436, 0.0360), (2.222, 0.0211)),
        0.875: ((0.118, 0.1892), (0.273, 0.1338), (0.400, 0.1098), (0.578, 0.0886), (0.821, 0.0708),
                (1.189, 0.0547), (1.879, 0.0357), (2.674, 0.0190)),
        1.0: ((0.229, 0.1867), (0.446, 0.1326), (0.612, 0.1093), (0.842, 0.0888), (1.157, 0.0708),
              (1.590, 0.0547), (2.186, 0.0356), (3.004, 0.0174)),
    },
}
#: automatic scaling never makes the shorter side smaller than this
MIN_CODED_SIDE = 64


class DigestMismatchError(OSError):
    """The decoder weights at hand are not the ones the file was written with."""


@dataclass(frozen=True)
class EncodeOptions:
    """Validated save options; ``ValueError`` for a bad value.

    At most one rate setting: ``quality`` (1..100), ``bpp`` (bits per pixel of
    the whole file) or ``max_bytes``; ``quality`` 75 when none is given.
    """

    quality: int | None = None
    bpp: float | None = None
    max_bytes: int | None = None
    model: str = DEFAULT_MODEL
    model_fixed: bool = False
    effort: int = 0
    coder: str | None = None  # None: the model's default (entropy.default_coder)
    device: str | None = None
    weights: str | None = None
    scale: float | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EncodeOptions:
        quality, bpp, max_bytes = info.get("quality"), info.get("bpp"), info.get("max_bytes")
        if sum(value is not None for value in (quality, bpp, max_bytes)) > 1:
            raise ValueError("give at most one of quality, bpp and max_bytes")
        if quality is not None:
            quantize.step_for_quality(quality)
        if bpp is not None and (isinstance(bpp, bool) or not isinstance(bpp, (int, float)) or not 0 < bpp <= 64):
            raise ValueError(f"bpp must be a number in (0, 64], not {bpp!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive integer, not {max_bytes!r}")
        if bpp is None and max_bytes is None and quality is None:
            quality = quantize.DEFAULT_QUALITY
        model = info.get("model")
        get_spec(model or DEFAULT_MODEL)
        effort = info.get("effort", 0)
        if isinstance(effort, bool) or not isinstance(effort, int) or effort not in refine.ITERATIONS:
            raise ValueError(f"effort must be an integer in 0..{refine.MAX_EFFORT}, not {effort!r}")
        coder = info.get("coder") or None
        if coder is not None:
            entropy.get_coder(coder)
        device = info.get("device")
        if device is not None and not isinstance(device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', not {device!r}")
        weights = info.get("weights")
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise ValueError(f"weights must be a path, not {weights!r}")
        scale = info.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not 0 < scale <= 1):
            raise ValueError(f"scale must be a number in (0, 1], not {scale!r}")
        return cls(quality, None if bpp is None else float(bpp), max_bytes, model or DEFAULT_MODEL,
                   model is not None, effort, coder, device, os.fspath(weights) if weights else None,
                   None if scale is None else float(scale))


def working_image(image: Image.Image) -> tuple[Image.Image, str]:
    """The image converted to what the model sees, and the mode it will decode to.

    ``OSError`` naming the mode when it cannot be stored without silent loss.
    """
    if image.mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB"), "RGBA" if has_alpha else "RGB"
    try:
        work_mode, stored_mode = MODE_RULES[image.mode]
    except KeyError:
        raise OSError(
            f"cannot write mode {image.mode} as SDL: its samples have more than 8 bits "
            "and would be lost silently; convert to 'L' or 'RGB' first"
        ) from None
    return (image if image.mode == work_mode else image.convert(work_mode)), stored_mode


def metadata_from(image: Image.Image, info: dict[str, Any]) -> dict[str, bytes]:
    """EXIF, ICC and XMP from the save options, else kept from ``image.info``."""
    metadata: dict[str, bytes] = {}
    for key in container.METADATA_CHUNKS.values():
        value = info[key] if key in info else image.info.get(key)
        if value is None or value == b"" or value == "":
            continue
        if isinstance(value, Image.Exif):
            value = value.tobytes()
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{key} must be bytes, not {type(value).__name__}")
        metadata[key] = bytes(value)
    return metadata


@dataclass
class _EncodeJob:
    """One image on its way to bytes: everything but the latent, which may come from a batch."""

    image: Image.Image
    options: EncodeOptions
    metadata: dict[str, bytes]
    stored_mode: str
    alpha: bytes | None
    rgb: np.ndarray
    model: Any
    scale: float
    coded_size: tuple[int, int] | None

    def file_for(self, latent: np.ndarray, step: float) -> bytes:
        quantizer = quantize.quantizer_for(self.options.model, step, latent.shape[0])
        symbols = quantizer.quantize(latent)
        coder = entropy.get_coder(self.options.coder)
        coder_params, payload = coder.encode(symbols)
        header = Header(
            width=self.image.width, height=self.image.height, original_mode=self.image.mode,
            mode=self.stored_mode, model=self.options.model, decoder_digest=self.model.decoder_digest,
            latent_shape=symbols.shape, quantizer=quantizer.name, quantizer_params=quantizer.to_params(),
            coder=coder.name, coder_params=coder_params, payload_length=len(payload),
            coded_size=self.coded_size,
        )
        return container.serialize(header, payload, self.metadata, self.alpha)

    def finish(self, latent: np.ndarray) -> bytes:
        """Choose the step (quality or rate control), spend the effort, serialize."""
        options, model, rgb = self.options, self.model, self.rgb
        target = rate_target(options, self.image.width, self.image.height)
        if target is None:
            step = step_at_scale(step_for_quality(options.quality or quantize.DEFAULT_QUALITY, options), self.scale,
                                 options.model)
            quantizer = quantize.quantizer_for(options.model, step, latent.shape[0])
            return self.file_for(refine.refine_latent(model, latent, rgb, quantizer, options.effort), step)
        data, step = fit_rate(lambda step: self.file_for(latent, step), target)
        if options.effort:
            quantizer = quantize.quantizer_for(options.model, step, latent.shape[0])
            latent = refine.refine_latent(model, latent, rgb, quantizer, options.effort)
            data, _ = fit_rate(lambda step: self.file_for(latent, step), target)
        return data


def _prepare(image: Image.Image, info: dict[str, Any] | None) -> _EncodeJob:
    """Validate options and image, load the model: everything that can fail does so before the encoder runs."""
    info = dict(info or {})
    options = EncodeOptions.from_info(info)
    metadata = metadata_from(image, info)
    work, stored_mode = working_image(image)
    width, height = work.size
    if width * height == 0:
        raise ValueError("cannot save an empty image")
    if max(width, height) > container.MAX_SIDE:
        raise ValueError(f"SDL images are at most {container.MAX_SIDE} pixels a side")
    alpha = None
    if stored_mode in container.ALPHA_MODES:
        alpha_plane = np.asarray(work.getchannel("A"), dtype=np.uint8).tobytes()
        alpha = bytes([ALPHA_ZSTD]) + zstandard.ZstdCompressor(level=19).compress(alpha_plane)

    from .models import WeightsNotFoundError, load_model

    chosen = model_for_rate(options, width, height)
    coder = coder_for(options, chosen)
    try:
        model = load_model(chosen, weights=options.weights, device=options.device)
    except WeightsNotFoundError:
        if chosen == options.model:
            raise
        warnings.warn(f"no weights for {chosen!r}, which codes this rate best; using {options.model!r}",
                      stacklevel=4)
        chosen = options.model
        coder = coder_for(options, chosen)
        model = load_model(chosen, weights=options.weights, device=options.device)
    options = replace(options, model=chosen, coder=coder)
    coded = scaled_size(width, height, scale_for_rate(options, width, height))
    scale = 1.0
    if coded is not None:  # the scale rounding left, for the step
        scale = math.sqrt(coded[0] * coded[1] / (width * height))
        colour = work if work.mode in ("RGB", "L") else work.convert("RGB")
        work = colour.resize(coded, container.RESAMPLING[container.LANCZOS])
    return _EncodeJob(image, options, metadata, stored_mode, alpha, padded_rgb(work), model, scale, coded)


def coder_for(options: EncodeOptions, model: str) -> str:
    """The coder named, else ``model``'s default; ``ValueError``/``OSError`` now if it cannot serve."""
    coder = options.coder or entropy.default_coder(model)
    entropy.check_coder(coder, get_spec(model).channels)
    return coder


def model_for_rate(options: EncodeOptions, width: int, height: int) -> str:
    """The named model; else the one that wins at the requested rate (see ``HIGH_RATE_MODEL``),
    unless the coder named cannot code that model's latents."""
    if options.model_fixed or not entropy.codes_channels(options.coder, get_spec(HIGH_RATE_MODEL).channels):
        return options.model
    bpp = requested_bpp(options, width, height)
    if bpp is None:
        return HIGH_RATE_MODEL if (options.quality or quantize.DEFAULT_QUALITY) >= HIGH_RATE_QUALITY else options.model
    return HIGH_RATE_MODEL if bpp >= HIGH_RATE_BPP else options.model


def closer_of_trial(image: Image.Image, info: dict[str, Any] | None, job: _EncodeJob, data: bytes) -> bytes:
    """From effort ``TRIAL_EFFORT`` up, with no model named: code the image with the other model of
    ``TRIAL_MODELS`` too, at the same rate target (for a quality: in at most ``len(data)`` bytes), decode
    both and keep the file whose picture has the higher PSNR, a distortion that a rewritten face or
    letter cannot hide from. The file records the model it was coded with."""
    options = job.options
    if options.model_fixed or options.effort < TRIAL_EFFORT or options.model not in TRIAL_MODELS:
        return data
    rival_info = {**(info or {}), "model": next(model for model in TRIAL_MODELS if model != options.model)}
    if rate_target(options, image.width, image.height) is None:
        rival_info = {k: v for k, v in rival_info.items() if k != "quality"} | {"max_bytes": len(data)}
    try:
        rival = encode_image(image, rival_info)
    except (OSError, ValueError):  # no weights for it, its coder cannot serve, or it cannot fit the bytes
        return data
    reference = np.asarray(image.convert("RGB"), dtype=np.float64)

    def squared_error(candidate: bytes) -> float:
        return float(np.mean((np.asarray(decode_file(candidate).convert("RGB"), dtype=np.float64) - reference) ** 2))

    return min((data, rival), key=squared_error)


def step_for_quality(quality: int, options: EncodeOptions) -> float:
    """``quantize.step_for_quality``, except where the high-rate model was picked for a quality from
    ``HIGH_RATE_QUALITY`` up: it has its own scale there, so quality keeps meaning "higher is better"."""
    picked = not options.model_fixed and options.model == HIGH_RATE_MODEL
    if not picked or quality < HIGH_RATE_QUALITY:
        return quantize.step_for_quality(quality)
    coarse, fine = HIGH_RATE_STEPS
    t = (quality - HIGH_RATE_QUALITY) / (100 - HIGH_RATE_QUALITY)
    return float(coarse * (fine / coarse) ** t)


def scale_for_rate(options: EncodeOptions, width: int, height: int) -> float:
    """``scale`` if given; else, for a model in ``RATE_CURVES``, the scale that wins at the requested rate.

    A quality's rate is the mean rate its step gives at full size (``RATE_CURVES``), so that
    quality and ``bpp`` pick the same scale for the same rate.
    """
    if options.scale is not None:
        return options.scale
    if options.model not in RATE_CURVES:
        return 1.0
    bpp = requested_bpp(options, width, height)
    if bpp is None:
        step = step_for_quality(options.quality or quantize.DEFAULT_QUALITY, options)
        bpp = mean_bpp(options.model, 1.0, step)
    scale = next((scale for below, scale in BPP_SCALES if bpp < below), 1.0)
    return min(1.0, max(scale, MIN_CODED_SIDE / min(width, height)))


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int] | None:
    """The size the latent codes at ``scale``; None when that is the image's own size."""
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return None if size == (width, height) else size


def _interp_extended(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear through (xs, ys) (at least two points), continued along the end segments."""
    index = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    t = (x - xs[index]) / (xs[index + 1] - xs[index])
    return float(ys[index] + t * (ys[index + 1] - ys[index]))


def mean_bpp(model: str, scale: float, step: float) -> float:
    """The mean rate ``RATE_CURVES`` gives for ``step`` at ``scale`` (taesd's curves for other models).

    Log-log interpolation in step, then linear in scale between the measured scales; below the
    smallest one the rate shrinks with the area.
    """
    curves = RATE_CURVES.get(model, RATE_CURVES[DEFAULT_MODEL])

    def log_rate(at: float) -> float:
        points = curves[at]
        return _interp_extended(math.log(step), [math.log(p[0]) for p in points],
                                [math.log(p[1]) for p in points])

    scales = sorted(curves)
    if scale < scales[0]:
        return math.exp(log_rate(scales[0])) * (scale / scales[0]) ** 2
    return math.exp(_interp_extended(scale, scales, [log_rate(s) for s in scales]))


def step_at_scale(step: float, scale: float, model: str = DEFAULT_MODEL) -> float:
    """The step that gives a ``scale``-sized image the mean rate ``step`` gives the whole image.

    So a quality keeps its rate whatever the scale, and spends it on finer steps instead, down to
    quality 100's step: a small image cannot spend a high rate.
    """
    if scale == 1:
        return step
    wanted = math.log(mean_bpp(model, 1.0, step))
    low, high = math.log(quantize.MIN_STEP), math.log(RATE_STEPS[1])  # the rate falls as the step grows
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if math.log(mean_bpp(model, scale, math.exp(middle))) > wanted else (low, middle)
    return math.exp((low + high) / 2)


def encode_image(image: Image.Image, info: dict[str, Any] | None = None) -> bytes:
    """A whole ``.sdl`` file for ``image``; ``info`` holds the save options."""
    job = _prepare(image, info)
    return closer_of_trial(image, info, job, job.finish(job.model.encode_image(job.rgb)))


def encode_images(images: Sequence[Image.Image], info: dict[str, Any] | None = None, *,
                  batch_size: int | None = None, progress: bool = False) -> list[bytes]:
    """Many files with each model loaded once and same-sized images encoded together in device batches."""
    jobs = [_prepare(image, info) for image in images]
    latents: dict[int, np.ndarray] = {}
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault((id(job.model), job.rgb.shape), []).append(index)
    bar = _progress_bar(len(jobs), "encode", progress)
    results: list[bytes | None] = [None] * len(jobs)
    for indices in groups.values():
        model = jobs[indices[0]].model
        size = batch_size or model.tile_batch
        for first in range(0, len(indices), size):
            chunk = indices[first : first + size]
            for index, latent in zip(chunk, model.encode_images([jobs[i].rgb for i in chunk]), strict=True):
                latents[index] = latent
            for index in chunk:
                results[index] = closer_of_trial(images[index], info, jobs[index],
                                                 jobs[index].finish(latents.pop(index)))
                bar.update(1)
    bar.close()
    return [data for data in results if data is not None]


def decode_files(sources: Sequence[str | os.PathLike | IO[bytes] | bytes], *, batch_size: int | None = None,
                 progress: bool = False, restore: bool = True, denoise: str | None = None, seed: int = 0,
                 **decoder_options: Any) -> list[Image.Image]:
    """Decode many files with each model loaded once and same-shaped latents decoded together."""
    prepared = []
    for source in sources:
        with _open_binary(source) as fp:
            layout = container.read_layout(fp)
            container.check_pixel_limit(layout.header.width, layout.header.height)
            latent = latent_from_layout(fp, layout)
            alpha = alpha_plane(layout) if layout.header.mode in container.ALPHA_MODES else None
        decoder = decoder_for(layout, **decoder_options)
        latent = clean_latent(latent, layout, decoder, restore=restore, denoise=denoise, seed=seed)
        prepared.append((layout, latent, alpha, decoder))
    groups: dict[tuple, list[int]] = {}
    for index, (_, latent, _, decoder) in enumerate(prepared):
        groups.setdefault((id(decoder), latent.shape), []).append(index)
    bar = _progress_bar(len(prepared), "decode", progress)
    results: list[Image.Image | None] = [None] * len(prepared)
    for indices in groups.values():
        decoder = prepared[indices[0]][3]
        size = batch_size or decoder.tile_batch
        for first in range(0, len(indices), size):
            chunk = indices[first : first + size]
            for index, rgb in zip(chunk, decoder.decode_images([prepared[i][1] for i in chunk]), strict=True):
                layout, _, alpha, _ = prepared[index]
                results[index] = finish_mode(full_size(rgb, layout.header), layout, alpha)
                results[index].info.update(layout.metadata)
                bar.update(1)
    bar.close()
    return [image for image in results if image is not None]


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="image", disable=not enabled or total < 2)


def rate_target(options: EncodeOptions, width: int, height: int) -> int | None:
    """The file size in bytes that ``bpp`` or ``max_bytes`` asks for, if either does."""
    if options.max_bytes is not None:
        return options.max_bytes
    if options.bpp is not None:
        return max(1, int(options.bpp * width * height / 8))
    return None


def requested_bpp(options: EncodeOptions, width: int, height: int) -> float | None:
    """The rate ``max_bytes`` or ``bpp`` asks for, in bits per pixel, if either does (as ``rate_target``)."""
    if options.max_bytes is not None:
        return options.max_bytes * 8 / (width * height)
    return options.bpp


#: Rate control searches the step in this range (wider than quality's 0.05..2.0).
RATE_STEPS = (0.01, 16.0)
RATE_TOLERANCE = 0.03


def fit_rate(file_for: Any, target: int) -> tuple[bytes, float]:
    """The file whose size is within 3% under ``target`` bytes, and its step.

    Size falls off roughly as a power of the step, so the search is regula falsi on log(size)
    against log(step) (Illinois variant, which keeps both ends of the bracket moving), aiming at
    the middle of the window.
    Never returns a file over ``target``; ``ValueError`` when even the coarsest
    step does not fit (the header and metadata alone may be too big).
    """
    fine, coarse = np.log(RATE_STEPS[0]), np.log(RATE_STEPS[1])  # fine step: big file; coarse: small
    best = file_for(float(np.exp(coarse)))
    if len(best) > target:
        raise ValueError(f"cannot fit this image in {target} bytes: the smallest file is {len(best)} bytes")
    finest = file_for(float(np.exp(fine)))
    if len(finest) <= target:
        return finest, float(np.exp(fine))
    goal = math.log((1 - RATE_TOLERANCE / 2) * target)
    f_fine, f_coarse = math.log(len(finest)) - goal, math.log(len(best)) - goal
    kept = 0  # which end the last step kept: +1 fine, -1 coarse
    for _ in range(40):
        middle = coarse - f_coarse * (coarse - fine) / (f_coarse - f_fine)
        if not min(fine, coarse) < middle < max(fine, coarse):
            middle = (fine + coarse) / 2
        data = file_for(float(np.exp(middle)))
        f_middle = math.log(len(data)) - goal
        if len(data) > target:
            fine, f_fine = middle, f_middle
            f_coarse = f_coarse / 2 if kept == -1 else f_coarse
            kept = -1
        else:
            coarse, f_coarse, best = middle, f_middle, data
            if len(data) >= (1 - RATE_TOLERANCE) * target:
                break
            f_fine = f_fine / 2 if kept == 1 else f_fine
            kept = 1
    return best, float(np.exp(coarse))


def padded_rgb(image: Image.Image) -> np.ndarray:
    """(H', W', 3) uint8 colour, edges replicated to a multiple of 8 (grey replicated to RGB).

    (A margin of extra context around the image was measured: it costs 0.3-4 dB.)
    """
    rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    height, width = rgb.shape[:2]
    return np.pad(rgb, ((0, (-height) % 8), (0, (-width) % 8), (0, 0)), mode="edge")


def full_size(rgb: np.ndarray, header: Header) -> Image.Image:
    """The decoder's padded output cropped to the coded size, then resampled up to the image size."""
    coded_width, coded_height = header.coded
    image = Image.fromarray(np.ascontiguousarray(rgb[:coded_height, :coded_width]), "RGB")
    if header.coded_size is None:
        return image
    return image.resize((header.width, header.height), container.RESAMPLING[header.resampling])


def read_symbols(layout: Layout, payload: bytes) -> np.ndarray:
    """Entropy-decode the payload; ``DamagedFileError`` when it does not decode."""
    header = layout.header
    try:
        coder = entropy.get_coder(header.coder)
    except ValueError as exc:
        raise DamagedFileError(f"{exc}; upgrade pillow_sdlatent") from None
    try:
        return coder.decode(header.coder_params, payload, header.latent_shape)
    except ValueError as exc:
        raise DamagedFileError(f"damaged SDL payload: {exc}") from None


def file_quantizer(header: Header) -> quantize.Quantizer:
    """The quantizer a file names; ``DamagedFileError`` when its parameters are bad."""
    try:
        return quantize.quantizer_from_params(header.quantizer, header.quantizer_params, header.latent_shape[0])
    except ValueError as exc:
        raise DamagedFileError(f"SDL quantizer: {exc}") from None


def dequantize(layout: Layout, symbols: np.ndarray) -> np.ndarray:
    return file_quantizer(layout.header).dequantize(symbols)


def read_payload(fp: IO[bytes], layout: Layout, allow_truncated: bool) -> bytes:
    """The payload bytes; a truncated one is zero-padded only when ``allow_truncated``."""
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
    if len(payload) < layout.header.payload_length:
        try:
            symbols = read_symbols(layout, payload)
        except DamagedFileError:
            symbols = np.zeros(layout.header.latent_shape, dtype=np.int32)
    else:
        symbols = read_symbols(layout, payload)
    return dequantize(layout, symbols)


def read_latent(source: str | os.PathLike | IO[bytes] | bytes) -> np.ndarray:
    """The dequantized latent of an ``.sdl`` file as (C, H, W) float32, without any decoder.

    For pipelines that train on latents: no torch and no weights are needed. H and W are an
    eighth of the coded size, which is smaller than the image's for a file coded at a lower scale.
    """
    with _open_binary(source) as fp:
        layout = container.read_layout(fp)
        container.check_pixel_limit(layout.header.width, layout.header.height)
        return latent_from_layout(fp, layout)


def decoder_for(layout: Layout, model: str | None = None, *, device: str | None = None,
                weights: str | None = None, allow_digest_mismatch: bool = False) -> Any:
    """Load the decoder a file needs (or the compatible one asked for) and check its digest."""
    header = layout.header
    if header.model not in REGISTRY and model is None:
        raise DamagedFileError(
            f"SDL file was written with model {header.model!r}, which this build does not know "
            f"(it knows {sorted(REGISTRY)}); pass a compatible model to decode it"
        )
    name = model or header.model
    spec = get_spec(name)
    file_spec = REGISTRY.get(header.model)
    if spec.channels != header.latent_shape[0] or (file_spec and file_spec.latent_space != spec.latent_space):
        raise ValueError(
            f"model {name!r} cannot decode a {header.model!r} latent: different latent space"
        )
    from .models import load_model

    decoder = load_model(name, weights=weights, device=device)
    if name == header.model and decoder.decoder_digest != header.decoder_digest:
        message = (
            f"the {name!r} decoder weights found ({decoder.decoder_digest.hex()[:12]}) are not the "
            f"ones this file was written with ({header.decoder_digest.hex()[:12]}); the image may "
            "look wrong. Pass allow_digest_mismatch=True to decode anyway."
        )
        if not allow_digest_mismatch:
            raise DigestMismatchError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return decoder


def decode_layout(fp: IO[bytes], layout: Layout, *, allow_truncated: bool = False, restore: bool = True,
                  denoise: str | None = None, seed: int = 0, **decoder_options: Any) -> Image.Image:
    """Decode an opened file into a Pillow image of the header's mode.

    Everything that can refuse the file (payload, alpha plane, weights) is
    checked before the decoder runs, the one expensive step. ``restore`` and
    ``denoise`` choose the decoder-side restoration (see ``clean_latent``).
    """
    header = layout.header
    latent = latent_from_layout(fp, layout, allow_truncated)
    alpha = alpha_plane(layout) if header.mode in container.ALPHA_MODES else None
    decoder = decoder_for(layout, **decoder_options)
    latent = clean_latent(latent, layout, decoder, restore=restore, denoise=denoise, seed=seed)
    return finish_mode(full_size(decoder.decode_image(latent), header), layout, alpha)


def clean_latent(latent: np.ndarray, layout: Layout, decoder: Any, *, restore: bool = True,
                 denoise: str | None = None, seed: int = 0) -> np.ndarray:
    """Remove quantization noise before the decoder.

    ``denoise``: a Stable Diffusion 1.x model (hub id, folder or file) whose UNet
    denoises for a few steps, the original method (opt-in: it needs SD's weights).
    Otherwise, with ``restore`` (the default), the package's own restorer runs
    where it was measured to help at the file's step.
    """
    step = max(file_quantizer(layout.header).steps)
    if denoise:
        if decoder.spec.latent_space != "sd1":
            raise ValueError(f"UNet denoising needs an SD 1.x latent, not a {decoder.spec.name!r} one")
        from .unet_denoise import denoise_latent

        return denoise_latent(latent, step, model=denoise, device=decoder.device, seed=seed)
    if restore:
        from . import restore as restorer

        if restorer.has_restorer(decoder.spec.name, step):
            return restorer.restore_latent(latent, step, decoder.spec.name)
    return latent


def preview_layout(fp: IO[bytes], layout: Layout, *, allow_truncated: bool = False) -> Image.Image:
    """A 1/8-scale image (one pixel a latent cell) straight from the latent: no decoder, no torch.

    A linear latent -> RGB map fitted on training photos (training/fit_preview.py).
    """
    header = layout.header
    latent = latent_from_layout(fp, layout, allow_truncated)
    alpha = alpha_plane(layout) if header.mode in container.ALPHA_MODES else None
    matrix, bias = preview_map(header.model, header.latent_shape[0])
    rgb = preview_features(latent) @ matrix.T + bias
    preview = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if header.coded_size is not None:  # cells of the coded image -> cells of the image, edges aligned
        size = container.latent_size(header.width, header.height)
        (coded_width, coded_height), (cells_wide, cells_high) = header.coded, preview.size
        box = (0, 0, min(cells_wide, size[0] * coded_width / header.width),
               min(cells_high, size[1] * coded_height / header.height))
        preview = preview.resize(size, container.RESAMPLING[header.resampling], box=box)
    return finish_mode(preview, layout, alpha, scale=container.LATENT_FACTOR)


def preview_features(latent: np.ndarray) -> np.ndarray:
    """(C, H, W) latent -> (H, W, 9C): each cell with its 3x3 neighbourhood (edges replicated)."""
    _, height, width = latent.shape
    padded = np.pad(latent, ((0, 0), (1, 1), (1, 1)), mode="edge")
    shifted = [padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return np.concatenate(shifted, axis=0).transpose(1, 2, 0)


def preview_map(model: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted (3, 9C) filter and (3,) bias for a model's latent space."""
    import json
    from importlib import resources

    maps = json.loads(resources.files(__package__).joinpath("weights/preview_maps.json").read_text())
    if model not in maps:
        raise DamagedFileError(f"no preview map for model {model!r}")
    matrix = np.asarray(maps[model]["matrix"], dtype=np.float32)
    if matrix.shape != (3, 9 * channels):
        raise DamagedFileError(f"preview map for {model!r} does not fit a {channels}-channel latent")
    return matrix, np.asarray(maps[model]["bias"], dtype=np.float32)


def finish_mode(rgb: Image.Image, layout: Layout, alpha: bytes | None, scale: int = 1) -> Image.Image:
    """Turn the decoded colour into the header's mode, restoring alpha (``alpha_plane``'s bytes).

    Alpha is exact at ``scale`` 1 and box-averaged for a 1/``scale`` preview.
    """
    mode = layout.header.mode
    if mode == "RGB":
        return rgb
    grey = rgb.convert("L")
    if mode == "L":
        return grey
    if mode == "1":
        return grey.convert("1", dither=Image.Dither.NONE)
    assert alpha is not None, "alpha modes always come with their plane"
    plane = Image.frombytes("L", (layout.header.width, layout.header.height), alpha)
    if scale > 1:
        plane = plane.reduce(scale)
    base = grey if mode == "LA" else rgb
    return Image.merge(mode, (*base.split(), plane))


def alpha_plane(layout: Layout) -> bytes:
    header = layout.header
    data = layout.alpha or b""
    expected = header.width * header.height
    if data[:1] != bytes([ALPHA_ZSTD]):
        raise DamagedFileError("unknown alpha coding method")
    try:
        return entropy.zstd_decompress_exact(data[1:], expected)
    except ValueError as exc:
        raise DamagedFileError(f"damaged alpha plane: {exc}") from None


def decode_file(source: str | os.PathLike | IO[bytes] | bytes, **decoder_options: Any) -> Image.Image:
    """Decode a whole file (path, file object or bytes) to a loaded Pillow image."""
    with _open_binary(source) as fp:
        layout = container.read_layout(fp)
        container.check_pixel_limit(layout.header.width, layout.header.height)
        image = decode_layout(fp, layout, **decoder_options)
    image.info.update(layout.metadata)
    return image


@contextlib.contextmanager
def _open_binary(source: str | os.PathLike | IO[bytes] | bytes) -> Iterator[IO[bytes]]:
    """A readable binary file for a path, bytes or an open file (which is left open)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fp:
            yield fp
    else:
        yield source
