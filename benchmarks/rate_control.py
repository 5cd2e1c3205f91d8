"""Rate-control accuracy: how close `bpp=` and `max_bytes=` land to their targets (Kodak by default).

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/rate_control.py [--bpp 0.1] [--max-bytes 5000]
    python benchmarks/rate_control.py --bpp 0.15 --max-bytes --effort 1     # PSNR at exactly 0.15 bpp, effort 1

Also decodes every file and reports the mean PSNR at each target.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from metrics import psnr
from PIL import Image
from tqdm import tqdm

import pillow_sdlatent  # noqa: F401  (registers the format)

KODAK = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kodak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=KODAK)
    parser.add_argument("--bpp", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--max-bytes", type=int, nargs="*", default=[5000])
    parser.add_argument("--effort", type=int, default=0, help="encoder effort save option")
    args = parser.parse_args()
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    targets = [("bpp", b) for b in args.bpp] + [("max_bytes", m) for m in args.max_bytes]
    ratios: dict[tuple[str, float], list[float]] = {t: [] for t in targets}
    psnrs: dict[tuple[str, float], list[float]] = {t: [] for t in targets}
    for path in tqdm(files, desc="images"):
        with Image.open(path) as image:
            image = image.convert("RGB")
        for kind, value in targets:
            buffer = io.BytesIO()
            image.save(buffer, format="SDL", effort=args.effort, **{kind: value})
            goal = value * image.width * image.height / 8 if kind == "bpp" else value
            ratios[(kind, value)].append(buffer.tell() / goal)
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                psnrs[(kind, value)].append(psnr(np.asarray(image), np.asarray(decoded.convert("RGB"))))
    print(f"\n{len(files)} images from {args.images}, effort {args.effort}: file size / target, and PSNR\n")
    print("| target | mean | min | max | within 3% under | mean PSNR (dB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (kind, value), found in ratios.items():
        hits = sum(0.97 <= r <= 1.0 for r in found)
        print(f"| {kind}={value} | {np.mean(found):.4f} | {min(found):.4f} | {max(found):.4f} | {hits}/{len(found)} "
              f"| {np.mean(psnrs[(kind, value)]):.2f} |")


if __name__ == "__main__":
    main()
