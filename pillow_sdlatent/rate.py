"""Rate policy: which model, scale and step code an image at the rate or quality asked for.

The tables here were fitted on held-out training photos (never Kodak); each constant says by which
command. Nothing here changes how a file decodes: the file records every choice.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .core import coders, container, quantize
from .core.registry import DEFAULT_MODEL, get_spec
from .options import EncodeOptions

#: Model per rate, used when the caller names no ``model``: each at its own scale per rate
#: (``BPP_SCALES``). On the 10 held-out training photos of docs/scale_per_rate (not Kodak; ``python
#: benchmarks/scale_per_rate.py --model taesd|taesd3``), taesd3 with its coder ctx3 overtakes taesd at
#: about 0.09 bpp on PSNR, 0.095 on ST-LPIPS and 0.12 on MS-SSIM (with ctx1 it was 0.1, 0.11 and 0.14).
#: Each at the scale its rule picks: at 0.12 bpp PSNR 24.07 against 23.48 dB, ST-LPIPS 0.107 against
#: 0.120, MS-SSIM 8.74 against 8.72 dB; at 0.14 bpp 24.59 / 0.092 / 9.38 against 23.46 / 0.119 / 8.89.
#: So the switch sits at 0.12 bpp, where all three have crossed. Checked on 35 other training photos
#: (sorted index % 40 of 10 or 30; docs/model_per_rate/quality): at qualities 65, 70 and 75 (0.121-0.144
#: bpp, which taesd coded before) taesd3 gives +0.42, +0.58 and +0.81 dB, ST-LPIPS 0.115 -> 0.093,
#: 0.110 -> 0.085 and 0.107 -> 0.078, MS-SSIM BD-rate -4.0%, for 4% more bytes. With both models' restoring
#: decoders, on 18 photos sorted index % 40 == 10, the crossings are at 0.09, 0.10 and 0.115 bpp
#: (docs/model_per_rate/restoring_decoders), so the switch stays. Above 0.3 bpp taesd sits at its
#: own round-trip ceiling (docs/model_per_rate). So a rate target from ``HIGH_RATE_BPP`` up, or a quality
#: whose rate is that high (``quality_bpp``), is coded with ``HIGH_RATE_MODEL``. For a rate target, an
#: image with small text keeps taesd up to DETAILED_HIGH_RATE_BPP (``model_for_rate``).
HIGH_RATE_MODEL = "taesd3"
HIGH_RATE_BPP = 0.12
HIGH_RATE_QUALITY = 89

#: taesd3's whole-image step at qualities 89 and 100 (log-linear between), where the default model's
#: steps would ask for more rate than it can use: quality 89 is about 0.31 bpp on those photos, just
#: above quality 88's, and the rate grows from there; coded at the scale per rate
HIGH_RATE_STEPS = (0.55, 0.1)

#: effort from which the encoder also codes the image with the other of these models and keeps the
#: closer picture (``pipeline.closer_of_trial``): per image, one model may hold a face or small text
#: that the other rewrites
TRIAL_EFFORT = 1
TRIAL_MODELS = (DEFAULT_MODEL, HIGH_RATE_MODEL)

#: Scale per rate, per model (RATE_CURVES has the models it was measured on); see ``scale_for_rate``.
#: At low rates a smaller image with a finer step beats the whole image with a coarse one. On 10
#: held-out training photos (7 Sun-Hays80, 3 Urban100; not Kodak; ``python benchmarks/scale_per_rate.py
#: --model MODEL``, docs/scale_per_rate):
#: - taesd (coder ctx2): the scale with the lowest mean ST-LPIPS is 0.5 below 0.032 bpp, 0.625 to
#:   0.056, 0.75 to 0.084 and 0.875 above. From 0.14 bpp up 0.875 leads 1 by under 4%, and the
#:   Urban100 photos prefer 1, so the whole image is kept there (the default quality lands there too).
#: - taesd3 (klt, ctx3, rounding offset 0.1): PSNR prefers 0.5 up to 0.17 bpp, ST-LPIPS only below
#:   0.05, where 0.625 takes over and leads 0.5 by 17% at 0.1 bpp (0.5 leads it by 0.6 dB there); so
#:   0.5 below 0.05 bpp, 0.625 to 0.22 (ST-LPIPS ties 0.75 at 0.2, PSNR crosses at about 0.23), 0.75
#:   to 0.4. Scales other than 1 were not measured above 0.36 bpp, so 0.875 holds to 0.5 (from the
#:   earlier fit with ctx1, where 0.875 tied 0.75 at 0.4) and 1 above.
#: model -> ((bits per pixel below which, scale), lowest rate first)
BPP_SCALES: dict[str, tuple[tuple[float, float], ...]] = {
    "taesd": ((0.032, 0.5), (0.056, 0.625), (0.084, 0.75), (0.14, 0.875)),
    "taesd3": ((0.05, 0.5), (0.22, 0.625), (0.4, 0.75), (0.5, 0.875)),
}

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
    "taesd3": {
        0.5: ((0.030, 0.3391), (0.065, 0.2680), (0.175, 0.1789), (0.409, 0.1062), (0.750, 0.0610), (1.234, 0.0307),
              (1.721, 0.0172), (1.998, 0.0134)),
        0.625: ((0.093, 0.3614), (0.182, 0.2664), (0.350, 0.1785), (0.624, 0.1089), (1.070, 0.0539),
                (1.577, 0.0269), (2.036, 0.0169), (2.263, 0.0143)),
        0.75: ((0.196, 0.3604), (0.324, 0.2639), (0.532, 0.1761), (0.836, 0.1047), (1.248, 0.0554),
               (1.824, 0.0261), (2.334, 0.0172), (2.585, 0.0148)),
        0.875: ((0.318, 0.3583), (0.469, 0.2640), (0.690, 0.1779), (0.999, 0.1052), (1.431, 0.0539),
                (1.988, 0.0276), (2.649, 0.0175), (3.055, 0.0148)),
        1.0: ((0.446, 0.3541), (0.612, 0.2603), (0.842, 0.1737), (1.157, 0.1026), (1.590, 0.0533), (2.186, 0.0281),
              (3.004, 0.0177), (3.522, 0.0145)),
    },
}

#: The detail check (``holds_fine_detail``): an image that resampling to DETAIL_PROBE_SCALE and back
#: (Lanczos, as encoder and decoder resize) leaves under MIN_RESAMPLING_PSNR holds small text or fine
#: lines, which the rules fitted on photos above would blur or redraw: downscaling shrinks the strokes
#: and rounding toward zero drops the small coefficients that draw them. Such an image is coded by
#: ``HIGH_RATE_MODEL`` with plain rounding, whole, but for a rate target under DETAILED_WHOLE_BPP, where it is
#: coded at DETAILED_SCALE: there the coarse step of the whole image breaks letters up more than the
#: resampling does. At the same bytes taesd reads small text better below DETAILED_HIGH_RATE_BPP, so a rate
#: target keeps taesd there. Both chosen on 6 text cards that no benchmark reports (``benchmarks/fidelity.py
#: --choice-cards 6``; docs/fidelity/text_rules), OCR of 19-28 / 15-18 / 10-14 px lines: at 0.15 bpp taesd
#: 0.72 / 0.43 / 0.26, taesd3 at 0.75 0.67 / 0.41 / 0.21; at 0.175 0.76 / 0.43 / 0.25 against 0.83 / 0.53 /
#: 0.21; at 0.2 0.77 / 0.46 / 0.23 against 0.90 / 0.59 / 0.28 (whole: 0.75 / 0.64 / 0.27); at 0.25 taesd3
#: at 0.75 0.91 / 0.77 / 0.30, whole 0.84 / 0.76 / 0.38; at 0.3 whole 0.94 / 0.85 / 0.51, at 0.75 0.92 /
#: 0.85 / 0.39. At the same quality taesd3 reads text far better (taesd redraws letters at any quality:
#: on the held-out text cards at quality 85, 15-18 px lines read 0.44 against 0.98; docs/fidelity/quality),
#: so a quality switches where a photo's does, and codes the image whole.
#: At 0.625, 6 text cards (training photos outside every held-out set with 10-28 px lines, as
#: benchmarks/fidelity.py makes them) keep 20.8-22.5 dB, the 10 photos of docs/scale_per_rate
#: 24.3-41.4 dB (9 of 10 from 28.2).
DETAIL_PROBE_SCALE = 0.625
MIN_RESAMPLING_PSNR = 27.0
DETAILED_HIGH_RATE_BPP = 0.175
DETAILED_WHOLE_BPP = 0.30
DETAILED_SCALE = 0.75
#: An image that the same resampling leaves under TEXT_RESAMPLING_PSNR is mostly small text (``detail_psnr``
#: of 12 text cards made from training photos as benchmarks/fidelity.py makes them: 20.6-22.6 dB; of the
#: 667 training photos outside the held-out sets, 6 are under 23 dB; of the 36 held-out photos and the 24
#: Kodak photos, none, the lowest at 23.0 and 25.7). A quality codes such an image with
#: ``HIGH_RATE_MODEL`` (whole, plain rounding) at every quality, not only from ``HIGH_RATE_BPP``: on the
#: held-out text cards at qualities 40, 50 and 60, 19-28 px text reads 0.82 / 0.86 / 0.87 against 0.37 /
#: 0.69 / 0.61 with taesd, for 1.9-2.2x the bytes (docs/fidelity/quality).
TEXT_RESAMPLING_PSNR = 23.0
RESAMPLING_BAND = 256  # rows compared at once, bounding the memory on large images

#: automatic scaling never makes the shorter side smaller than this
MIN_CODED_SIDE = 64


def coder_for(options: EncodeOptions, model: str) -> str:
    """The coder named, else ``model``'s default; ``ValueError``/``OSError`` now if it cannot serve."""
    coder = options.coder or coders.default_coder(model)
    coders.check_coder(coder, get_spec(model).channels)
    return coder


