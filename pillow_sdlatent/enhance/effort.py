"""Encoder effort: spend time to find a better latent than the encoder's for the same rate.

The encoder's latent is not the one whose *quantized* version decodes best. With
effort > 0 the latent is optimised by gradient steps through the (frozen)
decoder on the pixel reconstruction error of its quantized version, using
straight-through rounding at the step that will be used to store it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

#: Adam iterations for each effort level (0 = the encoder's latent as it is).
ITERATIONS = {0: 0, 1: 8, 2: 24, 3: 64}
MAX_EFFORT = max(ITERATIONS)


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

    device = model.device  # type: ignore[attr-defined]
    target = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(device).float() / 127.5 - 1
    z = torch.from_numpy(np.ascontiguousarray(latent))[None].to(device).float().requires_grad_(True)
    start = z.detach().clone()
    round_st = _straight_through(step)
    regions = () if isinstance(step, (int, float)) else step.regions
    step = step if isinstance(step, (int, float)) else max(step.steps)  # the decoder's restorer gate
    optimizer = torch.optim.Adam([z], lr=0.1 * step)
    decode = _pipeline(model, step, restore.restorer_steps(step, regions, *latent.shape[1:]), restored)
    best, best_loss, first = start, float("inf"), None
    for _ in range(iterations):
        quantized = round_st(z)
        decoded = decode(quantized)
        terms = [torch.mean((decoded - target) ** 2)]
        if distance is not None:
            terms.append(distance(decoded.clamp(-1, 1), target).mean())
        first = first or [max(t.item(), 1e-12) for t in terms]
        loss = sum(t / f for t, f in zip(terms, first, strict=True)) if distance is not None else terms[0]
        if loss.item() < best_loss:
            best, best_loss = z.detach().clone(), loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return best[0].cpu().numpy()


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


def _pipeline(model: object, step: float, steps: float | np.ndarray, restored: bool):
    """What the decoder side will run on the dequantized latent: the restorer where it is on by default at
    the file's base ``step`` (and ``restored``), given ``steps`` (``restore.restorer_steps``: that step, or
    a plane of each position's), then the decoder; optimising against the decoder alone made effort worse
    than none at those steps (the restorer then corrects errors the refinement already fixed), and
    optimising through a restorer the reader skips made small text worse."""
    import torch

    from . import restore

    decode = _decoder_fn(model)
    name = model.spec.name  # type: ignore[attr-defined]
    if not restored or not restore.has_restorer(name, step):
        return decode
    device = torch.device(model.device)  # type: ignore[attr-defined]
    net = restore.restorer_net(name)  # shared, on the CPU: a copy goes to the model's device
    if next(net.parameters()).device != device:
        net = copy.deepcopy(net).to(device)
    level = torch.from_numpy(restore.step_input(steps)).to(device)
    return lambda z: decode(net(z, level))


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
