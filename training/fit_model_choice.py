"""Measure taesd against taesd3 (klt quantizer) per rate, to set the automatic model choice.

Codes centre crops of training photos that are not held out (sorted index % 40 not 0 or 20)
at fixed rates with each model and prints mean PSNR and MS-SSIM (dB) per rate: the distortions a
rewritten face or letter cannot hide from. An earlier ``rate.HIGH_RATE_BPP`` was set from this table; the
value now comes from benchmarks/scale_per_rate.py's crossings (see its comment in rate.py).

    python training/fit_model_choice.py --every 60 --rates 0.06,0.1,0.15,0.2,0.3
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from fit_klt import load_crop, training_paths
from PIL import Image

import pillow_sdlatent  # noqa: F401  (registers the format)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from metrics import ms_ssim, msssim_db, psnr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "train")
    parser.add_argument("--every", type=int, default=60)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--rates", default="0.06,0.1,0.15,0.2,0.3")
    parser.add_argument("--models", default="taesd,taesd3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates = [float(r) for r in args.rates.split(",")]
    models = args.models.split(",")
    scores: dict[tuple[str, float], list[tuple[float, float, float]]] = {}
    for path in training_paths(args.images, args.every):
        rgb = load_crop(path, args.side)
        image = Image.fromarray(rgb)
        for rate in rates:
            for model in models:
                buffer = io.BytesIO()
                image.save(buffer, "SDL", model=model, bpp=rate)
                decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
                bpp = len(buffer.getvalue()) * 8 / (image.width * image.height)
                scores.setdefault((model, rate), []).append((bpp, psnr(rgb, decoded), msssim_db(ms_ssim(rgb, decoded))))
        print(path.name, {f"{m}@{r}": round(scores[m, r][-1][1], 2) for r in rates for m in models}, flush=True)
    print("model  target_bpp  bpp  PSNR  MS-SSIM(dB)")
    for (model, rate), rows in sorted(scores.items(), key=lambda item: (item[0][1], item[0][0])):
        bpp, p, m = np.mean(rows, axis=0)
        print(f"{model:7s} {rate:5.2f} {bpp:6.3f} {p:6.2f} {m:6.2f}")


if __name__ == "__main__":
    main()
