"""Scale per rate: at which rates coding a downscaled image beats coding the whole one.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/scale_per_rate.py
    python benchmarks/scale_per_rate.py --from-csv docs/scale_per_rate/scale_per_rate.csv

Held-out training photos by default (every 11th Sun-Hays80 photo and every 31st Urban100 photo,
center-cropped to at most 768x512; never Kodak): each is saved at every ``--scales`` x
``--qualities`` with that ``scale`` forced, decoded, and scored at full size. Prints, per rate, the
scale with the lowest mean ST-LPIPS (what ``rate.BPP_SCALES`` holds), the BD-rate of each scale
against scale 1, and the mean rate per step at each scale (``rate.RATE_CURVES``); writes a CSV, a
markdown table and ST-LPIPS/PSNR plots.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bdrate import bd_rate
from metrics import STLPIPS, ReferenceMetrics
from PIL import Image
from rd import image_paths
from tqdm import tqdm

import pillow_sdlatent  # noqa: F401  (registers the format)
from pillow_sdlatent.core import container, quantize, read

TRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "train"
OUT = Path(__file__).resolve().parent.parent / "docs" / "scale_per_rate"
FIELDS = ["image", "scale", "quality", "step", "bytes", "bpp", "psnr", "msssim_db", "stlpips"]
#: rates at which the winning scale is reported (bits per pixel)
REPORT_RATES = (0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.14, 0.16, 0.2,
                0.25, 0.3, 0.4)


def held_out_photos() -> list[Path]:
    return image_paths(TRAIN / "Sun_Hays80", 7, every=11) + image_paths(TRAIN / "Urban100", 3, every=31)


def center_crop(image: Image.Image, width: int = 768, height: int = 512) -> Image.Image:
    if image.width < image.height:
        width, height = height, width
    width, height = min(width, image.width), min(height, image.height)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def base_step(quantizer: quantize.Quantizer) -> float:
    """The step the encoder was asked for: ``klt`` stores it times each component's weight."""
    transform = getattr(quantizer, "transform", None)
    return quantizer.steps[0] / float(transform.step_weights[0]) if transform is not None else quantizer.steps[0]


def sweep(paths: list[Path], model: str, scales: list[float], qualities: list[int], csv_path: Path) -> list[dict]:
    def code(image: Image.Image, scale: float, quality: int) -> tuple[bytes, dict]:
        buffer = io.BytesIO()
        image.save(buffer, format="SDL", model=model, scale=scale, quality=quality)
        data = buffer.getvalue()
        header = container.read_layout(io.BytesIO(data)).header
        return data, {"scale": scale, "step": base_step(read.file_quantizer(header))}

    return scored_points(paths, scales, qualities, code, FIELDS, csv_path)


def scored_points(paths: list[Path], variants: list[float], qualities: list[int],
                  code: Callable[[Image.Image, float, int], tuple[bytes, dict]], fields: list[str],
                  csv_path: Path) -> list[dict]:
    """Each photo (centre-cropped) coded by ``code`` at every variant and quality, decoded and scored at
    full size; one CSV row per point (``code`` adds its own fields), written as it goes."""
    stlpips = STLPIPS()
    rows = []
    with open(csv_path, "w", newline="") as handle, tqdm(total=len(paths) * len(variants) * len(qualities),
                                                          unit="pt", file=sys.stderr) as bar:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        for path in paths:
            with Image.open(path) as opened:
                image = center_crop(opened.convert("RGB"))
            reference = ReferenceMetrics(stlpips, np.asarray(image))
            for variant in variants:
                for quality in qualities:
                    data, extra = code(image, variant, quality)
                    with Image.open(io.BytesIO(data)) as decoded:
                        scores = reference(np.asarray(decoded.convert("RGB")))
                    row = {"image": path.name, "quality": quality, "bytes": len(data), **extra,
                           "bpp": len(data) * 8 / (image.width * image.height),
                           **{k: scores[k] for k in ("psnr", "msssim_db", "stlpips")}}
                    writer.writerow(row)
                    handle.flush()
                    rows.append(row)
                    bar.update()
    return rows


