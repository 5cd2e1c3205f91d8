"""Named autoencoders: registry, weight lookup, device and runtime choice, caching.

Weights are searched in this order, and an error names every place looked at:

1. an explicit ``weights=`` argument (a folder or a ``.safetensors`` file);
2. the folder named by the environment variable ``PILLOW_SDLATENT_MODELS``;
3. the copies inside the package (``weights/``: ``taesd`` and ``taesd3``);
4. the Hugging Face cache, then the hub (``HF_HUB_OFFLINE=1`` skips the hub; needs ``huggingface_hub``).

Only safetensors are ever read: pickled checkpoints can run code when loaded.
On the CPU the TAESD family runs in ONNX Runtime from graphs written straight
from the weights (``onnx_graphs``), so torch is imported only for the torch
runtime: a GPU, ``sd-vae``, ``runtime="torch"``, or no onnxruntime.
Models load lazily, once per (model, weights, device, runtime), behind a lock.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import onnx_graphs

if TYPE_CHECKING:
    import torch

MODELS_ENV = "PILLOW_SDLATENT_MODELS"
DEVICE_ENV = "PILLOW_SDLATENT_DEVICE"
RUNTIME_ENV = "PILLOW_SDLATENT_RUNTIME"
RUNTIMES = ("torch", "onnxruntime")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
#: the AutoencoderTiny weights file in a diffusers folder or hub repository
TINY_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TORCH_EXTRA = "pip install 'pillow_sdlatent[torch]'"

#: a float32 state dict in diffusers' key names, as numpy arrays
StateDict = dict[str, np.ndarray]


class WeightsNotFoundError(OSError):
    """No usable weights were found anywhere on the search path."""


class UnsafeWeightsError(ValueError):
    """A weights path names a pickle-based format, which is never loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """What a registry name stands for."""

    name: str
    family: str  # "tiny" (AutoencoderTiny) or "kl" (AutoencoderKL)
    latent_space: str
    channels: int
    hub_id: str
    file_prefix: str = ""  # TAESD file names in the models folder: {prefix}_encoder.safetensors


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("taesd", "tiny", "sd1", 4, "madebyollin/taesd", "taesd"),
        ModelSpec("taesdxl", "tiny", "sdxl", 4, "madebyollin/taesdxl", "taesdxl"),
        ModelSpec("taesd3", "tiny", "sd3", 16, "madebyollin/taesd3", "taesd3"),
        ModelSpec("taef1", "tiny", "flux", 16, "madebyollin/taef1", "taef1"),
        ModelSpec("sd-vae", "kl", "sd1", 4, "stabilityai/sd-vae-ft-mse"),
    )
}
DEFAULT_MODEL = "taesd"


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}") from None