class Detail(enum.IntEnum):
    """What the detail check (``detail_of``) found in an image; each level includes the one below."""

    NONE = 0
    FINE = 1  # small text or fine lines: MIN_RESAMPLING_PSNR
    TEXT = 2  # mostly small text: TEXT_RESAMPLING_PSNR


def detail_of(resampled_psnr: float) -> Detail:
    """The detail level of an image whose ``detail_psnr`` is ``resampled_psnr``."""
    if resampled_psnr < TEXT_RESAMPLING_PSNR:
        return Detail.TEXT
    return Detail.FINE if resampled_psnr < MIN_RESAMPLING_PSNR else Detail.NONE


def model_for_rate(options: EncodeOptions, width: int, height: int, detail: Detail = Detail.NONE) -> str:
    """The named model; else the one that wins at the requested rate or quality (see ``HIGH_RATE_MODEL``;
    for a rate target, an image with fine ``detail`` switches at DETAILED_HIGH_RATE_BPP; for a quality,
    an image of mostly text takes it at every quality),
    unless the coder named cannot code that model's latents. A quality's rate is the mean rate its step
    gives ``options.model`` (``quality_bpp``)."""
    if options.model_fixed or not coders.codes_channels(options.coder, get_spec(HIGH_RATE_MODEL).channels):
        return options.model
    bpp = requested_bpp(options, width, height)
    if bpp is None:
        quality = options.quality or quantize.DEFAULT_QUALITY
        high = quality >= HIGH_RATE_QUALITY or quality_bpp(quality, options.model) >= HIGH_RATE_BPP
        return HIGH_RATE_MODEL if detail is Detail.TEXT or high else options.model
    return HIGH_RATE_MODEL if bpp >= (DETAILED_HIGH_RATE_BPP if detail else HIGH_RATE_BPP) else options.model


