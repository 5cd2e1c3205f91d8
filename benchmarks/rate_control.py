"""Rate-control accuracy: how close `bpp=` and `max_bytes=` land to their targets (Kodak by default).

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/rate_control.py [--bpp 0.1] [--max-bytes 5000]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import pillow_sdlatent  # noqa: F401  (registers the format)

KODAK = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kodak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=KODAK)
    parser.add_argument("--bpp", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--max-bytes", type=int, nargs="+", default=[5000])
    args = parser.parse_args()
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    targets = [("bpp", b) for b in args.bpp] + [("max_bytes", m) for m in args.max_bytes]
    ratios: dict[tuple[str, float], list[float]] = {t: [] for t in targets}
    for path in tqdm(files, desc="images"):
        with Image.open(path) as image:
            image = image.convert("RGB")
        for kind, value in targets:
            buffer = io.BytesIO()
            image.save(buffer, format="SDL", **{kind: value})
            goal = value * image.width * image.height / 8 if kind == "bpp" else value
            ratios[(kind, value)].append(buffer.tell() / goal)
    print(f"\n{len(files)} images from {args.images}: file size / target\n")
    print("| target | mean | min | max | within 3% under |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (kind, value), found in ratios.items():
        hits = sum(0.97 <= r <= 1.0 for r in found)
        print(f"| {kind}={value} | {np.mean(found):.4f} | {min(found):.4f} | {max(found):.4f} | {hits}/{len(found)} |")


if __name__ == "__main__":
    main()
