"""Throughput of ``pillow_sdlatent.convert``: images/s to encode (to .sdl) and decode (to PNG), per engine and workers.

``python benchmarks/convert.py [--images 16] [--size 256] [--repeats 2] [--workers 1 2] [--out docs/scaleout]``

Inputs are centre crops of held-out training photos (sorted image paths, index % 40 in {0, 20}),
saved as PNG. Every run writes into a fresh folder; the best of ``--repeats`` wall times counts.
Wall time includes starting the Ray actors and loading the model in each; ``per_image_s`` and
``per_image_cpu_s`` are the medians of the report's per-file wall and CPU seconds (load, share of the
model batch and entropy coding, write) in that run: the cost of one file on one worker, the CPU
time being the figure a shared machine distorts least. ``resume_s`` is a rerun over the finished outputs
(every file verified and skipped).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PILLOW_SDLATENT_MODELS", str(REPO.parent / "shared" / "models" / "taesd"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from pillow_sdlatent.convert import Summary, convert  # noqa: E402

TRAIN = REPO.parent / "shared" / "data" / "train"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COLUMNS = ("task", "engine", "workers", "images", "size", "best_s", "images_per_s", "per_image_s",
           "per_image_cpu_s", "resume_s", "repeats")


def held_out_photos() -> list[Path]:
    photos = sorted(p for p in TRAIN.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [p for index, p in enumerate(photos) if index % 40 in (0, 20)]


def write_crops(photos: list[Path], size: int, folder: Path) -> None:
    for photo in photos:
        with Image.open(photo) as image:
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image.convert("RGB").crop((left, top, left + size, top + size)).save(folder / f"{photo.stem}.png")


def median_seconds(summary: Summary) -> tuple[float, float]:
    """The median wall and CPU seconds per converted file in the run's report."""
    with open(summary.report, newline="") as fp:
        rows = [row for row in csv.DictReader(fp) if row["outcome"] == "done"]
    return (statistics.median(float(row["seconds"]) for row in rows),
            statistics.median(float(row["cpu_seconds"]) for row in rows))


def measure(task: str, engine: str, workers: int, source: Path, work: Path, repeats: int,
            options: dict) -> tuple[dict, Path]:
    """Best of ``repeats`` fresh runs, then one rerun over the last run's outputs."""
    to = "sdl" if task == "encode" else "png"
    runs = []
    for repeat in range(repeats):
        out = work / f"{task}-{engine}-{workers}-{repeat}"
        summary = convert([source], out, to=to, engine=engine, workers=workers if engine == "ray" else None,
                          options=options, progress=False)
        if summary.failed:
            raise SystemExit(f"{summary.failed} files failed: {summary.failures[:3]}")
        runs.append((summary.seconds, *median_seconds(summary), out))
    best, per_image, per_image_cpu, out = min(runs)
    resume = convert([source], out, to=to, engine=engine, workers=workers if engine == "ray" else None,
                     options=options, progress=False)
    images = resume.skipped
    row = {"task": task, "engine": engine, "workers": workers, "images": images, "best_s": round(best, 2),
           "images_per_s": round(images / best, 3), "per_image_s": round(per_image, 3),
           "per_image_cpu_s": round(per_image_cpu, 3),
           "resume_s": round(resume.seconds, 2), "repeats": repeats}
    return row, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="side of the centre crops")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts")
    parser.add_argument("--no-local", action="store_true", help="skip the local engine")
    parser.add_argument("--address", help="Ray cluster (default: a local one with as many CPUs as the machine)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "scaleout")
    args = parser.parse_args()

    import ray

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    options = {"quality": 75, "scale": 1}
    configs = ([] if args.no_local else [("local", 1)]) + [("ray", workers) for workers in args.workers]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdl-convert-bench-") as temp:
        work = Path(temp)
        source = work / "photos"
        source.mkdir()
        write_crops(held_out_photos()[: args.images], args.size, source)
        encoded = None
        for engine, workers in configs:
            row, out = measure("encode", engine, workers, source, work, args.repeats, options)
            encoded = encoded or out
            rows.append(row | {"size": f"{args.size}x{args.size}"})
            print(row, flush=True)
        for engine, workers in configs:
            row, _ = measure("decode", engine, workers, encoded, work, args.repeats, {})
            rows.append(row | {"size": f"{args.size}x{args.size}"})
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "convert.csv", "w", newline="") as fp:
        writer = csv.DictWriter(fp, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print("\n| task | engine | workers | images | best wall s | images/s | per image: wall s | CPU s | rerun s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['task']} | {row['engine']} | {row['workers']} | {row['images']} | {row['best_s']} | "
              f"{row['images_per_s']} | {row['per_image_s']} | {row['per_image_cpu_s']} | {row['resume_s']} |")


if __name__ == "__main__":
    main()
