"""Encoder effort: spend time to find a better latent than the encoder's for the same rate.

The encoder's latent is not the one whose *quantized* version decodes best. With
effort > 0 the latent is optimised by gradient steps through the (frozen)
decoder on the pixel reconstruction error of its quantized version, using
straight-through rounding at the step that will be used to store it. At every
effort, the faces coded with finer steps (``QREG`` regions) get the same treatment
on their own pixels (``refine_regions``): a face is where a redrawn detail matters most.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

#: Adam iterations for each effort level (0 = the encoder's latent as it is).
ITERATIONS = {0: 0, 1: 8, 2: 24, 3: 64}
MAX_EFFORT = max(ITERATIONS)
#: Adam iterations on each face region (``refine_regions``), its learning rate as a fraction of the region's step,
#: and the latent positions decoded around it, so that the decoder (and the latent restorer) see the face's
#: surroundings. Chosen on 14 training photos with faces outside every held-out split at 0.15 and 0.1 bpp
#: (benchmarks/face_steps.py --refinements, docs/fidelity/faces/README.md, "Faces refined for their stored step")
REGION_ITERATIONS, REGION_LEARNING_RATE, REGION_CONTEXT = 8, 0.1, 6
#: at most this many latent positions of windows are refined per image (a 512x512-pixel decode in all, about 13 s
#: on two CPU cores): smaller faces first, those past the budget keep the encoder's latent. It bounds the time and
#: the memory of a default save however many or large the faces.
REGION_BUDGET = 64 * 64


def available() -> bool:
    """Whether effort can run here: it needs torch and diffusers (``pillow_sdlatent[torch]``), found without
    importing them."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))


def refine_latent(model: object, latent: np.ndarray, rgb: np.ndarray, step: float | Any, effort: int,
                  distance: Callable[[Any, Any], Any] | None = None, restored: bool = True) -> np.ndarray:
    """Return a latent (same shape) whose quantization at ``step`` decodes closer to ``rgb``.

    ``step`` is a uniform step, or the quantizer (``quantize.UniformQuantizer``/``KltQuantizer``)
    that will store the latent, so that the rounding optimised against is the one the file gets.
    ``rgb`` is the (8h, 8w, 3) uint8 image the latent was encoded from (already padded).
    ``distance(decoded, target)``, both (1, 3, H, W) in [-1, 1], is an optional differentiable
    perceptual term added to the squared error, each divided by its value at the first step. The
    codec passes none; ``benchmarks/perceptual_effort.py`` measures one. ``restored``: whether the
    reader will run the restorer where it is on at this step (a file may say not to; see
    ``container.FLAG_NO_RESTORATION``), so that the latent is optimised for the decode it will get.
    Deterministic for a given device: no randomness, a fixed iteration count.
    """
    iterations = ITERATIONS[effort]
    if iterations == 0:
        return latent
    import torch

    from . import restore

    target = _pixels(rgb, model.device)  # type: ignore[attr-defined]
    z = torch.from_numpy(np.ascontiguousarray(latent))[None].to(target.device).float()
    round_st = _straight_through(step)
    regions = () if isinstance(step, (int, float)) else step.regions
    step = step if isinstance(step, (int, float)) else max(step.steps)  # the decoder's restorer gate
    decode = _pipeline(model, step, restored)(restore.restorer_steps(step, regions, *latent.shape[1:]))
    first: list[float] = []

    def loss_of(values: torch.Tensor) -> torch.Tensor:
        decoded = decode(round_st(values))
        terms = [torch.mean((decoded - target) ** 2)]
        if distance is None:
            return terms[0]
        terms.append(distance(decoded.clamp(-1, 1), target).mean())
        first[:] = first or [max(t.item(), 1e-12) for t in terms]
        return sum(t / f for t, f in zip(terms, first, strict=True))

    return _descend(z, loss_of, iterations, 0.1 * step)[0].cpu().numpy()


def refine_regions(model: object, latent: np.ndarray, rgb: np.ndarray, quantizer: Any,
                   restored: bool = True) -> np.ndarray:
    """``latent`` with the positions of each of ``quantizer.regions`` refined as ``refine_latent`` refines a
    whole latent, on that region's pixels alone.

    Effort 0's share of effort, for faces: at 0.15 bpp the encoder's latent of a face, finer steps and all, is
    still redrawn with other eyes and mouths; refined for its quantized version it decodes closer to the
    face (+0.95 dB on the face crops of the choice photos) while the rest of the picture keeps the encoder's
    latent. Each region is decoded with ``REGION_CONTEXT`` positions around it, a small part of the picture:
    1-3 s for a photo with a face or two on two CPU cores, at most ``REGION_BUDGET``'s. Arguments as
    ``refine_latent``'s, with the storing quantizer; deterministic for a given device.
    """
    import torch

    from . import restore

    target = _pixels(rgb, model.device)  # type: ignore[attr-defined]
    refined = torch.from_numpy(np.array(latent, dtype=np.float32))[None].to(target.device)  # a copy: changed in place
    round_st = _straight_through(quantizer)
    step = max(quantizer.steps)
    steps = restore.restorer_steps(step, quantizer.regions, *latent.shape[1:])
    decoding = _pipeline(model, step, restored)
    budget = REGION_BUDGET
    for region, window in sorted(_windows(quantizer.regions, *latent.shape[1:]), key=lambda item: _area(item[1])):
        budget -= _area(window)
        if budget < 0:
            break
        decode = decoding(steps if isinstance(steps, float) else steps[window])
        _refine_region(refined, region, window, decode, round_st, target,
                       REGION_LEARNING_RATE * step * region.factor)
    return refined[0].cpu().numpy()


