"""Finer steps on faces: what each step factor does to face crops and to the whole photo at the same rate.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/face_steps.py --csv docs/fidelity/faces/choice.csv

(about 25 minutes on two cores)

Training photos with faces outside every held-out split of the fidelity benchmark (BSDS500, sorted index % 40
not in 0, 10, 20, 30, the first ``--photos`` in which the benchmark's detector finds a face). Each is saved
at each ``--rates`` target with ``faces=False`` and with ``faces=True`` at each ``--factors`` value of
``faces.FACE_STEP_FACTOR``. Face crops are the fidelity benchmark's boxes (its own detector, not the codec's),
scored by PSNR, MS-SSIM and ST-LPIPS; the whole photo by the same three. Prints the means per rate and
configuration and writes one CSV row per photo, configuration and item. ``--refinements`` codes each factor
with each given face refinement (``effort.refine_regions``: iterations, context, learning rate) instead:

    python benchmarks/face_steps.py --rates 0.1 0.15 --factors 0.5 --refinements 0:0 8:6 16:6 8:3 4:6:0.2 \
        --csv docs/fidelity/faces/refined/choice.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from fidelity import CHOICE_HELD_OUT, HELD_OUT_PERIOD, crop, crop_ms_ssim, face_boxes
from metrics import STLPIPS, ReferenceMetrics, psnr
from PIL import Image
from rd import image_paths

from pillow_sdlatent import faces, pipeline
from pillow_sdlatent.enhance import effort

TRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "train"
FIELDS = ["image", "rate", "config", "bytes", "bpp", "kind", "item", "psnr", "msssim", "stlpips"]


def choice_photos(count: int) -> list[tuple[str, np.ndarray, list]]:
    """(name, RGB, the benchmark's face boxes) of the first ``count`` choice photos with a face."""
    found = []
    for index, path in enumerate(image_paths(TRAIN, None)):
        if index % HELD_OUT_PERIOD in CHOICE_HELD_OUT or "BSDS500" not in path.parts:
            continue
        with Image.open(path) as opened:
            rgb = np.asarray(opened.convert("RGB"))
        boxes = face_boxes(rgb)
        if boxes:
            found.append((path.stem, rgb, boxes))
            if len(found) == count:
                break
    return found


def coded(rgb: np.ndarray, rate: float, factor: float | None, refinement: str | None = None) -> tuple[int, np.ndarray]:
    """Bytes and decoded RGB of ``rgb`` at ``rate`` bpp; ``factor`` None: without face regions. ``refinement``
    ``ITERATIONS:CONTEXT[:LEARNING_RATE]`` sets ``effort.refine_regions``' (default: the codec's)."""
    faces.FACE_STEP_FACTOR = factor or 1.0
    defaults = effort.REGION_ITERATIONS, effort.REGION_CONTEXT, effort.REGION_LEARNING_RATE
    if refinement is not None:
        iterations, context, *learning_rate = refinement.split(":")
        effort.REGION_ITERATIONS, effort.REGION_CONTEXT = int(iterations), int(context)
        effort.REGION_LEARNING_RATE = float(learning_rate[0]) if learning_rate else defaults[2]
    try:
        data = pipeline.encode_image(Image.fromarray(rgb), {"bpp": rate, "faces": factor is not None})
    finally:
        effort.REGION_ITERATIONS, effort.REGION_CONTEXT, effort.REGION_LEARNING_RATE = defaults
    return len(data), np.asarray(pipeline.decode_file(io.BytesIO(data)).convert("RGB"))


def config_name(factor: float | None, refinement: str | None) -> str:
    if factor is None:
        return "off"
    return f"factor {factor}" + ("" if refinement is None else f", refined {refinement}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=14)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.15])
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--refinements", nargs="+", metavar="ITERATIONS:CONTEXT[:LEARNING_RATE]",
                        help="code each factor with each of these face refinements (0:0 for none) instead of the "
                             "codec's")
    parser.add_argument("--csv", type=Path, required=True)
    args = parser.parse_args(argv)
    configs = [(None, None), *((factor, refinement) for factor in args.factors
                               for refinement in args.refinements or [None])]
    stlpips = STLPIPS()
    rows = []
    for name, rgb, boxes in choice_photos(args.photos):
        whole = ReferenceMetrics(stlpips, rgb)
        for rate in args.rates:
            for factor, refinement in configs:
                size, decoded = coded(rgb, rate, factor, refinement)
                common = {"image": name, "rate": rate, "config": config_name(factor, refinement),
                          "bytes": size, "bpp": size * 8 / (rgb.shape[0] * rgb.shape[1])}
                values = whole(decoded)
                rows.append({**common, "kind": "whole", "item": "",
                             **{k: values[k] for k in ("psnr", "msssim", "stlpips")}})
                for item, box in enumerate(boxes):
                    reference, face = crop(rgb, box), crop(decoded, box)
                    rows.append({**common, "kind": "face", "item": item, "psnr": psnr(reference, face),
                                 "msssim": crop_ms_ssim(reference, face), "stlpips": stlpips(reference, face)})
                print(name, rate, common["config"], size, f"{rows[-1]['psnr']:.2f}", file=sys.stderr)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as fp:
        writer = csv.DictWriter(fp, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    groups = defaultdict(list)
    for row in rows:
        groups[(row["rate"], row["config"], row["kind"])].append(row)
    print("| rate | config | bpp | faces | face PSNR / MS-SSIM / ST-LPIPS | whole PSNR / MS-SSIM / ST-LPIPS |")
    print("| ---: | --- | ---: | ---: | --- | --- |")
    for rate in args.rates:
        for config in (config_name(factor, refinement) for factor, refinement in configs):
            face, whole = groups[(rate, config, "face")], groups[(rate, config, "whole")]

            def means(items: list[dict]) -> str:
                return " / ".join(f"{np.mean([r[k] for r in items]):.{d}f}"
                                  for k, d in (("psnr", 2), ("msssim", 4), ("stlpips", 3)))
            print(f"| {rate} | {config} | {np.mean([r['bpp'] for r in whole]):.3f} | {len(face)} | {means(face)} "
                  f"| {means(whole)} |")


if __name__ == "__main__":
    main()