def import_torch(purpose: str) -> ModuleType:
    """torch, or an ImportError that says which install brings it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"{purpose} needs torch: {TORCH_EXTRA}") from exc
    return torch


def resolve_device(device: str | None = None) -> str:
    """The explicit device, else $PILLOW_SDLATENT_DEVICE, else CUDA, MPS, CPU in that order.

    Without torch installed only the CPU exists, and it is chosen without importing anything.
    """
    choice = device or os.environ.get(DEVICE_ENV) or ""
    if choice == "cpu":
        return choice
    if choice:
        torch = import_torch(f"device {choice!r}")
        try:
            torch.device(choice)
        except RuntimeError:
            raise ValueError(f"unknown device {choice!r}") from None
        return choice
    try:
        import torch
    except ImportError:
        return "cpu"
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
    ``ort_engine``, and it needs no torch); elsewhere, or when it is not installed,
    torch runs everything. A wish for ``onnxruntime`` where it does not apply falls back to torch.
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
        raise ImportError("runtime 'onnxruntime' needs the onnxruntime package: pip install onnxruntime")
    return "torch"


class LatentModel:
    """An autoencoder with the codec's conventions: pixels in [-1, 1], scaled latents.

    Latents are always in the diffusion model's (scaled) latent space, so that
    ``taesd`` and ``sd-vae`` files are interchangeable. ``network`` is a torch module,
    or (TAESD family) a ``StateDict``; ``dtype`` is torch's on the torch runtime and
    None on ONNX Runtime, which always computes in float32.
    """

    def __init__(self, spec: ModelSpec, network: torch.nn.Module | StateDict, device: str,
                 dtype: torch.dtype | None = None, runtime: str = "torch") -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.runtime = runtime
        self._module: torch.nn.Module | None = None
        self._module_lock = threading.Lock()
        self._onnx: dict[str, Any] = {}
        if runtime == "onnxruntime":
            from .ort_engine import OnnxNetwork

            state = network if isinstance(network, Mapping) else _numpy_state(network)
            self._state = state
            self.decoder_digest = decoder_digest(state, spec.family)
            self._onnx = {"encode": OnnxNetwork(lambda: onnx_graphs.taesd_encoder(state)),
                          "decode": OnnxNetwork(lambda: onnx_graphs.taesd_decoder(state))}
            return
        torch = import_torch(f"the torch runtime ({spec.name} on {device})")
        module = _tiny_module(spec, network) if isinstance(network, Mapping) else network
        self.decoder_digest = decoder_digest(module.state_dict(), spec.family)
        # channels-last lets oneDNN (CPU) and cuDNN (GPU) run the convolutions without
        # layout shuffles: measured 1.45x faster for TAESD on this project's CPU
        module = module.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        # .half() rather than .to(dtype): the same cast without diffusers' upcast warning
        self._module = module.half() if dtype == torch.float16 else module

    @property
    def module(self) -> torch.nn.Module:
        """The torch module (encoder effort and training need one); on ONNX Runtime built on first use."""
        with self._module_lock:
            if self._module is None:
                import_torch(f"{self.spec.name}'s torch module (encoder effort, training)")
                self._module = _tiny_module(self.spec, self._state).eval().requires_grad_(False)
            return self._module

    def encode(self, pixels: Any) -> Any:
        """(N, 3, H, W) float in [-1, 1] -> (N, C, H/8, W/8) float32 latent, deterministic.

        numpy in, numpy out; a torch tensor in, a CPU torch tensor out.
        """
        if self._onnx:
            return _same_kind(pixels, self._onnx["encode"](input=_as_numpy(pixels)))
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(pixels).to(self.device, self.dtype, memory_format=torch.channels_last)
            if self.spec.family == "tiny":
                latent = self.module.encode(x).latents
            else:
                config = self.module.config
                latent = self.module.encode(x).latent_dist.mode()
                latent = (latent - (config.shift_factor or 0.0)) * config.scaling_factor
            return _same_kind(pixels, latent.float().cpu())

    def decode(self, latent: Any) -> Any:
        """(N, C, h, w) latent -> (N, 3, 8h, 8w) float32 pixels in [-1, 1]; numpy or torch as ``encode``."""
        if self._onnx:
            return _same_kind(latent, np.clip(self._onnx["decode"](input=_as_numpy(latent)), -1, 1))
        import torch

        with torch.inference_mode():
            z = torch.as_tensor(latent).to(self.device, self.dtype, memory_format=torch.channels_last)
            if self.spec.family == "kl":
                config = self.module.config
                z = z / config.scaling_factor + (config.shift_factor or 0.0)
            return _same_kind(latent, self.module.decode(z).sample.float().clamp(-1, 1).cpu())

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8, H and W multiples of 8 -> (C, H/8, W/8) float32 latent; tiled when large."""

        def encode_tiles(batch: list[np.ndarray]) -> list[np.ndarray]:
            return list(self.encode(_to_pixels(np.stack(batch))).transpose(0, 2, 3, 1))

        latent = _blend_tiles(rgb, 1 / 8, encode_tiles, self.spec.channels, self.tile_batch)
        return np.ascontiguousarray(np.moveaxis(latent, -1, 0))

    def decode_image(self, latent: np.ndarray) -> np.ndarray:
        """(C, h, w) float32 latent -> (8h, 8w, 3) uint8; tiled with blended seams when large."""

        def decode_tiles(batch: list[np.ndarray]) -> list[np.ndarray]:
            pixels = self.decode(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2)))
            return list(((pixels + 1) * 127.5).transpose(0, 2, 3, 1))  # blended before rounding

        pixels = _blend_tiles(np.moveaxis(latent, 0, -1), 8, decode_tiles, 3, self.tile_batch)
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    def encode_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """``encode_image`` for same-shaped images, in one forward pass when they are untiled."""
        if len(images) == 1 or images[0].shape[0] * images[0].shape[1] > TILED_ABOVE_PIXELS:
            return [self.encode_image(rgb) for rgb in images]
        return list(self.encode(_to_pixels(np.stack(images))))

    def decode_images(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        """``decode_image`` for same-shaped latents, in one forward pass when they are untiled."""
        if len(latents) == 1 or latents[0].shape[1] * latents[0].shape[2] * 64 > TILED_ABOVE_PIXELS:
            return [self.decode_image(latent) for latent in latents]
        pixels = self.decode(np.stack(latents))
        return list(_to_uint8(pixels.transpose(0, 2, 3, 1)))

    @property
    def tile_batch(self) -> int:
        """Tiles per forward pass: several on a GPU, one on a CPU where batching does not pay."""
        return 1 if self.device == "cpu" else 4


def _as_numpy(values: Any) -> np.ndarray:
    """A float32 numpy array of a numpy array or a (CPU or device) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.ascontiguousarray(values, dtype=np.float32)


def _same_kind(like: Any, result: Any) -> Any:
    """``result`` as a torch tensor when ``like`` is one, else as a numpy array."""
    if hasattr(like, "detach"):
        import torch

        return torch.as_tensor(result)
    return result.numpy() if hasattr(result, "detach") else result


#: Images above this many pixels are coded in overlapping tiles so memory stays bounded.
TILED_ABOVE_PIXELS = 1024 * 1024
TILE_PIXELS = 512
OVERLAP_PIXELS = 64


def _to_pixels(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1)


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


def decoder_digest(state_dict: Mapping[str, Any], family: str) -> bytes:
    """SHA-256 of the decoder weights rounded to bfloat16 (FORMAT.md, Decoder digest).

    ``state_dict`` holds numpy arrays or torch tensors (diffusers key names); both give one digest.
    """
    prefixes = ("decoder.",) if family == "tiny" else ("decoder.", "post_quant_conv.")
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if k.startswith(prefixes)):
        values = _as_numpy(state_dict[key])
        digest.update(key.encode() + b"\0")
        digest.update(b"".join(int(n).to_bytes(4, "big") for n in values.shape) + b"\0")
        digest.update(onnx_graphs.bfloat16_bits(values).astype("<i2").tobytes())
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


def clear_cache() -> None:
    """Forget every loaded network (models, ONNX Runtime sessions, restorer, ctx2), freeing their memory.

    The next use loads them again.
    """
    _drop_caches()


def _drop_caches() -> list[Any]:
    """Empty the caches; returns what they held, for a caller that must not free it yet."""
    global _models
    dropped: list[Any] = [_models]
    _models = LoadOnce()
    restore = sys.modules.get(f"{__package__}.restore")
    if restore is not None:
        dropped += restore.clear_cache()
    learned_coder = sys.modules.get(f"{__package__}.learned_coder")
    if learned_coder is not None:
        learned_coder._net_cache.clear()  # ctx2's network: plain numpy, rebuilt on the next call
    return dropped


#: what a forked child inherited from its parent's caches, never freed: ONNX Runtime's
#: destructors would wait forever for thread-pool threads that exist only in the parent
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    """Forked children start with empty caches, and torch on one thread.

    Runtime thread pools do not survive fork: the parent's ONNX Runtime sessions and
    torch's intra-op pool hang the child on first use (measured: forever).
    """
    _inherited.extend(_drop_caches())
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_after_fork_in_child)


def load_model(name: str = DEFAULT_MODEL, *, weights: str | os.PathLike | None = None,
               device: str | None = None, runtime: str | None = None) -> LatentModel:
    """The named model, loaded on first use and shared afterwards (thread-safe)."""
    spec = get_spec(name)
    resolved_device = resolve_device(device)
    resolved_runtime = resolve_runtime(spec, resolved_device, runtime)
    models_dir = os.environ.get(MODELS_ENV, "")
    key = (spec.name, os.fspath(weights) if weights else None, models_dir, resolved_device, resolved_runtime)

    def build() -> LatentModel:
        if resolved_runtime == "onnxruntime":
            return LatentModel(spec, _build_module(spec, weights, models_dir), resolved_device, None, resolved_runtime)
        import_torch(f"model {spec.name!r} on device {resolved_device!r}"
                     + ("" if spec.family == "kl" or resolved_device != "cpu" else " without onnxruntime"))
        network = _build_module(spec, weights, models_dir)
        return LatentModel(spec, network, resolved_device, default_dtype(resolved_device), resolved_runtime)

    return _models.get(key, build)


def _build_module(spec: ModelSpec, weights: str | os.PathLike | None,
                  models_dir: str) -> StateDict | torch.nn.Module:
    """TAESD weights as a ``StateDict``, the KL VAE as a diffusers module; the search order is the module's."""
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if weights:
        candidates.append(("weights= argument", Path(weights)))
    if models_dir:
        candidates.append((f"${MODELS_ENV}", Path(models_dir)))
    if spec.family == "tiny":
        candidates.append(("bundled with the package", BUNDLED_DIR))
    for origin, path in candidates:
        _refuse_pickle(path)
        network = _from_local(spec, path)
        if network is not None:
            return network
        tried.append(f"{origin}: {path} ({_expected_files(spec)})")
    network, hub_note = _from_hub(spec)
    if network is not None:
        return network
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


def _from_local(spec: ModelSpec, path: Path) -> StateDict | torch.nn.Module | None:
    """Load from a folder or file, or None when it holds nothing for this model."""
    if spec.family == "tiny":
        if path.is_file():
            return _tiny_from_single_file(spec, path)
        pair = [path / f"{spec.file_prefix}_{part}.safetensors" for part in ("encoder", "decoder")]
        if all(file.is_file() for file in pair):
            return _tiny_from_taesd_files(spec, path)
        for folder in (path / spec.name, path):
            if (folder / "config.json").is_file() and (folder / TINY_WEIGHTS_FILE).is_file():
                return _tiny_from_single_file(spec, folder / TINY_WEIGHTS_FILE)
        return None
    if path.is_file() and path.suffix == ".safetensors":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_single_file(str(path))
    for folder in (path / spec.name, path):
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return _from_diffusers(spec, str(folder))
    return None


def _tiny_from_taesd_files(spec: ModelSpec, folder: Path) -> StateDict:
    """The original taesd.py key layout (encoder ``k``, decoder ``i.x`` after its clamp layer), as diffusers keys."""
    encoder, _ = onnx_graphs.read_safetensors(folder / f"{spec.file_prefix}_encoder.safetensors")
    state = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    decoder, _ = onnx_graphs.read_safetensors(folder / f"{spec.file_prefix}_decoder.safetensors")
    for key, value in decoder.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < 1:
            raise OSError(f"{folder}: {key!r} is not a taesd.py decoder key")
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return _checked_tiny_state(spec, state, folder)


def _tiny_from_single_file(spec: ModelSpec, path: Path) -> StateDict:
    """A diffusers-layout AutoencoderTiny state dict in one .safetensors file (as on the hub)."""
    if path.suffix != ".safetensors":
        raise OSError(f"{path}: expected a .safetensors file")
    state, _ = onnx_graphs.read_safetensors(path)
    return _checked_tiny_state(spec, state, path)


def _checked_tiny_state(spec: ModelSpec, state: StateDict, origin: Path) -> StateDict:
    """``state`` when it is exactly the model's AutoencoderTiny, else an ``OSError`` that says what differs."""
    expected = onnx_graphs.taesd_keys("encoder", state) | onnx_graphs.taesd_keys("decoder", state)
    problems = [f"missing {key}" for key in sorted(expected - set(state))]
    problems += [f"unexpected {key}" for key in sorted(set(state) - expected)]
    if not problems:
        latent_in = state["decoder.layers.0.weight"].shape[1]
        latent_out = state["encoder.layers.14.weight"].shape[0]
        if (latent_in, latent_out) != (spec.channels, spec.channels):
            problems.append(f"{latent_out} latent channels, not {spec.channels}")
        if any(value.ndim not in (1, 4) for value in state.values()):
            problems.append("a tensor that is neither a bias nor a convolution kernel")
    if problems:
        raise OSError(f"{origin} does not hold {spec.name!r} weights in diffusers' AutoencoderTiny layout: "
                      + ", ".join(problems[:3]))
    return state


def _numpy_state(module: torch.nn.Module) -> StateDict:
    return {key: _as_numpy(value) for key, value in module.state_dict().items()}


def _tiny_module(spec: ModelSpec, state: StateDict) -> torch.nn.Module:
    """diffusers' AutoencoderTiny holding ``state`` (float32)."""
    torch = import_torch(f"{spec.name}'s torch module")
    from diffusers import AutoencoderTiny

    module = AutoencoderTiny(latent_channels=spec.channels)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    return module


def _from_diffusers(spec: ModelSpec, location: str, **kwargs: object) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch = import_torch(f"model {spec.name!r}")
    return AutoencoderKL.from_pretrained(location, use_safetensors=True, torch_dtype=torch.float32, **kwargs)


def _from_hub(spec: ModelSpec) -> tuple[StateDict | torch.nn.Module | None, str]:
    """Try the local Hugging Face cache, then the hub unless HF_HUB_OFFLINE is set.

    Only "not there" (no such repository or file, no connection) moves on to the next
    place; any other failure, such as a broken cache, is raised with its cause.
    """
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        return None, "not searched (huggingface_hub is not installed)"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    for local_only in [True] if offline else [True, False]:
        try:
            if spec.family == "tiny":  # LocalEntryNotFoundError is an EntryNotFoundError
                path = huggingface_hub.hf_hub_download(spec.hub_id, TINY_WEIGHTS_FILE, local_files_only=local_only)
            else:
                return _from_diffusers(spec, spec.hub_id, local_files_only=local_only), ""
        except (OSError, EntryNotFoundError, RepositoryNotFoundError):
            continue
        except Exception as exc:
            raise RuntimeError(f"loading {spec.hub_id} from the Hugging Face cache or hub failed: {exc}") from exc
        return _tiny_from_single_file(spec, Path(path)), ""
    return None, "cache (HF_HUB_OFFLINE set, hub skipped)" if offline else "cache and hub (unreachable or missing)"
