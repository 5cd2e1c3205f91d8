"""Encode and decode orchestration: image -> latent -> symbols -> bytes and back, for the plugin, the CLI and
the batch functions.

Everything that can refuse an image or a file does so before the one expensive step, the network.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np
from PIL import Image

from . import faces, rate
from .core import coders, container, quantize
from .core.container import DamagedFileError, Header, Layout
from .core.modes import alpha_chunk, alpha_plane, finish_mode, working_image
from .core.read import file_quantizer, latent_from_layout, open_binary, read_checked_layout
from .core.registry import REGISTRY, get_spec
from .enhance import effort
from .options import DecodeOptions, EncodeOptions, metadata_from


class DigestMismatchError(OSError):
    """The decoder weights at hand are not the ones the file was written with."""


#: ``_EncodeJob.step_without_growth``: the base step is searched up to this multiple of the quality's step, in
#: this many halvings (to 0.01% of the step)
GROWTH_BRACKET, GROWTH_SEARCH_STEPS = 4.0, 14


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
    detailed: bool  # coded by the rules that keep small text (rate.holds_fine_detail, where it could matter)
    fine_detail: Callable[[], bool]  # rate.holds_fine_detail of the image, checked once when first asked
    regions: tuple[container.Region, ...]  # the faces, coded with finer steps

    @property
    def coded_scale(self) -> float:
        """The file's coded scale as its reader will measure it (``pipeline.coded_scale``)."""
        return scale_of(self.coded_size, self.image.width)

    def quantizer_at(self, step: float, channels: int, regions: tuple[container.Region, ...]) -> quantize.Quantizer:
        """The encoder's quantizer at base ``step`` with these finer ``regions``."""
        return replace(quantize.quantizer_for(self.options.model, step, channels, self.detailed), regions=regions)

    def stored_as(self, step: float, latent: np.ndarray) -> tuple[quantize.Quantizer, bool]:
        """The quantizer a file of ``latent`` at ``step`` is stored with, and whether that file says not to run
        the restoration: where the one that would run redraws small text (``restore.redraws_text``), fine
        detail turns it off."""
        from .enhance.restore import redraws_text

        quantizer = self.quantizer_at(step, latent.shape[0], self.regions)
        redraws = redraws_text(self.options.model, max(quantizer.steps), self.coded_scale)
        return quantizer, redraws and self.fine_detail()

    def refined(self, latent: np.ndarray, quantizer: quantize.Quantizer, no_restoration: bool) -> np.ndarray:
        """The effort's latent for the file ``stored_as`` describes, optimised through what the reader will run
        on it: the latent restorer where it runs, and the restoring decoder where one serves the file. At effort 0
        only the faces' latents are refined (``effort.refine_regions``), where there are faces and torch."""
        if not self.options.effort and not (quantizer.regions and effort.available()):
            return latent  # the encoder's latent, without reading the restoring decoder for nothing
        from .enhance.restore import restores_latent, restoring_decoder

        largest = max(quantizer.steps)
        model = self.model if no_restoration else restoring_decoder(self.model, largest, self.coded_scale)
        restored = not no_restoration and restores_latent(self.options.model, largest, self.coded_scale)
        if not self.options.effort:
            return effort.refine_regions(model, latent, self.rgb, quantizer, restored=restored)
        return effort.refine_latent(model, latent, self.rgb, quantizer, self.options.effort, restored=restored)

    def file_for(self, latent: np.ndarray, step: float) -> bytes:
        return self.serialized(latent, *self.stored_as(step, latent))

    def serialized(self, latent: np.ndarray, quantizer: quantize.Quantizer, no_restoration: bool) -> bytes:
        symbols = quantizer.quantize(latent)
        coder = coders.get_coder(self.options.coder)
        coder_params, payload = coder.encode(symbols)
        header = Header(
            width=self.image.width, height=self.image.height, original_mode=self.image.mode,
            mode=self.stored_mode, model=self.options.model, decoder_digest=self.model.decoder_digest,
            latent_shape=symbols.shape, quantizer=quantizer.name, quantizer_params=quantizer.to_params(),
            coder=coder.name, coder_params=coder_params, payload_length=len(payload),
            coded_size=self.coded_size, flags=container.FLAG_NO_RESTORATION if no_restoration else 0,
        )
        return container.serialize(header, payload, self.metadata, self.alpha, quantizer.regions)

    def step_without_growth(self, latent: np.ndarray, step: float, stored: np.ndarray | None = None) -> float:
        """For a quality: the base step at which the symbols of ``stored`` (default ``latent``; the refined latent
        once its faces are refined) with the finer regions are about as costly as those of ``latent`` without them
        at ``step``, so that a quality means about the same file size with or without faces (they take their bytes
        from the rest of the picture, as under a rate target). The cost is the estimate
        ``sum(log2(1 + 2|symbol|))``, a quantization each, instead of entropy coding each candidate."""
        def cost(values: np.ndarray, candidate: float, regions: tuple[container.Region, ...]) -> float:
            symbols = self.quantizer_at(candidate, values.shape[0], regions).quantize(values)
            return float(np.log2(1 + 2 * np.abs(symbols)).sum())

        stored = latent if stored is None else stored
        goal, fine, coarse = cost(latent, step, ()), math.log(step), math.log(step * GROWTH_BRACKET)
        for _ in range(GROWTH_SEARCH_STEPS):
            middle = (fine + coarse) / 2
            fine, coarse = (middle, coarse) if cost(stored, math.exp(middle), self.regions) > goal else (fine, middle)
        return math.exp(coarse)

    def finish(self, latent: np.ndarray) -> bytes:
        """Choose the step (quality or rate control), spend the effort, serialize."""
        options = self.options
        target = rate.rate_target(options, self.image.width, self.image.height)
        if target is None:
            quality_step = rate.step_for_quality(options.quality or quantize.DEFAULT_QUALITY, options)
            step = rate.step_at_scale(quality_step, self.scale, options.model)
            stored = self.stored_as(self.step_without_growth(latent, step) if self.regions else step, latent)
            refined = self.refined(latent, *stored)
            if self.regions and refined is not latent:  # the refined faces cost more symbols: the rest pays too
                stored = self.stored_as(self.step_without_growth(latent, step, refined), refined)
            return self.serialized(refined, *stored)
        data, step = rate.fit_rate(lambda step: self.file_for(latent, step), target)
        refined = self.refined(latent, *self.stored_as(step, latent))
        if refined is not latent:
            data, _ = rate.fit_rate(lambda step: self.file_for(refined, step), target, guess=step)
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
        alpha = alpha_chunk(work)

    from .models import WeightsNotFoundError, load_model

    full_size = work
    probed = functools.cache(lambda: rate.detail_psnr(full_size))  # two resamplings: only if asked

    def fine_detail() -> bool:
        return rate.detail_of(probed()) >= rate.Detail.FINE

    detail = rate.Detail.NONE
    if rate.may_pick_high_rate_model(options, width, height):
        detail = rate.detail_of(probed())
    chosen = rate.model_for_rate(options, width, height, detail)
    coder = rate.coder_for(options, chosen)
    try:
        model = load_model(chosen, weights=options.weights, device=options.device)
    except WeightsNotFoundError:
        if chosen == options.model:
            raise
        warnings.warn(f"no weights for {chosen!r}, which codes this rate best; using {options.model!r}",
                      stacklevel=4)
        chosen = options.model
        coder = rate.coder_for(options, chosen)
        model = load_model(chosen, weights=options.weights, device=options.device)
    options = replace(options, model=chosen, coder=coder)
    coded = rate.scaled_size(width, height, rate.scale_for_rate(options, width, height, detail))
    regions: tuple[container.Region, ...] = ()
    if options.faces:
        regions = faces.face_regions(faces.face_boxes(work), (width, height), coded or (width, height))
    scale = 1.0
    if coded is not None:  # the scale rounding left, for the step
        scale = math.sqrt(coded[0] * coded[1] / (width * height))
        colour = work if work.mode in ("RGB", "L") else work.convert("RGB")
        work = colour.resize(coded, container.RESAMPLING[container.LANCZOS])
    return _EncodeJob(image, options, metadata, stored_mode, alpha, padded_rgb(work), model, scale, coded,
                      detail >= rate.Detail.FINE, fine_detail, regions)


