"""Named autoencoders: registry, weight lookup, device and dtype choice, caching.

Weights are searched in this order, and an error names every place looked at:

1. an explicit ``weights=`` argument (a folder or a ``.safetensors`` file);
2. the folder named by the environment variable ``PILLOW_SDLATENT_MODELS``;
3. the Hugging Face cache, then the hub (``HF_HUB_OFFLINE=1`` skips the hub).

Only safetensors are ever read: pickled checkpoints can run code when loaded.
Models load lazily, once per (model, weights, device, dtype), behind a lock.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .core.registry import DEFAULT_MODEL, ModelSpec, get_spec

if TYPE_CHECKING:
    import torch

MODELS_ENV = "PILLOW_SDLATENT_MODELS"
DEVICE_ENV = "PILLOW_SDLATENT_DEVICE"
RUNTIME_ENV = "PILLOW_SDLATENT_RUNTIME"
RUNTIMES = ("torch", "onnxruntime")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")


class WeightsNotFoundError(OSError):
    """No usable weights were found anywhere on the search path."""


class UnsafeWeightsError(ValueError):
    """A weights path names a pickle-based format, which is never loaded."""


def resolve_device(device: str | None = None) -> str:
    """The explicit device, else $PILLOW_SDLATENT_DEVICE, else CUDA, MPS, CPU in that order."""
    import torch

    choice = device or os.environ.get(DEVICE_ENV) or ""
    if choice:
        try:
            torch.device(choice)
        except RuntimeError:
            raise ValueError(f"unknown device {choice!r}") from None
        return choice
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    """Half precision on CUDA, where both the TAESDs and the SD 1.x VAE are stable in it."""
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def resolve_runtime(spec: ModelSpec, device: str, runtime: str | None = None) -> str:
    """The explicit runtime, else $PILLOW_SDLATENT_RUNTIME, else ONNX Runtime where it applies, else torch.

    ONNX Runtime runs the TAESD family on the CPU (measured faster there, see
    ``ort_engine``); elsewhere, or when it is not installed, torch runs everything.
    A wish for ``onnxruntime`` where it does not apply falls back to torch.
    """
    choice = runtime or os.environ.get(RUNTIME_ENV) or ""
    if choice and choice not in RUNTIMES:
        raise ValueError(f"unknown runtime {choice!r}; choose one of {RUNTIMES}")
    if choice == "torch" or device != "cpu" or spec.family != "tiny":
        return "torch"
    from . import ort_engine

    if ort_engine.available():
        return "onnxruntime"
    if choice:
        raise ImportError("runtime 'onnxruntime' needs the onnx and onnxruntime packages: "
                          "pip install 'pillow_sdlatent[onnx]'")
    return "torch"


class LatentModel:
    """An autoencoder with the codec's conventions: pixels in [-1, 1], scaled latents.

    Latents are always in the diffusion model's (scaled) latent space, so that
    ``taesd`` and ``sd-vae`` files are interchangeable.
    """

    def __init__(self, spec: ModelSpec, module: torch.nn.Module, device: str, dtype: torch.dtype,
                 runtime: str = "torch") -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.runtime = runtime
        self.decoder_digest = decoder_digest(module.state_dict(), spec.family)
        # channels-last lets oneDNN (CPU) and cuDNN (GPU) run the convolutions without
        # layout shuffles: measured 1.45x faster for TAESD on this project's CPU
        module = module.to(device, memory_format=_channels_last()).eval().requires_grad_(False)
        # .half() rather than .to(dtype): the same cast without diffusers' upcast warning
        self.module = module.half() if dtype == _float16() else module
        self._onnx: dict[str, Any] = {}
        if runtime == "onnxruntime":
            from .ort_engine import OnnxNetwork

            self._onnx = {
                "encode": OnnxNetwork(self.module, lambda x: self.module.encode(x).latents, 3, 64),
                "decode": OnnxNetwork(self.module, lambda z: self.module.decode(z).sample, spec.channels, 8),
            }

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [-1, 1] -> (N, C, H/8, W/8) float32 latent, deterministic."""
        import torch

        if self._onnx:
            return torch.from_numpy(self._onnx["encode"](pixels.numpy()))
        with torch.inference_mode():
            x = pixels.to(self.device, self.dtype, memory_format=_channels_last())
            if self.spec.family == "tiny":
                latent = self.module.encode(x).latents
            else:
                config = self.module.config
                latent = self.module.encode(x).latent_dist.mode()
                latent = (latent - (config.shift_factor or 0.0)) * config.scaling_factor
            return latent.float().cpu()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latent -> (N, 3, 8h, 8w) float32 pixels in [-1, 1]."""
        import torch

        if self._onnx:
            return torch.from_numpy(self._onnx["decode"](latent.numpy())).clamp(-1, 1)
        with torch.inference_mode():
            z = latent.to(self.device, self.dtype, memory_format=_channels_last())
            if self.spec.family == "kl":
                config = self.module.config
                z = z / config.scaling_factor + (config.shift_factor or 0.0)
            return self.module.decode(z).sample.float().clamp(-1, 1).cpu()


    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8, H and W multiples of 8 -> (C, H/8, W/8) float32 latent; tiled when large."""

        def encode_tiles(batch: list[np.ndarray]) -> list[np.ndarray]:
            return list(self.encode(_to_pixels(np.stack(batch))).permute(0, 2, 3, 1).numpy())

        latent = _blend_tiles(rgb, 1 / 8, encode_tiles, self.spec.channels, self.tile_batch)
        return np.ascontiguousarray(np.moveaxis(latent, -1, 0))

    def decode_image(self, latent: np.ndarray) -> np.ndarray:
        """(C, h, w) float32 latent -> (8h, 8w, 3) uint8; tiled with blended seams when large."""
        import torch

        def decode_tiles(batch: list[np.ndarray]) -> list[np.ndarray]:
            pixels = self.decode(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2))
            return list(((pixels + 1) * 127.5).permute(0, 2, 3, 1).numpy())  # blended before rounding

        pixels = _blend_tiles(np.moveaxis(latent, 0, -1), 8, decode_tiles, 3, self.tile_batch)
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    def encode_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """``encode_image`` for same-shaped images, in one forward pass when they are untiled."""
        if len(images) == 1 or images[0].shape[0] * images[0].shape[1] > TILED_ABOVE_PIXELS:
            return [self.encode_image(rgb) for rgb in images]
        return list(self.encode(_to_pixels(np.stack(images))).numpy())

    def decode_images(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        """``decode_image`` for same-shaped latents, in one forward pass when they are untiled."""
        import torch

        if len(latents) == 1 or latents[0].shape[1] * latents[0].shape[2] * 64 > TILED_ABOVE_PIXELS:
            return [self.decode_image(latent) for latent in latents]
        pixels = self.decode(torch.from_numpy(np.stack(latents)))
        return list(_to_uint8(pixels.permute(0, 2, 3, 1).numpy()))

    @property
    def tile_batch(self) -> int:
        """Tiles per forward pass: several on a GPU, one on a CPU where batching does not pay."""
        return 1 if self.device == "cpu" else 4


#: Images above this many pixels are coded in overlapping tiles so memory stays bounded.
TILED_ABOVE_PIXELS = 1024 * 1024
TILE_PIXELS = 512
OVERLAP_PIXELS = 64


def _to_pixels(rgb: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 levels."""
    return np.clip(np.rint((pixels + 1) * 127.5), 0, 255).astype(np.uint8)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``length``; the last tile is flush with the end, so all are full size."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _ramp(length: int, start: int, total: int, overlap: int) -> np.ndarray:
    """Blend weights along one axis: rising over the overlap, flat at the image's own borders."""
    index = np.arange(length, dtype=np.float32) + 0.5
    rise = np.minimum(1.0, index / overlap) if start > 0 else np.ones(length, np.float32)
    fall = np.minimum(1.0, (length - index) / overlap) if start + length < total else np.ones(length, np.float32)
    return np.minimum(rise, fall).astype(np.float32)


def _blend_tiles(source: np.ndarray, scale: float, run: Callable[[list[np.ndarray]], list[np.ndarray]],
                 out_channels: int, batch: int) -> np.ndarray:
    """Run ``run`` on overlapping tiles of ``source`` (H, W, C) and blend its (h, w, C') outputs.

    ``scale`` maps source to output coordinates (1/8 to encode, 8 to decode).
    Inputs of at most ``TILED_ABOVE_PIXELS`` image pixels go through in one piece.
    """
    height, width = source.shape[:2]
    pixel_scale = 1 if scale < 1 else 8  # source units per image pixel, inverted
    if height * width * pixel_scale**2 <= TILED_ABOVE_PIXELS:
        (whole,) = run([source])
        return whole
    tile, overlap = TILE_PIXELS // pixel_scale, OVERLAP_PIXELS // pixel_scale
    out_h, out_w = round(height * scale), round(width * scale)
    total = np.zeros((out_h, out_w, out_channels), np.float32)
    weight = np.zeros((out_h, out_w, 1), np.float32)
    boxes = [(y, x) for y in _tile_starts(height, tile, overlap) for x in _tile_starts(width, tile, overlap)]
    for first in range(0, len(boxes), batch):
        chunk = boxes[first : first + batch]
        outputs = run([source[y : y + tile, x : x + tile] for y, x in chunk])
        for (y, x), out in zip(chunk, outputs, strict=True):
            oy, ox = round(y * scale), round(x * scale)
            th, tw = out.shape[:2]
            ramp_y = _ramp(th, oy, out_h, round(overlap * scale))
            ramp_x = _ramp(tw, ox, out_w, round(overlap * scale))
            w2d = np.outer(ramp_y, ramp_x)[..., None]
            weight[oy : oy + th, ox : ox + tw] += w2d
            total[oy : oy + th, ox : ox + tw] += out * w2d
    return total / weight


def decoder_digest(state_dict: dict[str, torch.Tensor], family: str) -> bytes:
    """SHA-256 of the decoder weights rounded to bfloat16 (FORMAT.md, Decoder digest)."""
    import torch

    prefixes = ("decoder.",) if family == "tiny" else ("decoder.", "post_quant_conv.")
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if k.startswith(prefixes)):
        tensor = state_dict[key].detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(key.encode() + b"\0")
        digest.update(b"".join(int(n).to_bytes(4, "big") for n in tensor.shape) + b"\0")
        digest.update(tensor.view(torch.int16).numpy().astype("<i2").tobytes())
    return digest.digest()


class LoadOnce:
    """Values built once per key and then shared, even when many threads ask for one at once.

    A lock per key lets two different models load in parallel while a second
    request for the same model waits for the first instead of loading it again.
    """

    def __init__(self) -> None:
        self.items: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self.items:
                return self.items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self.items:
                value = build()
                with self._lock:
                    self.items[key] = value
        return self.items[key]


_models = LoadOnce()


def load_model(name: str = DEFAULT_MODEL, *, weights: str | os.PathLike | None = None,
               device: str | None = None, runtime: str | None = None) -> LatentModel:
    """The named model, loaded on first use and shared afterwards (thread-safe)."""
    spec = get_spec(name)
    resolved_device = resolve_device(device)
    resolved_runtime = resolve_runtime(spec, resolved_device, runtime)
    models_dir = os.environ.get(MODELS_ENV, "")
    key = (spec.name, os.fspath(weights) if weights else None, models_dir, resolved_device, resolved_runtime)

    def build() -> LatentModel:
        module = _build_module(spec, weights, models_dir)
        return LatentModel(spec, module, resolved_device, default_dtype(resolved_device), resolved_runtime)

    return _models.get(key, build)


def _build_module(spec: ModelSpec, weights: str | os.PathLike | None, models_dir: str) -> torch.nn.Module:
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if weights:
        candidates.append(("weights= argument", Path(weights)))
    if models_dir:
        candidates.append((f"${MODELS_ENV}", Path(models_dir)))
    for origin, path in candidates:
        _refuse_pickle(path)
        module = _from_local(spec, path)
        if module is not None:
            return module
        tried.append(f"{origin}: {path} ({_expected_files(spec)})")
    module, hub_note = _from_hub(spec)
    if module is not None:
        return module
    tried.append(f"Hugging Face {hub_note}: {spec.hub_id}")
    if not models_dir:
        tried.append(f"${MODELS_ENV}: not set")
    raise WeightsNotFoundError(
        f"no weights for model {spec.name!r}. Looked in:\n  - " + "\n  - ".join(tried)
        + f"\nSet {MODELS_ENV} to a folder holding {_expected_files(spec)}, pass weights=, "
        "or allow Hugging Face hub access."
    )


def _expected_files(spec: ModelSpec) -> str:
    if spec.family == "tiny":
        return f"{spec.file_prefix}_encoder.safetensors + {spec.file_prefix}_decoder.safetensors, or a diffusers folder"
    return "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) or a .safetensors file"


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeightsError(
            f"refusing to load {path}: {path.suffix} files are pickles that can run code; "
            "convert them to .safetensors"
        )


def _from_local(spec: ModelSpec, path: Path) -> torch.nn.Module | None:
    """Load from a folder or file, or None when it holds nothing for this model."""
    if spec.family == "tiny":
        if path.is_file():
            return _tiny_from_single_file(spec, path)
        pair = [path / f"{spec.file_prefix}_{part}.safetensors" for part in ("encoder", "decoder")]
        if all(file.is_file() for file in pair):
            return _tiny_from_taesd_files(spec, path)
        for folder in (path / spec.name, path):
            if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
                return _from_diffusers(spec, str(folder))
        return None
    if path.is_file() and path.suffix == ".safetensors":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_single_file(str(path))
    for folder in (path / spec.name, path):
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return _from_diffusers(spec, str(folder))
    return None


def _tiny_from_taesd_files(spec: ModelSpec, folder: Path) -> torch.nn.Module:
    """The original taesd.py key layout, remapped onto diffusers' AutoencoderTiny."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    encoder_file = folder / f"{spec.file_prefix}_encoder.safetensors"
    state = {f"encoder.layers.{k}": v.float() for k, v in load_file(encoder_file).items()}
    for key, value in load_file(folder / f"{spec.file_prefix}_decoder.safetensors").items():
        index, rest = key.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value.float()
    module = AutoencoderTiny(latent_channels=spec.channels)
    module.load_state_dict(state, strict=True)
    return module


def _tiny_from_single_file(spec: ModelSpec, path: Path) -> torch.nn.Module:
    """A diffusers-layout AutoencoderTiny state dict in one .safetensors file (as on the hub)."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise OSError(f"{path}: expected a .safetensors file")
    module = AutoencoderTiny(latent_channels=spec.channels)
    try:
        module.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=True)
    except RuntimeError as exc:
        raise OSError(f"{path} does not hold {spec.name!r} weights in diffusers' AutoencoderTiny layout: "
                      f"{str(exc).splitlines()[0]}") from None
    return module


def _from_diffusers(spec: ModelSpec, location: str, **kwargs: object) -> torch.nn.Module:
    from diffusers import AutoencoderKL, AutoencoderTiny

    cls = AutoencoderTiny if spec.family == "tiny" else AutoencoderKL
    return cls.from_pretrained(location, use_safetensors=True, torch_dtype=_float32(), **kwargs)


def _float32() -> torch.dtype:
    import torch

    return torch.float32


def _channels_last() -> torch.memory_format:
    import torch

    return torch.channels_last


def _float16() -> torch.dtype:
    import torch

    return torch.float16


def _from_hub(spec: ModelSpec) -> tuple[torch.nn.Module | None, str]:
    """Try the local Hugging Face cache, then the hub unless HF_HUB_OFFLINE is set."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    attempts = [True] if offline else [True, False]
    for local_only in attempts:
        try:
            return _from_diffusers(spec, spec.hub_id, local_files_only=local_only), ""
        except Exception:  # any hub failure means "not found here"; the caller reports where it looked
            continue
    return None, "cache (HF_HUB_OFFLINE set, hub skipped)" if offline else "cache and hub (unreachable or missing)"