def may_pick_high_rate_model(options: EncodeOptions, width: int, height: int) -> bool:
    """Whether the detail check can change anything: the high-rate model is named, picked for an
    image without fine detail, or picked for one of mostly text (a quality)."""
    return HIGH_RATE_MODEL in (model_for_rate(options, width, height),
                               model_for_rate(options, width, height, Detail.TEXT))


def detail_psnr(image: Image.Image) -> float:
    """The detail check's measure: ``image`` resampled to DETAIL_PROBE_SCALE and back, PSNR."""
    return resampling_psnr(image, DETAIL_PROBE_SCALE)


def holds_fine_detail(image: Image.Image) -> bool:
    """Whether ``image`` holds small text or fine lines (see ``MIN_RESAMPLING_PSNR``)."""
    return detail_of(detail_psnr(image)) >= Detail.FINE


def quality_bpp(quality: int, model: str) -> float:
    """The mean rate (``RATE_CURVES``) of ``model``'s whole image at ``quality``'s step."""
    return mean_bpp(model, 1.0, quantize.step_for_quality(quality))


def step_for_quality(quality: int, options: EncodeOptions) -> float:
    """The whole-image step for ``quality``: ``quantize.step_for_quality``, except where the
    high-rate model was picked for a quality. From ``HIGH_RATE_QUALITY`` up it has its own steps;
    below, the step that gives it the rate the quality gives the default model, so quality keeps
    meaning "higher is better" and the same rate whichever model codes it."""
    picked = not options.model_fixed and options.model == HIGH_RATE_MODEL
    if not picked:
        return quantize.step_for_quality(quality)
    if quality < HIGH_RATE_QUALITY:
        return step_for_rate(HIGH_RATE_MODEL, 1.0, quality_bpp(quality, DEFAULT_MODEL))
    coarse, fine = HIGH_RATE_STEPS
    t = (quality - HIGH_RATE_QUALITY) / (100 - HIGH_RATE_QUALITY)
    return float(coarse * (fine / coarse) ** t)