def closer_of_trial(image: Image.Image, info: dict[str, Any] | None, job: _EncodeJob, data: bytes) -> bytes:
    """From effort ``rate.TRIAL_EFFORT`` up, with no model named: code the image with the other model of
    ``rate.TRIAL_MODELS`` too, at the same rate target (for a quality: in at most ``len(data)`` bytes), decode
    both and keep the file whose picture has the higher PSNR, a distortion that a rewritten face or
    letter cannot hide from. The file records the model it was coded with."""
    options = job.options
    if options.model_fixed or options.effort < rate.TRIAL_EFFORT or options.model not in rate.TRIAL_MODELS:
        return data
    rival_info = {**(info or {}), "model": next(model for model in rate.TRIAL_MODELS if model != options.model)}
    if rate.rate_target(options, image.width, image.height) is None:
        rival_info = {k: v for k, v in rival_info.items() if k != "quality"} | {"max_bytes": len(data)}
    try:
        rival = encode_image(image, rival_info)
    except (OSError, ValueError):  # no weights for it, its coder cannot serve, or it cannot fit the bytes
        return data
    reference = np.asarray(image.convert("RGB"), dtype=np.float64)

    def squared_error(candidate: bytes) -> float:  # in float32, so that the choice is the same on every CPU
        decoded = decode_file(candidate, precision="float32").convert("RGB")
        return float(np.mean((np.asarray(decoded, dtype=np.float64) - reference) ** 2))

    return min((data, rival), key=squared_error)


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
                 progress: bool = False, **options: Any) -> list[Image.Image]:
    """Decode many files with each model loaded once and same-shaped latents decoded together.

    ``options`` are ``DecodeOptions``' fields, checked before the first file is read.
    """
    decode_options = DecodeOptions.from_mapping(options)
    prepared = []
    for source in sources:
        with open_binary(source) as fp:
            layout = read_checked_layout(fp)
            prepared.append((layout, *_decoder_input(fp, layout, decode_options)))
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


