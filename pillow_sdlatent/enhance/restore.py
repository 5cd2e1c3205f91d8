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
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

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


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class RestorerNet(nn.Module):
    """Two-scale residual CNN: latent + log(step) map in, step-scaled latent correction out.

    The step enters as an input plane (as in FFDNet's noise-level map) and scales the output,
    so the network predicts the residual in units of the quantization step at every rate.
    """

    def __init__(self, channels: int = 4, width: int = 32, inner: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.config = {"channels": channels, "width": width, "inner": inner, "depth": depth}
        self.head = nn.Conv2d(channels + 1, width, 3, padding=1)
        self.enc = ResBlock(width)
        self.down = nn.Conv2d(width, inner, 3, stride=2, padding=1)
        self.mid = nn.Sequential(*(ResBlock(inner) for _ in range(depth)))
        self.up = nn.Conv2d(inner, 4 * width, 1)
        self.dec = ResBlock(width)
        self.tail = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, latent: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) dequantized latent, (N, 1, 1, 1) step -> (N, C, H, W) restored latent."""
        height, width = latent.shape[-2:]
        level = torch.log(step).expand(-1, 1, height, width)
        x = torch.relu(self.head(torch.cat([latent, level], dim=1)))
        skip = self.enc(x)
        y = self.mid(torch.relu(self.down(torch.relu(skip))))
        y = nn.functional.pixel_shuffle(self.up(y), 2)[..., :height, :width]
        x = self.dec(torch.relu(skip + y))
        return latent + step * self.tail(torch.relu(x))


def save_weights(net: RestorerNet, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Store as float16 safetensors with the network's sizes: restoring is insensitive to that rounding."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").half().contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"arch": ARCH_VERSION, "config": json.dumps(net.config), **(metadata or {})})


def load_net(path: Path) -> RestorerNet:
    """The float32 network a weights file holds; ``ValueError`` for another architecture version."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("arch") != ARCH_VERSION:
            raise ValueError(f"{path.name}: restorer architecture {meta.get('arch')!r}, this build expects "
                             f"{ARCH_VERSION!r}")
        config = json.loads(meta.get("config", "{}"))
        if set(config) - {"channels", "width", "inner", "depth"} or not all(
                isinstance(v, int) and 1 <= v <= 1024 for v in config.values()):
            raise ValueError(f"{path.name}: bad restorer config {config!r}")
        net = RestorerNet(**config)
        net.load_state_dict({key: f.get_tensor(key).float() for key in f.keys()}, strict=True)  # noqa: SIM118
    return net


_nets: dict[str, torch.nn.Module] = {}
_lock = threading.Lock()


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
    """The restorer for the model's latent space, loaded once (thread-safe) and then shared.

    Its parameters are frozen; gradients still flow to its input (encoder effort uses that).
    """
    path = _weights_for(model_name)
    if path is None:
        raise ValueError(f"no restorer for model {model_name!r}")
    key = str(path)
    with _lock:
        if key not in _nets:
            _nets[key] = load_net(path).eval().requires_grad_(False)
        return _nets[key]


def restore_latent(latent: np.ndarray, step: float, model_name: str) -> np.ndarray:
    """(C, H, W) dequantized latent of a file quantized with ``step`` -> (C, H, W) float32 restored latent.

    Deterministic: float32 on the CPU. ``ValueError`` when the model has no restorer or the
    step is not a positive finite number.
    """
    if not (isinstance(step, (int, float, np.floating)) and math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, not {step!r}")
    net = restorer_net(model_name)
    if latent.ndim != 3 or latent.shape[0] != net.head.in_channels - 1:
        raise ValueError(f"expected a ({net.head.in_channels - 1}, H, W) latent, got shape {latent.shape}")
    with torch.inference_mode():
        z = torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32))[None]
        s = torch.full((1, 1, 1, 1), float(step))
        return net(z, s)[0].numpy()
