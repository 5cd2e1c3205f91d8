"""Denoise a dequantized latent with Stable Diffusion 1.x's UNet: Matthias Bühlmann's 2022 trick.

The quantized latent is treated as a diffusion sample at a small timestep t and run down to t = 0
with the empty prompt and no guidance. The original used ``strength=0.04`` of 1000 steps with 66
inference steps (about 3 UNet evaluations) whatever the rate; here t follows the file's step instead:

* uniform quantization adds noise of standard deviation ``step / sqrt(12)`` to the (scaled) latent;
* a sample at timestep t is ``sqrt(abar_t) * (z + sigma_t * eps)`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``;
* so t is the inference-grid timestep whose ``sigma_t`` is nearest (in log) to ``step / sqrt(12)``,
  clamped to the grid's first timestep and to ``MAX_STRENGTH`` of the training timesteps (above that
  the UNet invents content instead of removing noise), and the latent is scaled by ``sqrt(abar_t)``.

With SD 1.x's schedule and 66 steps (grid 1, 16, 31, ...): step <= 0.15 -> t = 1 (1 UNet call),
0.3-0.5 -> t = 16 (3 calls), 1.0 -> t = 76 (7), 2.0 -> t = 196 (15). PLMS repeats its second timestep
(a Heun-like first step), so a start at grid index k costs k + 2 calls. ``strength=`` overrides the
mapping the original way: the largest grid timestep <= strength * 1000 (0.04 -> t = 31).

Weights: only safetensors are read (``.ckpt``/``.bin``/``.pth`` are refused). Looked up as
``models.weights`` does: an explicit path, then ``$PILLOW_SDLATENT_MODELS/<repo name>``, then the
Hugging Face cache, then the hub (skipped when ``HF_HUB_OFFLINE=1``). Needs ``transformers``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import (
    MODELS_ENV,
    PICKLE_SUFFIXES,
    LoadOnce,
    UnsafeWeightsError,
    WeightsNotFoundError,
    default_dtype,
    resolve_device,
)

#: runwayml/stable-diffusion-v1-5 was withdrawn from the hub in 2024; this is its official mirror
DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_INFERENCE_STEPS = 66
#: largest starting timestep, as a fraction of the training timesteps
MAX_STRENGTH = 0.3
SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    """What the denoiser needs from an SD 1.x checkpoint, plus the empty prompt's embedding."""

    unet: Any
    scheduler_config: dict[str, Any]
    empty_prompt: torch.Tensor
    device: str
    dtype: torch.dtype


_components = LoadOnce()


def quantization_sigma(step: float) -> float:
    """Standard deviation of uniform quantization noise with this step, in latent units."""
    return step / math.sqrt(12)


def make_scheduler(config: dict[str, Any]) -> Any:
    """PNDM in its PLMS-only form: the Runge-Kutta warm-up needs 12+ calls, far more than we make."""
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(config, skip_prk_steps=True)


def start_timestep(scheduler: Any, step: float, num_inference_steps: int, strength: float | None = None) -> int:
    """The inference-grid timestep to start from: matched to the quantization noise (module docstring)."""
    scheduler.set_timesteps(num_inference_steps)
    grid = np.unique(scheduler.timesteps.numpy())
    limit = MAX_STRENGTH * scheduler.config.num_train_timesteps
    allowed = grid[(grid <= limit) | (grid == grid[0])]
    if strength is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], not {strength!r}")
        below = grid[grid <= strength * scheduler.config.num_train_timesteps]
        return int(below[-1] if below.size else grid[0])
    abar = scheduler.alphas_cumprod.double().numpy()[allowed]
    sigma = np.sqrt((1 - abar) / abar)
    return int(allowed[np.argmin(np.abs(np.log(sigma) - math.log(quantization_sigma(step))))])


def plms_timesteps(scheduler: Any, start: int) -> list[int]:
    """Grid timesteps from ``start`` down, with the second repeated as PLMS's first (Heun) step expects."""
    grid = sorted((int(t) for t in np.unique(scheduler.timesteps.numpy()) if t <= start), reverse=True)
    return grid if len(grid) == 1 else [grid[0], grid[1], *grid[1:]]


