"""Decoder-side latent restoration: undo part of the quantization noise before the VAE decoder runs.

Coarse uniform quantization leaves noise in the latent that the decoder never saw in training, and
it shows as blotches and colour shifts. A small network, conditioned on the file's quantization
step, predicts a residual towards the clean latent; it was trained on photos outside the test set
(``training/train_restorer.py``). Its weights ship inside the package, so restoring needs no download.

The restorer runs on the CPU in float32, so its output does not depend on the decode device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models import LoadOnce, onnx_graphs

if TYPE_CHECKING:
    import torch

from ..weights import WEIGHTS_DIR

#: latent space -> weights file; taesd and sd-vae share SD 1.x's latent space
WEIGHTS = {"sd1": "restorer_taesd.safetensors"}
#: steps (latent units) where the restorer is on by default. Chosen on training photos outside the test
#: sets (not Kodak): below about 0.45 it still gains PSNR (+0.03 dB at 0.15, +0.2 dB at 0.4) but smooths
#: away noise that ST-LPIPS reads as texture. It was trained up to step 2.0 and still helps beyond: on 8
#: training photos (every 40th from the 11th) PSNR +1.06 dB at step 3.0 (7 of 8 better), but -0.29 dB at
#: 4.0 (the coarsest quality) and worse above, so it stays off there (rate control may go to 16).
HELPFUL_STEPS = (0.45, 3.0)
ARCH_VERSION = "1"
#: the torch half (``restore_net``), imported only when asked for: decoding needs no torch
_TORCH_NAMES = ("ResBlock", "RestorerNet", "save_weights", "load_net")


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from . import restore_net

        return getattr(restore_net, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """A weights file's float32 tensors and network sizes; ``ValueError`` for another architecture version."""
    tensors, meta = onnx_graphs.read_safetensors(path)
    if meta.get("arch") != ARCH_VERSION:
        raise ValueError(f"{path.name}: restorer architecture {meta.get('arch')!r}, this build expects "
                         f"{ARCH_VERSION!r}")
    config = json.loads(meta.get("config", "{}"))
    if set(config) - {"channels", "width", "inner", "depth"} or not all(
            isinstance(v, int) and 1 <= v <= 1024 for v in config.values()):
        raise ValueError(f"{path.name}: bad restorer config {config!r}")
    return tensors, config


#: (kind, weights path) -> the torch module ("net") or (OnnxNetwork, latent channels) ("session")
_loaded = LoadOnce()


def clear_cache() -> list[Any]:
    """Forget the loaded restorers (``models.clear_cache`` calls this); returns them.

    A fresh ``LoadOnce`` also brings fresh locks: a forked child may inherit the old ones held.
    """
    global _loaded
    dropped, _loaded = list(_loaded.items.values()), LoadOnce()
    return dropped


def _weights_for(model_name: str) -> Path | None:
    from ..core.registry import get_spec

    file = WEIGHTS.get(get_spec(model_name).latent_space)
    path = None if file is None else WEIGHTS_DIR / file
    return path if path is not None and path.is_file() else None


def has_restorer(model_name: str, step: float | None = None) -> bool:
    """Whether ``model_name``'s latent space has a restorer (and, given ``step``, whether it helps there).

    ``ValueError`` for an unknown model name, as everywhere in the package.
    """
    if _weights_for(model_name) is None:
        return False
    return step is None or HELPFUL_STEPS[0] <= step <= HELPFUL_STEPS[1]


def restorer_net(model_name: str) -> torch.nn.Module:
    """The restorer for the model's latent space as a torch module, loaded once (thread-safe) and shared.

    Its parameters are frozen; gradients still flow to its input (encoder effort uses that).
    """
    from ..models.runtime import import_torch

    import_torch("the restorer as a torch module (encoder effort, training)")
    from .restore_net import load_net

    path = _path_for(model_name)
    return _loaded.get(("net", str(path)), lambda: load_net(path).eval().requires_grad_(False))


def _path_for(model_name: str) -> Path:
    path = _weights_for(model_name)
    if path is None:
        raise ValueError(f"no restorer for model {model_name!r}")
    return path


def _onnx_restorer(model_name: str) -> tuple[Any, int]:
    """The restorer as an ONNX Runtime network, and the latent channels it takes; built once."""
    from ..models.ort_engine import OnnxNetwork

    path = _path_for(model_name)

    def build() -> tuple[Any, int]:
        tensors, _ = read_weights(path)
        return OnnxNetwork(lambda: onnx_graphs.restorer(tensors)), tensors["tail.weight"].shape[0]

    return _loaded.get(("session", str(path)), build)


def restore_latent(latent: np.ndarray, step: float, model_name: str) -> np.ndarray:
    """(C, H, W) dequantized latent of a file quantized with ``step`` -> (C, H, W) float32 restored latent.

    Float32 on the CPU, through ONNX Runtime (torch where onnxruntime is missing), so the
    result does not depend on the decode device. ``ValueError`` when the model has no
    restorer or the step is not a positive finite number.
    """
    from ..models import ort_engine

    if not (isinstance(step, (int, float, np.floating)) and math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, not {step!r}")
    if not ort_engine.available():
        return _restore_with_torch(latent, step, model_name)
    network, channels = _onnx_restorer(model_name)
    if latent.ndim != 3 or latent.shape[0] != channels:
        raise ValueError(f"expected a ({channels}, H, W) latent, got shape {latent.shape}")
    return network(latent=latent[None], step=np.full((1, 1, 1, 1), step, np.float32))[0]


def _restore_with_torch(latent: np.ndarray, step: float, model_name: str) -> np.ndarray:
    import torch

    net = restorer_net(model_name)
    if latent.ndim != 3 or latent.shape[0] != net.head.in_channels - 1:
        raise ValueError(f"expected a ({net.head.in_channels - 1}, H, W) latent, got shape {latent.shape}")
    with torch.inference_mode():
        z = torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32))[None]
        s = torch.full((1, 1, 1, 1), float(step))
        return net(z, s)[0].numpy()
