"""Named autoencoders with the codec's conventions, loaded lazily, once, behind a lock.

``load_model`` finds the weights (``weights``), picks device and runtime (``runtime``), and wraps the
network in a ``LatentModel`` whose encode/decode work on numpy arrays and tile large images
(``tiling``). On the CPU the TAESD family runs in ONNX Runtime from graphs written straight from the
weights (``onnx_graphs``), so torch is imported only for the torch runtime: a GPU, ``sd-vae``,
``runtime="torch"``, or no onnxruntime; there the ``taesd`` decoder also has an int8 form
(``LatentModel.decoding_in``). Caches are dropped in a forked child and by ``clear_cache``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.registry import DEFAULT_MODEL, ModelSpec, get_spec
from ..once import LoadOnce
from ..options import PRECISIONS
from ..weights import WEIGHTS_DIR
from . import onnx_graphs, ort_engine, tiling
from .runtime import (
    DEVICE_ENV,
    RUNTIME_ENV,
    RUNTIMES,
    default_dtype,
    import_torch,
    resolve_device,
    resolve_runtime,
)
from .weights import (
    BUNDLED_DIR,
    MODELS_ENV,
    PICKLE_SUFFIXES,
    StateDict,
    UnsafeWeightsError,
    WeightsNotFoundError,
    _as_numpy,
    _build_module,
    _numpy_state,
    _tiny_module,
    decoder_digest,
)

if TYPE_CHECKING:
    import torch

__all__ = ["BUNDLED_DIR", "DEVICE_ENV", "MODELS_ENV", "PICKLE_SUFFIXES", "RUNTIMES", "RUNTIME_ENV", "LatentModel",
           "LoadOnce", "UnsafeWeightsError", "WeightsNotFoundError", "clear_cache", "decoder_digest", "default_dtype",
           "get_spec", "import_torch", "int8_ranges", "load_model", "resolve_device", "resolve_runtime"]


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
        self.precision = "float32"
        self._float32 = self
        self._twins = LoadOnce()
        if runtime == "onnxruntime":
            state = network if isinstance(network, Mapping) else _numpy_state(network)
            self._state = state
            self.decoder_digest = decoder_digest(state, spec.family)
            self._onnx = {"encode": ort_engine.OnnxNetwork(lambda: onnx_graphs.taesd_encoder(state)),
                          "decode": ort_engine.OnnxNetwork(lambda: onnx_graphs.taesd_decoder(state))}
            return
        torch = import_torch(f"the torch runtime ({spec.name} on {device})")
        module = _tiny_module(spec, network) if isinstance(network, Mapping) else network
        self.decoder_digest = decoder_digest(module.state_dict(), spec.family)
        # channels-last lets oneDNN (CPU) and cuDNN (GPU) run the convolutions without
        # layout shuffles: measured 1.45x faster for TAESD on this project's CPU
        module = module.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        # .half() rather than .to(dtype): the same cast without diffusers' upcast warning
        self._module = module.half() if dtype == torch.float16 else module

    def decoding_in(self, precision: str = "float32") -> LatentModel:
        """This model decoding in ``precision`` (``options.PRECISIONS``): itself in float32, else a twin, built
        once, that shares its weights and encoder and decodes with the int8 graph (``onnx_graphs``).

        Why: int8 decodes ``taesd`` about 2.2x faster for about 0.03 dB on photos, with text read as well
        (docs/speed/int8_codec, docs/fidelity/int8; flat colours lose 0.2-0.9 dB: benchmarks/int8_flat.py).
        ``auto``, the decode default, takes it only where that measurement holds and the CPU computes it
        exactly: ONNX Runtime on the CPU, ranges fitted for these very decoder weights, and
        ``ort_engine.int8_exact``. ``int8`` insists (``ValueError``
        where there are no ranges for these weights, or no ONNX Runtime); ``float32`` never takes it.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if precision == "float32":
            return self._float32
        refusal = self._int8_refusal()
        if refusal is None and (precision == "int8" or ort_engine.int8_exact()):
            return self._twins.get(("int8",), self._int8_twin)
        if precision == "int8":
            raise ValueError(f"no int8 decoder for {self.spec.name!r}: {refusal}")
        return self._float32

    def with_decoder(self, name: str, decoder: Callable[[], StateDict]) -> LatentModel:
        """This model decoding with other weights for its decoder (a restoring decoder, ``enhance.restore``):
        a twin built once per ``name`` from ``decoder()``, on the same device and runtime. Its
        ``decoder_digest`` is the new decoder's; the file's digest was checked against this model's."""

        def build() -> LatentModel:
            state = self._state if self.runtime == "onnxruntime" else _numpy_state(self.module)
            replaced = decoder()
            if set(replaced) != {key for key in state if key.startswith("decoder.")}:
                raise ValueError(f"decoder {name!r} does not fit {self.spec.name!r}: other tensor names")
            return LatentModel(self.spec, {**state, **replaced}, self.device, self.dtype, self.runtime)

        return self._twins.get(("decoder", name), build)

    def _int8_refusal(self) -> str | None:
        """Why this model cannot decode in int8, or None."""
        if self.runtime != "onnxruntime":
            return f"it runs on ONNX Runtime on the CPU, not on {self.runtime} ({self.device})"
        if self._fitted_ranges() is None:
            if self.spec.name in int8_ranges():
                return "its int8 ranges were fitted for other decoder weights than these"
            return "no int8 ranges were fitted for it"
        return None

    def _fitted_ranges(self) -> dict[str, list[float]] | None:
        """The int8 ranges fitted for this very decoder (the model's own or a restoring decoder), if any."""
        digest = self.decoder_digest.hex()
        return next((fitted["ranges"] for fitted in int8_ranges().values() if fitted["decoder_digest"] == digest),
                    None)

    def _int8_twin(self) -> LatentModel:
        state, ranges = self._state, self._fitted_ranges()
        twin = copy.copy(self)
        twin.precision = "int8"
        graph = functools.partial(onnx_graphs.taesd_decoder_int8, state, ranges)
        twin._onnx = {**self._onnx, "decode": ort_engine.OnnxNetwork(graph)}
        return twin

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
            return list(self.encode(tiling.to_pixels(np.stack(batch))).transpose(0, 2, 3, 1))

        latent = tiling.blend_tiles(rgb, 1 / 8, encode_tiles, self.spec.channels, self.tile_batch)
        return np.ascontiguousarray(np.moveaxis(latent, -1, 0))

    def decode_image(self, latent: np.ndarray) -> np.ndarray:
        """(C, h, w) float32 latent -> (8h, 8w, 3) uint8; tiled with blended seams when large."""

        def decode_tiles(batch: list[np.ndarray]) -> list[np.ndarray]:
            pixels = self.decode(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2)))
            return list(((pixels + 1) * 127.5).transpose(0, 2, 3, 1))  # blended before rounding

        pixels = tiling.blend_tiles(np.moveaxis(latent, 0, -1), 8, decode_tiles, 3, self.tile_batch)
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    def encode_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """``encode_image`` for same-shaped images, in one forward pass when they are untiled."""
        if len(images) == 1 or images[0].shape[0] * images[0].shape[1] > tiling.TILED_ABOVE_PIXELS:
            return [self.encode_image(rgb) for rgb in images]
        return list(self.encode(tiling.to_pixels(np.stack(images))))

    def decode_images(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        """``decode_image`` for same-shaped latents, in one forward pass when they are untiled."""
        if len(latents) == 1 or latents[0].shape[1] * latents[0].shape[2] * 64 > tiling.TILED_ABOVE_PIXELS:
            return [self.decode_image(latent) for latent in latents]
        pixels = self.decode(np.stack(latents))
        return list(tiling.to_uint8(pixels.transpose(0, 2, 3, 1)))

    @property
    def tile_batch(self) -> int:
        """Tiles per forward pass: several on a GPU, one on a CPU where batching does not pay."""
        return 1 if self.device == "cpu" else 4


def _same_kind(like: Any, result: Any) -> Any:
    """``result`` as a torch tensor when ``like`` is one, else as a numpy array."""
    if hasattr(like, "detach"):
        import torch

        return torch.as_tensor(result)
    return result.numpy() if hasattr(result, "detach") else result


_models = LoadOnce()


@functools.cache
def int8_ranges() -> dict[str, Any]:
    """Per model (and per restoring decoder file), the int8 decoder's activation ranges and the digest of the
    weights they were fitted for (``training/fit_int8_ranges.py``)."""
    return json.loads((WEIGHTS_DIR / "int8_ranges.json").read_text())


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
    restore = sys.modules.get("pillow_sdlatent.enhance.restore")
    if restore is not None:
        dropped += restore.clear_cache()
    ctx2 = sys.modules.get("pillow_sdlatent.core.coders.ctx2")
    if ctx2 is not None:
        dropped += ctx2.clear_cache()
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
