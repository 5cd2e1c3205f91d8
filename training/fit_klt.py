"""Fit the `klt` quantizer's transform for a 16-channel latent space (taesd3).

A fixed orthonormal 16x16 transform (the KLT, i.e. PCA of the latent channels) decorrelates
the channels so that a few components carry most of the energy, and one step per component is
allocated in *pixel* terms: each component's decoder sensitivity g_k (pixel MSE per unit of
latent noise variance along it) gives the high-rate optimum step_k proportional to g_k^-1/2,
which equalises every component's share of the pixel error per bit.

Fitted only on training photos that are not held out (held out: sorted index % 40 in {0, 20}).

    python training/fit_klt.py --model taesd3 --out pillow_sdlatent/weights/klt_taesd3.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from pillow_sdlatent.models import load_model
from pillow_sdlatent.pipeline import padded_rgb

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}


def training_paths(folder: Path, every: int) -> list[Path]:
    """Every ``every``-th photo that is not held out (sorted index % 40 not 0 or 20)."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    kept = [p for i, p in enumerate(found) if i % 40 not in (0, 20)]
    return kept[every // 2 :: every]


def load_crop(path: Path, side: int) -> np.ndarray:
    """The photo's centre crop, at most ``side`` pixels a side, padded to a multiple of 8."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    left, top = max(0, (width - side) // 2), max(0, (height - side) // 2)
    return padded_rgb(image.crop((left, top, min(width, left + side), min(height, top + side))))


def sensitivities(model, latents: list[np.ndarray], rgbs: list[np.ndarray], basis: np.ndarray,
                  noise_step: float, rng: np.random.Generator) -> np.ndarray:
    """Pixel MSE (0..255 units) per unit noise variance added along each component."""
    gains = np.zeros(len(basis))
    for latent, _ in zip(latents, rgbs, strict=True):
        clean = model.decode_image(latent).astype(np.float64)
        for k, direction in enumerate(basis):
            noise = rng.uniform(-noise_step / 2, noise_step / 2, latent.shape[1:])
            noisy = latent + (direction[:, None, None] * noise[None]).astype(np.float32)
            error = np.mean((model.decode_image(noisy).astype(np.float64) - clean) ** 2)
            gains[k] += error / (noise_step**2 / 12)
    return gains / len(latents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="taesd3")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "train")
    parser.add_argument("--every", type=int, default=24, help="use every N-th training photo")
    parser.add_argument("--side", type=int, default=384, help="centre crop side in pixels")
    parser.add_argument("--sensitivity-images", type=int, default=6)
    parser.add_argument("--noise-step", type=float, default=0.5, help="uniform noise width for the sensitivities")
    parser.add_argument("--out", type=Path, default=REPO / "pillow_sdlatent" / "weights" / "klt_taesd3.safetensors")
    args = parser.parse_args()

    model = load_model(args.model, device="cpu")
    paths = training_paths(args.images, args.every)
    rgbs = [load_crop(p, args.side) for p in paths]
    latents = [model.encode_image(rgb) for rgb in rgbs]
    samples = np.concatenate([z.reshape(z.shape[0], -1) for z in latents], axis=1).astype(np.float64)
    mean = samples.mean(axis=1)
    covariance = np.cov(samples)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    basis = eigenvectors[:, order].T  # rows: components, largest variance first
    basis *= np.sign(basis[np.arange(len(basis)), np.abs(basis).argmax(axis=1)])[:, None]
    variances = eigenvalues[order]
    rng = np.random.default_rng(0)
    picked = slice(0, len(latents), max(1, len(latents) // args.sensitivity_images))
    gains = sensitivities(model, latents[picked], rgbs[picked], basis, args.noise_step, rng)
    weights = 1 / np.sqrt(gains)
    weights /= np.exp(np.mean(np.log(weights)))  # geometric mean 1: the base step keeps its meaning
    print(f"{len(paths)} photos, {samples.shape[1]} latent cells")
    print("k  variance  share  gain  step weight")
    for k in range(len(basis)):
        print(f"{k:2d} {variances[k]:8.4f} {variances[:k + 1].sum() / variances.sum():6.3f} "
              f"{gains[k]:8.2f} {weights[k]:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"matrix": np.ascontiguousarray(basis), "mean": mean, "step_weights": weights.astype(np.float64)},
              str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