def denoise_latent(latent: np.ndarray, step: float, *, model: str | os.PathLike = DEFAULT_SD_MODEL,
                   device: str | None = None, seed: int = 0, strength: float | None = None,
                   num_inference_steps: int = DEFAULT_INFERENCE_STEPS, added_noise: float = 0.0) -> np.ndarray:
    """(C, H, W) scaled SD latent quantized with ``step`` -> (C, H, W) float32 denoised latent.

    ``added_noise`` > 0 tops the quantization noise up with Gaussian noise of that many
    ``step / sqrt(12)`` standard deviations, drawn from ``seed`` on the CPU (so the same seed gives
    the same output on every device); the default adds none, as the original did.
    """
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, not {step!r}")
    if latent.ndim != 3:
        raise ValueError(f"expected a (C, H, W) latent, got shape {latent.shape}")
    parts = load_components(model, device)
    scheduler = make_scheduler(parts.scheduler_config)
    start = start_timestep(scheduler, step, num_inference_steps, strength)
    z = torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32))[None]
    if added_noise > 0:
        generator = torch.Generator().manual_seed(seed)
        z = z + added_noise * quantization_sigma(step) * torch.randn(z.shape, generator=generator)
    abar = float(scheduler.alphas_cumprod[start])
    sample = (math.sqrt(abar) * z).to(parts.device, parts.dtype)
    with torch.inference_mode():
        for t in plms_timesteps(scheduler, start):
            timestep = torch.tensor([t], device=parts.device)
            noise = parts.unet(sample, timestep, encoder_hidden_states=parts.empty_prompt).sample
            sample = scheduler.step(noise, t, sample).prev_sample
    return sample[0].float().cpu().numpy()


def load_components(model: str | os.PathLike = DEFAULT_SD_MODEL, device: str | None = None) -> SDComponents:
    """UNet, text encoder (used once, for the empty prompt), tokenizer and scheduler; loaded once per key."""
    resolved_device = resolve_device(device)
    models_dir = os.environ.get(MODELS_ENV, "")
    key = (os.fspath(model), models_dir, resolved_device)
    return _components.get(key, lambda: _load(os.fspath(model), models_dir, resolved_device))


def _load(model: str, models_dir: str, device: str) -> SDComponents:
    path = Path(model)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeightsError(f"refusing to load {path}: {path.suffix} files are pickles that can run code; "
                                 "convert them to .safetensors")
    try:
        import transformers  # noqa: F401 - CLIPTextModel and CLIPTokenizer live there
    except ImportError:
        raise ImportError("UNet denoising needs the transformers package: pip install transformers") from None
    tried: list[str] = []
    if path.exists():
        loaded = _from_single_file(path) if path.is_file() else _from_folder(path)
        if loaded is not None:
            return _finish(*loaded, device)
        tried.append(f"model argument: {path} (needs {', '.join(SUBFOLDERS)} subfolders with safetensors)")
    else:
        name = model.rstrip("/").split("/")[-1]
        if models_dir:
            folder = Path(models_dir) / name
            loaded = _from_folder(folder) if folder.is_dir() else None
            if loaded is not None:
                return _finish(*loaded, device)
            tried.append(f"${MODELS_ENV}: {folder}")
        else:
            tried.append(f"${MODELS_ENV}: not set")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        for local_only in [True] if offline else [True, False]:
            try:
                return _finish(*_from_pretrained(model, local_files_only=local_only), device)
            except Exception:  # any cache or hub failure means "not found there"; reported below
                continue
        where = "cache (HF_HUB_OFFLINE set, hub skipped)" if offline else "cache and hub"
        tried.append(f"Hugging Face {where}: {model}")
    raise WeightsNotFoundError(
        f"no Stable Diffusion UNet for {model!r}. Looked in:\n  - " + "\n  - ".join(tried)
        + "\nPass model= a diffusers folder (unet/, text_encoder/, tokenizer/, scheduler/ with safetensors) "
        "or a single .safetensors checkpoint, or allow Hugging Face hub access."
    )


def _from_folder(folder: Path) -> tuple | None:
    if not all((folder / sub).is_dir() for sub in SUBFOLDERS):
        return None
    return _from_pretrained(str(folder), local_files_only=True)


def _from_pretrained(location: str, **kwargs: Any) -> tuple:
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", use_safetensors=True, **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", use_safetensors=True, **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
    scheduler = PNDMScheduler.from_pretrained(location, subfolder="scheduler", **kwargs)
    return unet, text_encoder, tokenizer, dict(scheduler.config)


def _from_single_file(path: Path) -> tuple:
    """One .safetensors SD 1.x checkpoint; diffusers fetches the matching configs (cache or hub)."""
    from diffusers import StableDiffusionPipeline

    if path.suffix.lower() != ".safetensors":
        raise UnsafeWeightsError(f"refusing to load {path}: only .safetensors checkpoints are read")
    pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None)
    return pipe.unet, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config)


def _finish(unet: Any, text_encoder: Any, tokenizer: Any, scheduler_config: dict[str, Any],
            device: str) -> SDComponents:
    """Move to the device, encode the empty prompt once, and drop the text encoder."""
    dtype = default_dtype(device)
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.inference_mode():
        empty = text_encoder.to(device).eval()(tokens.input_ids.to(device))[0].to(dtype)
    unet = unet.to(device).eval().requires_grad_(False)
    unet = unet.half() if dtype == torch.float16 else unet.float()
    return SDComponents(unet, scheduler_config, empty, device, dtype)
