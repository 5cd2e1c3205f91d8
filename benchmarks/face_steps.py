"""Finer steps on faces: what each step factor does to face crops and to the whole photo at the same rate.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/face_steps.py --csv docs/fidelity/faces/choice.csv

(about 25 minutes on two cores)

Training photos with faces outside every held-out split of the fidelity benchmark (BSDS500, sorted index % 40
not in 0, 10, 20, 30, the first ``--photos`` in which the benchmark's detector finds a face). Each is saved
at each ``--rates`` target with ``faces=False`` and with ``faces=True`` at each ``--factors`` value of
``faces.FACE_STEP_FACTOR``. Face crops are the fidelity benchmark's boxes (its own detector, not the codec's),
scored by PSNR, MS-SSIM and ST-LPIPS; the whole photo by the same three. Prints the means per rate and
configuration and writes one CSV row per photo, configuration and item.
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


def coded(rgb: np.ndarray, rate: float, factor: float | None) -> tuple[int, np.ndarray]:
    """Bytes and decoded RGB of ``rgb`` at ``rate`` bpp; ``factor`` None: without face regions."""
    faces.FACE_STEP_FACTOR = factor or 1.0
    data = pipeline.encode_image(Image.fromarray(rgb), {"bpp": rate, "faces": factor is not None})
    return len(data), np.asarray(pipeline.decode_file(io.BytesIO(data)).convert("RGB"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=14)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.15])
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--csv", type=Path, required=True)
    args = parser.parse_args(argv)
    stlpips = STLPIPS()
    rows = []
    for name, rgb, boxes in choice_photos(args.photos):
        whole = ReferenceMetrics(stlpips, rgb)
        for rate in args.rates:
            for factor in [None, *args.factors]:
                size, decoded = coded(rgb, rate, factor)
                common = {"image": name, "rate": rate, "config": "off" if factor is None else f"factor {factor}",
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
        for config in ["off", *(f"factor {f}" for f in args.factors)]:
            face, whole = groups[(rate, config, "face")], groups[(rate, config, "whole")]

            def means(items: list[dict]) -> str:
                return " / ".join(f"{np.mean([r[k] for r in items]):.{d}f}"
                                  for k, d in (("psnr", 2), ("msssim", 4), ("stlpips", 3)))
            print(f"| {rate} | {config} | {np.mean([r['bpp'] for r in whole]):.3f} | {len(face)} | {means(face)} "
                  f"| {means(whole)} |")


if __name__ == "__main__":
    main()