def coded_scale(header: Header) -> float:
    """The fraction of the image's size its latent was coded at (1: whole)."""
    return scale_of(header.coded_size, header.width)


def scale_of(coded_size: tuple[int, int] | None, width: int) -> float:
    """The coded scale as the reader measures it, so that the encoder's choices (the no-restoration flag)
    and the reader's pick the same restoration."""
    return 1.0 if coded_size is None else coded_size[0] / width


def decoder_for(layout: Layout, options: DecodeOptions) -> Any:
    """Load the decoder a file needs (or the compatible one ``options.model`` asks for), check its digest,
    take its restoring decoder where it has one (``enhance.restore``), and pick its arithmetic
    (``options.precision``)."""
    header, model = layout.header, options.model
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

    decoder = load_model(name, weights=options.weights, device=options.device)
    if name == header.model and decoder.decoder_digest != header.decoder_digest:
        message = (
            f"the {name!r} decoder weights found ({decoder.decoder_digest.hex()[:12]}) are not the "
            f"ones this file was written with ({header.decoder_digest.hex()[:12]}); the image may "
            "look wrong. Pass allow_digest_mismatch=True to decode anyway."
        )
        if not options.allow_digest_mismatch:
            raise DigestMismatchError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    if restores(layout, options):
        from .enhance import restore

        decoder = restore.restoring_decoder(decoder, max(file_quantizer(header).steps), coded_scale(header))
    return decoder.decoding_in(options.precision)


def restores(layout: Layout, options: DecodeOptions) -> bool:
    """Whether the decoder-side restoration may run: asked for, and not turned off by the file (fine detail)."""
    return options.restore and not layout.header.flags & container.FLAG_NO_RESTORATION


def decode_layout(fp: IO[bytes], layout: Layout, options: DecodeOptions, *,
                  allow_truncated: bool = False) -> Image.Image:
    """Decode an opened file into a Pillow image of the header's mode.

    Everything that can refuse the file (payload, alpha plane, weights) is
    checked before the decoder runs, the one expensive step. ``options.restore``
    and ``options.denoise`` choose the decoder-side restoration (see ``clean_latent``).
    """
    latent, alpha, decoder = _decoder_input(fp, layout, options, allow_truncated=allow_truncated)
    return finish_mode(full_size(decoder.decode_image(latent), layout.header), layout, alpha)


def _decoder_input(fp: IO[bytes], layout: Layout, options: DecodeOptions, *,
                  allow_truncated: bool = False) -> tuple[np.ndarray, bytes | None, Any]:
    """The cleaned latent, the alpha plane (alpha modes) and the decoder of an opened file."""
    latent = latent_from_layout(fp, layout, allow_truncated)
    alpha = alpha_plane(layout) if layout.header.mode in container.ALPHA_MODES else None
    decoder = decoder_for(layout, options)
    return clean_latent(latent, layout, decoder, options), alpha, decoder


def clean_latent(latent: np.ndarray, layout: Layout, decoder: Any, options: DecodeOptions) -> np.ndarray:
    """Remove quantization noise before the decoder.

    ``options.denoise``: a Stable Diffusion 1.x model (hub id, folder or file) whose UNet
    denoises for a few steps, the original method (opt-in: it needs SD's weights).
    Otherwise, with ``options.restore`` (the default), the package's own restorer runs
    where it was measured to help at the file's step.
    """
    step = max(file_quantizer(layout.header).steps)
    if options.denoise:
        if decoder.spec.latent_space != "sd1":
            raise ValueError(f"UNet denoising needs an SD 1.x latent, not a {decoder.spec.name!r} one")
        from .enhance.unet import denoise_latent

        return denoise_latent(latent, step, model=options.denoise, device=decoder.device, seed=options.seed)
    if restores(layout, options):
        from .enhance import restore as restorer

        if restorer.restores_latent(decoder.spec.name, step, coded_scale(layout.header)):
            steps = restorer.restorer_steps(step, layout.regions, *latent.shape[1:])
            return restorer.restore_latent(latent, steps, decoder.spec.name)
    return latent


def decode_file(source: str | os.PathLike | IO[bytes] | bytes, **options: Any) -> Image.Image:
    """Decode a whole file (path, file object or bytes) to a loaded Pillow image.

    ``options`` are ``DecodeOptions``' fields; ``ValueError`` for an unknown or bad one, before the file is read.
    """
    decode_options = DecodeOptions.from_mapping(options)
    with open_binary(source) as fp:
        layout = read_checked_layout(fp)
        image = decode_layout(fp, layout, decode_options)
    image.info.update(layout.metadata)
    return image
