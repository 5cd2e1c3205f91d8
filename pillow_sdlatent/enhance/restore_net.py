"""The restorer as a torch module: for training and for encoder effort, which differentiate through it.

Decoding runs the same network through ONNX Runtime without torch (``restore.restore_latent``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .restore import ARCH_VERSION, read_weights


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
    ``onnx_graphs.restorer`` writes the same forward pass as an ONNX graph: change both together.
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
    tensors, config = read_weights(path)
    net = RestorerNet(**config)
    net.load_state_dict({key: torch.from_numpy(value) for key, value in tensors.items()}, strict=True)
    return net
