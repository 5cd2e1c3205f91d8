"""Fit the linear latent -> RGB maps behind ``Image.draft()`` previews (1/8 scale, no decoder).

For each model: encode 48 training photos (NOT Kodak: /work/shared/data/train), box-average
each photo over the 8x8 pixels a latent cell covers, and solve least squares for
RGB = A * latent + b, where A is a 3x3 linear filter over the latent's neighbourhood
(see ``preview.preview_features``). Writes pillow_sdlatent/weights/preview_maps.json.
Deterministic; a few minutes on 2 CPU cores:

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python training/fit_preview.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pillow_sdlatent.core.registry import REGISTRY
from pillow_sdlatent.models import load_model
from pillow_sdlatent.preview import preview_features

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "pillow_sdlatent" / "weights" / "preview_maps.json"


def training_photos(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rng = np.random.default_rng(0)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(count, len(files)), replace=False))]


def fit(model_name: str, photos: list[Path], crop: int = 256) -> dict[str, list]:
    model = load_model(model_name, device="cpu")
    features, targets = [], []
    for path in photos:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        top, left = (rgb.shape[0] - crop) // 2, (rgb.shape[1] - crop) // 2
        rgb = rgb[top : top + crop, left : left + crop]
        latent = model.encode_image(np.ascontiguousarray(rgb))
        blocks = rgb.reshape(crop // 8, 8, crop // 8, 8, 3).mean(axis=(1, 3))
        features.append(preview_features(latent).reshape(-1, latent.shape[0] * 9))
        targets.append(blocks.reshape(-1, 3))
    x = np.concatenate(features).astype(np.float64)
    y = np.concatenate(targets).astype(np.float64)
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ solution
    print(f"{model_name}: {len(x)} cells, fit RMSE {np.sqrt(np.mean(residual**2)):.2f} levels")
    return {"matrix": solution[:-1].T.round(6).tolist(), "bias": solution[-1].round(4).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=REPO.parent / "shared" / "data" / "train")
    parser.add_argument("--count", type=int, default=48)
    args = parser.parse_args()
    photos = training_photos(args.train, args.count)
    maps = {name: fit(name, photos) for name, spec in REGISTRY.items() if spec.family == "tiny"}
    maps["sd-vae"] = maps["taesd"]  # one latent space
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(json.dumps(maps, indent=1) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
