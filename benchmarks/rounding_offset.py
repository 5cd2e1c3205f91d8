"""Rounding offset: how far toward zero the encoder should round its latent (``quantize.ROUNDING_OFFSETS``).

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/rounding_offset.py --model taesd3
    python benchmarks/rounding_offset.py --model taesd3 --from-csv docs/rounding_offset/taesd3.csv

The encoder alone rounds (a reader multiplies symbols back), so the offset is free to choose per
model. The held-out training photos of ``scale_per_rate.py`` (never Kodak), center-cropped to at most
768x512, are saved at each ``--qualities`` with each ``--offsets`` (the whole image: ``scale=1``),
decoded and scored. Prints the mean curves and the BD-rate of each offset against plain rounding
(offset 0) in PSNR, MS-SSIM and ST-LPIPS; writes a CSV and a markdown table.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from bdrate import bd_rate
from PIL import Image
from scale_per_rate import held_out_photos, mean_curves, publish, scored_points, swept_rows

import pillow_sdlatent  # noqa: F401  (registers the format)
from pillow_sdlatent.core import quantize

OUT = Path(__file__).resolve().parent.parent / "docs" / "rounding_offset"
FIELDS = ["image", "offset", "quality", "bytes", "bpp", "psnr", "msssim_db", "stlpips"]
METRICS = (("psnr", 1), ("msssim_db", 1), ("stlpips", -1))  # sign: higher is better after it


def sweep(paths: list[Path], model: str, offsets: list[float], qualities: list[int], csv_path: Path) -> list[dict]:
    def code(image: Image.Image, offset: float, quality: int) -> tuple[bytes, dict]:
        quantize.ROUNDING_OFFSETS[model] = offset
        buffer = io.BytesIO()
        image.save(buffer, format="SDL", model=model, scale=1, quality=quality)
        return buffer.getvalue(), {"offset": offset}

    return scored_points(paths, offsets, qualities, code, FIELDS, csv_path)


def report(rows: list[dict], model: str) -> str:
    curves = mean_curves(rows, "offset")
    photos = len({r["image"] for r in rows})
    lines = [f"`{model}`, {photos} held-out training photos, whole image (`scale=1`). Mean curves "
             "(bpp / PSNR dB / MS-SSIM dB / ST-LPIPS) per quality:", "",
             "| offset | " + " | ".join(f"q{q}" for q in sorted({int(r['quality']) for r in rows})) + " |",
             "| ---: |" + " --- |" * len({r["quality"] for r in rows})]
    for offset, points in curves.items():
        lines.append(f"| {offset:g} | " + " | ".join(
            f"{p['bpp']:.3f} / {p['psnr']:.2f} / {p['msssim_db']:.2f} / {p['stlpips']:.3f}" for p in points) + " |")
    lines += ["", "BD-rate against offset 0 (negative: fewer bits for the same quality):", "",
              "| offset | PSNR | MS-SSIM | ST-LPIPS |", "| ---: | ---: | ---: | ---: |"]
    anchor = curves.get(0.0)
    for offset, points in curves.items():
        if anchor is None or offset == 0:
            continue
        cells = [bd_rate([p["bpp"] for p in anchor], [sign * p[m] for p in anchor],
                         [p["bpp"] for p in points], [sign * p[m] for p in points]) for m, sign in METRICS]
        lines.append(f"| {offset:g} | " + " | ".join("n/a" if np.isnan(c) else f"{c:+.1f}%" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="taesd3")
    parser.add_argument("--photos", type=int, default=6, help="the first N held-out photos (default 6)")
    parser.add_argument("--offsets", default="0,0.1,0.15,0.2")
    parser.add_argument("--qualities", default="10,20,30,40,50")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--from-csv", type=Path, help="re-analyse an earlier run instead of sweeping")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def new_sweep() -> list[dict]:
        return sweep(held_out_photos()[: args.photos], args.model, [float(o) for o in args.offsets.split(",")],
                     [int(q) for q in args.qualities.split(",")], args.out / f"{args.model}.csv")

    publish(report(swept_rows(args.from_csv, new_sweep), args.model), args.out / f"{args.model}.md")


if __name__ == "__main__":
    main()