def _windows(regions: tuple[Any, ...], height: int, width: int) -> list[tuple[Any, tuple[slice, slice]]]:
    """Each region with its window: its (rows, columns) and ``REGION_CONTEXT`` positions around it."""
    return [(region, (slice(max(0, region.y0 - REGION_CONTEXT), min(height, region.y1 + REGION_CONTEXT)),
                      slice(max(0, region.x0 - REGION_CONTEXT), min(width, region.x1 + REGION_CONTEXT))))
            for region in regions]


def _area(window: tuple[slice, slice]) -> int:
    rows, columns = window
    return (rows.stop - rows.start) * (columns.stop - columns.start)


def _refine_region(refined: Any, region: Any, window: tuple[slice, slice], decode: Callable[[Any], Any],
                   round_st: Callable[[Any], Any], target: Any, learning_rate: float) -> None:
    """``region``'s positions of ``refined`` (1, C, H, W), refined in place for its pixels of ``target``, decoding
    only ``window`` (rows, columns) of the quantized latent."""
    import torch

    rows, columns = window
    inside = (..., slice(region.y0, region.y1), slice(region.x0, region.x1))
    face = target[..., 8 * region.y0:8 * region.y1, 8 * region.x0:8 * region.x1]
    top, left = 8 * (region.y0 - rows.start), 8 * (region.x0 - columns.start)

    def loss_of(values: torch.Tensor) -> torch.Tensor:
        z = refined.clone()
        z[inside] = values
        decoded = decode(round_st(z)[..., rows, columns])
        return torch.mean((decoded[..., top:top + face.shape[2], left:left + face.shape[3]] - face) ** 2)

    refined[inside] = _descend(refined[inside], loss_of, REGION_ITERATIONS, learning_rate)


def _pixels(rgb: np.ndarray, device: str) -> Any:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1] on ``device``, as the decoder's output."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(device).float() / 127.5 - 1


def _descend(start: Any, loss_of: Callable[[Any], Any], iterations: int, learning_rate: float) -> Any:
    """Adam from ``start`` on ``loss_of`` for ``iterations`` steps; the values with the lowest loss seen (the start
    included), detached."""
    import torch

    values = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([values], lr=learning_rate)
    best, best_loss = values.detach().clone(), float("inf")
    for _ in range(iterations):
        loss = loss_of(values)
        if loss.item() < best_loss:
            best, best_loss = values.detach().clone(), loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return best


def _straight_through(step: float | Any) -> Callable[[Any], Any]:
    """z -> the latent the file will hold in the forward pass, identity gradient in the backward pass.

    The forward value comes from the storing quantizer's own ``quantize`` and ``dequantize`` (a
    uniform one for a plain ``step``), so its rounding and transform are the file's exactly.
    """
    import torch

    from ..core import quantize

    def stored(z: Any) -> Any:
        latent = z.detach()[0].cpu().numpy()
        quantizer = quantize.UniformQuantizer.with_step(step, len(latent)) if isinstance(step, (int, float)) else step
        return torch.from_numpy(quantizer.dequantize(quantizer.quantize(latent)))[None].to(z.device)

    return lambda z: z + (stored(z) - z).detach()


def _pipeline(model: object, step: float, restored: bool) -> Callable[[float | np.ndarray], Callable[[Any], Any]]:
    """What the decoder side will run on the dequantized latent: the restorer where it is on by default at
    the file's base ``step`` (and ``restored``), then the decoder; optimising against the decoder alone made
    effort worse than none at those steps (the restorer then corrects errors the refinement already fixed),
    and optimising through a restorer the reader skips made small text worse.

    Returns ``at(steps)`` -> ``decode(z)``: the networks are made ready once (a float32 copy of a half-precision
    decoder, the restorer on the model's device), and ``steps`` (``restore.restorer_steps``: the step, or a
    plane of each position's, or a window of it) is bound per latent decoded."""
    import torch

    from . import restore

    decode = _decoder_fn(model)
    name = model.spec.name  # type: ignore[attr-defined]
    if not restored or not restore.has_restorer(name, step):
        return lambda steps: decode
    device = torch.device(model.device)  # type: ignore[attr-defined]
    net = restore.restorer_net(name)  # shared, on the CPU: a copy goes to the model's device
    if next(net.parameters()).device != device:
        net = copy.deepcopy(net).to(device)

    def at(steps: float | np.ndarray) -> Callable[[Any], Any]:
        level = torch.from_numpy(restore.step_input(steps)).to(device)
        return lambda z: decode(net(z, level))

    return at


def _decoder_fn(model: object):
    """Differentiable decode in float32 with the codec's latent convention."""
    import torch

    module = model.module  # type: ignore[attr-defined]
    if next(module.parameters()).dtype != torch.float32:
        module = copy.deepcopy(module).float()  # the shared half-precision model stays as it is
    family = model.spec.family  # type: ignore[attr-defined]

    def decode(z: torch.Tensor) -> torch.Tensor:
        if family == "kl":
            config = module.config
            z = z / config.scaling_factor + (config.shift_factor or 0.0)
        return module.decode(z).sample

    return decode
