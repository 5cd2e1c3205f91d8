"""How far could a richer context model take the latent coder? A learned bound for ctx1.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/context_bound.py

Trains a small float MLP (the same causal neighbourhood ctx1 predicts from: 10 same-channel taps and
a 3x3 window in each of up to three earlier channels, values in latent units, plus channel and
log(step)) to output a discretised logistic for every symbol, on every 4th training photo at steps
0.25, 0.38 and 0.6. It then reports its ideal code length (no side information, no rANS overhead,
float probabilities: everything in its favour) beside ctx1's and zstd's real bytes on Kodak at the
default step. The MLP sees no Kodak photo in training. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rd import image_paths
from torch import nn
from tqdm import tqdm

from pillow_sdlatent.core.coders import ZstdCoder
from pillow_sdlatent.core.coders.ctx1 import PREV_TAPS, SAME_TAPS, ContextCoder
from pillow_sdlatent.core.quantize import DEFAULT_STEP, UniformQuantizer
from pillow_sdlatent.models import load_model
from pillow_sdlatent.pipeline import padded_rgb

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TRAIN_STEPS = (0.25, DEFAULT_STEP, 0.6)
PAD = 2
EARLIER_CHANNELS = 3


def features(symbols: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Per symbol: its causal neighbours in latent units, a channel one-hot and log(step); and the symbol."""
    channels, height, width = symbols.shape
    padded = np.zeros((channels, height + 2 * PAD, width + 2 * PAD), np.float32)
    padded[:, PAD:PAD + height, PAD:PAD + width] = symbols

    def shifted(c: int, dy: int, dx: int) -> np.ndarray:
        return padded[c, PAD + dy:PAD + dy + height, PAD + dx:PAD + dx + width]

    rows, targets = [], []
    for c in range(channels):
        taps = [shifted(c, dy, dx) for dy, dx in SAME_TAPS]
        for prev in range(c - EARLIER_CHANNELS, c):
            taps += [shifted(prev, dy, dx) if prev >= 0 else np.zeros((height, width), np.float32)
                     for dy, dx in PREV_TAPS]
        side = np.zeros((height * width, channels + 1), np.float32)
        side[:, c], side[:, -1] = 1, math.log(step)
        rows.append(np.concatenate([np.stack(taps, -1).reshape(height * width, -1) * step, side], 1))
        targets.append(symbols[c].reshape(-1))
    return np.concatenate(rows), np.concatenate(targets).astype(np.float32)


class ContextMLP(nn.Module):
    def __init__(self, inputs: int, hidden: int = 96) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2))

    def bits(self, x: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Ideal code length of each integer symbol ``y`` under a discretised logistic."""
        out = self.net(x)
        mu, scale = out[:, 0] / step, torch.exp(out[:, 1]).clamp_min(0.05)
        p = torch.sigmoid((y + 0.5 - mu) / scale) - torch.sigmoid((y - 0.5 - mu) / scale)
        return -torch.log2(p.clamp_min(1e-9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=SHARED / "train")
    parser.add_argument("--every", type=int, default=4, help="use every N-th training photo")
    parser.add_argument("--images", type=Path, default=SHARED / "kodak")
    parser.add_argument("--iters", type=int, default=6000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("taesd")

    def latents(paths: list[Path], desc: str) -> list[np.ndarray]:
        out = []
        for path in tqdm(paths, desc=desc):
            with Image.open(path) as image:
                out.append(model.encode_image(padded_rgb(image.convert("RGB"))))
        return out

    def quantized(latent: np.ndarray, step: float) -> np.ndarray:
        return UniformQuantizer.with_step(step, latent.shape[0]).quantize(latent)

    xs, ys, ss = [], [], []
    for latent in latents(image_paths(args.train, None, args.every), "encode training photos"):
        for step in TRAIN_STEPS:
            x, y = features(quantized(latent, step), step)
            xs.append(x), ys.append(y), ss.append(np.full(len(y), step, np.float32))
    x_train, y_train, s_train = (torch.from_numpy(np.concatenate(a)) for a in (xs, ys, ss))
    net = ContextMLP(x_train.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in tqdm(range(args.iters), desc="train"):
        pick = torch.randint(0, len(y_train), (4096,))
        loss = net.bits(x_train[pick], y_train[pick], s_train[pick]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    zstd = ctx1 = bound = 0.0
    test = latents(image_paths(args.images, None), "encode test photos")
    for latent in test:
        symbols = quantized(latent, DEFAULT_STEP)
        zstd += sum(map(len, ZstdCoder().encode(symbols)))
        ctx1 += sum(map(len, ContextCoder().encode(symbols)))
        x, y = features(symbols, DEFAULT_STEP)
        with torch.no_grad():
            bound += float(net.bits(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(DEFAULT_STEP)).sum()) / 8
    n = len(test)
    print(f"\n{n} images from {args.images}, step {DEFAULT_STEP}\n")
    print("| coder | bytes / image | saving over zstd |\n| --- | ---: | ---: |")
    for name, size in (("zstd (level 19)", zstd), ("ctx1 (params + payload)", ctx1),
                       ("learned MLP, ideal code length", bound)):
        print(f"| {name} | {size / n:.0f} | {1 - size / zstd:.1%} |")


if __name__ == "__main__":
    main()