def mean_curves(rows: list[dict], key: str = "scale") -> dict[float, list[dict[str, float]]]:
    """``key`` value -> points (mean over images at each quality), by rate."""
    groups: dict[tuple[float, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[float(row[key]), int(row["quality"])].append(row)
    curves: dict[float, list[dict[str, float]]] = defaultdict(list)
    for (value, _), members in sorted(groups.items()):
        curves[value].append({k: float(np.mean([float(m[k]) for m in members]))
                              for k in ("step", "bpp", "psnr", "msssim_db", "stlpips") if k in members[0]})
    return {value: sorted(points, key=lambda p: p["bpp"]) for value, points in sorted(curves.items())}


def at_rate(points: list[dict[str, float]], metric: str, bpp: float) -> float:
    """The metric at ``bpp`` by interpolation in log rate; NaN outside the curve."""
    rates = np.log([p["bpp"] for p in points])
    if not rates[0] <= math.log(bpp) <= rates[-1]:
        return float("nan")
    return float(np.interp(math.log(bpp), rates, [p[metric] for p in points]))


def rate_curves(curves: dict[float, list[dict[str, float]]]) -> str:
    """``rate.RATE_CURVES``' entry for these curves: (step, mean bpp) per scale, by step."""
    lines = []
    for scale, points in curves.items():
        steps = {}  # qualities whose steps clamp to the same value give one point
        for point in sorted(points, key=lambda p: p["step"]):
            steps.setdefault(f"{point['step']:.3f}", point["bpp"])
        pairs = ", ".join(f"({step}, {bpp:.4f})" for step, bpp in steps.items())
        lines.append(f"    {scale:g}: ({pairs}),")
    return "\n".join(["{", *lines, "}"])


def best_scale_table(curves: dict[float, list[dict[str, float]]], metric: str, lower_is_better: bool) -> list[str]:
    """Markdown rows: the metric per scale at each of REPORT_RATES, the best in bold."""
    scales = list(curves)
    lines = ["| bpp | " + " | ".join(f"scale {s:g}" for s in scales) + " | best |",
             "| ---: |" + " ---: |" * (len(scales) + 1)]
    for bpp in REPORT_RATES:
        values = {s: at_rate(curves[s], metric, bpp) for s in scales}
        finite = {s: (v if lower_is_better else -v) for s, v in values.items() if math.isfinite(v)}
        best = min(finite, key=finite.get) if finite else None
        cells = [("**{:.4f}**" if s == best else "{:.4f}").format(v) if math.isfinite(v) else "-"
                 for s, v in values.items()]
        lines.append(f"| {bpp:g} | " + " | ".join(cells) + f" | {best if best is not None else '-'} |")
    return lines


def report(rows: list[dict], model: str, out: Path) -> str:
    curves = mean_curves(rows)
    scales = list(curves)
    photos = len({r["image"] for r in rows})
    lines = [f"`{model}`: mean of {photos} held-out training photos, ST-LPIPS (AlexNet) at each rate, "
             "per coded scale (lower is better; best in bold):", "",
             *best_scale_table(curves, "stlpips", lower_is_better=True),
             "", "PSNR (dB) at each rate, per coded scale (higher is better; best in bold):", "",
             *best_scale_table(curves, "psnr", lower_is_better=False)]
    lines += ["", "BD-rate of each scale against scale 1 over 0.05-0.2 bpp (negative: fewer bits):", "",
              "| scale | ST-LPIPS | PSNR |", "| ---: | ---: | ---: |"]
    full = curves.get(1.0)
    for scale in scales:
        if full is None or scale == 1.0:
            continue
        cells = []
        for metric, sign in (("stlpips", -1), ("psnr", 1)):
            value = bd_rate([p["bpp"] for p in full], [sign * p[metric] for p in full],
                            [p["bpp"] for p in curves[scale]], [sign * p[metric] for p in curves[scale]],
                            rate_range=(0.05, 0.2))
            cells.append("n/a" if math.isnan(value) else f"{value:+.1f}%")
        lines.append(f"| {scale:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean rate per step and scale, as `rate.RATE_CURVES['{model}']`:", "", "```python",
              rate_curves(curves), "```"]
    plot(curves, model, out)
    return "\n".join(lines)


def plot(curves: dict[float, list[dict[str, float]]], model: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, label in (("stlpips", "ST-LPIPS (AlexNet), lower is better"), ("psnr", "PSNR (dB)")):
        fig, ax = plt.subplots(figsize=(7, 5))
        for scale, points in curves.items():
            ax.plot([p["bpp"] for p in points], [p[metric] for p in points], marker="o", ms=3,
                    label=f"scale {scale:g}")
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (of the full-size image)")
        ax.set_ylabel(label)
        ax.set_title(f"{model}, coded at a fraction of the size, resampled up on decode")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"scale_{metric}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of photos (default: held-out training photos)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--model", default="taesd", help="the model to code with (default taesd)")
    parser.add_argument("--scales", default="1,0.875,0.75,0.625,0.5")
    parser.add_argument("--qualities", default="10,20,30,40,50,60,70,80")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--from-csv", type=Path, help="re-analyse an earlier run instead of sweeping")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def new_sweep() -> list[dict]:
        paths = image_paths(args.images, args.limit) if args.images else held_out_photos()
        return sweep(paths, args.model, [float(s) for s in args.scales.split(",")],
                     [int(q) for q in args.qualities.split(",")], args.out / "scale_per_rate.csv")

    publish(report(swept_rows(args.from_csv, new_sweep), args.model, args.out), args.out / "scale_per_rate.md")


def swept_rows(from_csv: Path | None, new_sweep: Callable[[], list[dict]]) -> list[dict]:
    """The points of an earlier run's CSV (``--from-csv``: re-analysing costs no coding), else of a new sweep."""
    if from_csv is None:
        return new_sweep()
    with open(from_csv, newline="") as handle:
        return list(csv.DictReader(handle))


def publish(text: str, path: Path) -> None:
    path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