def scale_for_rate(options: EncodeOptions, width: int, height: int, detail: Detail = Detail.NONE) -> float:
    """``scale`` if given; else, for a model in ``BPP_SCALES``, the scale that wins at the requested rate
    (for the high-rate model on an image with fine ``detail``, the one that keeps text).

    A quality's rate is the mean rate its step gives at full size (``RATE_CURVES``), so that
    quality and ``bpp`` pick the same scale for the same rate.
    """
    if options.scale is not None:
        return options.scale
    if options.model not in BPP_SCALES:
        return 1.0
    bpp = requested_bpp(options, width, height)
    if detail and options.model == HIGH_RATE_MODEL:
        if bpp is None or bpp >= DETAILED_WHOLE_BPP:
            return 1.0
        scale = DETAILED_SCALE
    else:
        if bpp is None:
            step = step_for_quality(options.quality or quantize.DEFAULT_QUALITY, options)
            bpp = mean_bpp(options.model, 1.0, step)
        scale = next((scale for below, scale in BPP_SCALES[options.model] if bpp < below), 1.0)
    return min(1.0, max(scale, MIN_CODED_SIDE / min(width, height)))


def resampling_psnr(image: Image.Image, scale: float) -> float:
    """PSNR of ``image``'s colour (or grey) against itself resized to ``scale`` and back, as encoder and
    decoder resize."""
    size = scaled_size(image.width, image.height, scale)
    if size is None:
        return math.inf
    image = image if image.mode in ("RGB", "L") else image.convert("RGB")
    resampling = container.RESAMPLING[container.LANCZOS]
    back = image.resize(size, resampling).resize(image.size, resampling)
    original, returned = np.asarray(image), np.asarray(back)
    squared = sum(float(np.square(original[y : y + RESAMPLING_BAND].astype(np.int32)
                                  - returned[y : y + RESAMPLING_BAND]).sum())
                  for y in range(0, image.height, RESAMPLING_BAND))
    mse = squared / original.size
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


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
    return step if scale == 1 else step_for_rate(model, scale, mean_bpp(model, 1.0, step))


def step_for_rate(model: str, scale: float, bpp: float) -> float:
    """The step whose mean rate (``mean_bpp``) at ``scale`` is ``bpp``, within quality's steps and
    rate control's coarsest."""
    wanted = math.log(bpp)
    low, high = math.log(quantize.MIN_STEP), math.log(RATE_STEPS[1])  # the rate falls as the step grows
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if math.log(mean_bpp(model, scale, math.exp(middle))) > wanted else (low, middle)
    return math.exp((low + high) / 2)


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


#: a ``fit_rate`` guess that misses is bracketed with a step this factor coarser or finer: a refined latent's file at
#: the guess is within a few percent of the target, about a third of the size change that factor makes
GUESS_SPAN = 1.1


def fit_rate(file_for: Callable[[float], bytes], target: int, guess: float | None = None) -> tuple[bytes, float]:
    """The file whose size is within 3% under ``target`` bytes, and its step.

    Size falls off roughly as a power of the step, so the search is regula falsi on log(size)
    against log(step) (Illinois variant, which keeps both ends of the bracket moving), aiming at
    the middle of the window. A ``guess`` (the step that fitted a latent before refinement) is tried
    first; where it misses, the search starts from it and a step ``GUESS_SPAN`` beyond it if those two
    bracket the target, else from the ends of ``RATE_STEPS``.
    Never returns a file over ``target``; ``ValueError`` when even the coarsest
    step does not fit (the header and metadata alone may be too big).
    """
    if guess is not None:
        near = file_for(guess)
        if _fits(near, target):
            return near, guess
        beyond = guess * GUESS_SPAN if len(near) > target else guess / GUESS_SPAN
        fine_end, coarse_end = sorted([(np.log(guess), guess, near), (np.log(beyond), beyond, file_for(beyond))])
        if len(fine_end[2]) > target >= len(coarse_end[2]):
            return _illinois(file_for, target, fine_end, coarse_end)
    fine, coarse = np.log(RATE_STEPS[0]), np.log(RATE_STEPS[1])  # fine step: big file; coarse: small
    best = file_for(float(np.exp(coarse)))
    if len(best) > target:
        raise ValueError(f"cannot fit this image in {target} bytes: the smallest file is {len(best)} bytes")
    finest = file_for(float(np.exp(fine)))
    if len(finest) <= target:
        return finest, float(np.exp(fine))
    return _illinois(file_for, target, (fine, float(np.exp(fine)), finest), (coarse, float(np.exp(coarse)), best))


def _fits(data: bytes, target: int) -> bool:
    return (1 - RATE_TOLERANCE) * target <= len(data) <= target


def _illinois(file_for: Callable[[float], bytes], target: int, fine_end: tuple[float, float, bytes],
              coarse_end: tuple[float, float, bytes]) -> tuple[bytes, float]:
    """``fit_rate``'s search between two ends (log step, step, file): the finer one's file over ``target``, the
    coarser one's not."""
    (fine, _, finest), (coarse, coarse_step, best) = fine_end, coarse_end
    if _fits(best, target):
        return best, coarse_step
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
            coarse, f_coarse, best, coarse_step = middle, f_middle, data, float(np.exp(middle))
            if _fits(data, target):
                break
            f_fine = f_fine / 2 if kept == 1 else f_fine
            kept = 1
    return best, coarse_step
