"""A pixel-domain correction layer against spending the same bytes on the latent.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/pixel_correction.py \
        --csv docs/fidelity/pixel_correction/pixel_correction.csv

(about 15 minutes on two cores)

The autoencoder's decode misses low frequencies a conventional codec keeps (colour casts, shading), and the
encoder holds the original. So a file could carry a coarse grid of the residual (original minus decode),
bilinearly upsampled by the reader and added to the picture: over the whole image, or finer over the faces
the encoder finds. This measures whether such a layer beats giving its bytes to the latent. For each photo
and target rate: the ``.sdl`` file at that rate (the baseline); then, per grid (where: whole image or face
boxes; cell in pixels; step in levels), the grid fitted by least squares to the residual of the baseline's
decode is coded with ``ctx1`` to learn its size, the latent is coded again in the baseline's bytes minus
that size (``max_bytes``), the grid is fitted again to that file's residual, and the picture with the
correction added is scored at the total size. Photos: training photos outside every held-out split, the
first ``--photos`` of those with sorted index % 40 == 5 and the first ``--face-photos`` BSDS500 photos with a
face (``face_steps.choice_photos``); face grids where the codec's detector finds a face. Besides the whole
photo, the face crops of those photos are scored (PSNR over the fidelity benchmark's own boxes).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from face_steps import TRAIN, choice_photos
from fidelity import crop
from metrics import STLPIPS, ReferenceMetrics, psnr
from PIL import Image
from rd import image_paths

from pillow_sdlatent import faces, pipeline
from pillow_sdlatent.core.coders import get_coder

HELD_OUT_PERIOD, CHOICE_INDEX = 40, 5
#: (where, cell px, step in levels); where "whole" is one box over the picture, "faces" the detector's boxes
GRIDS = (("whole", 16, 12), ("whole", 32, 6), ("whole", 32, 12), ("faces", 8, 24), ("faces", 16, 12))
#: bytes a chunk of its own would add around each coded grid: length, type, CRC, cell, step
CHUNK_OVERHEAD = 14
FIELDS = ["image", "rate", "grid", "bytes", "correction_bytes", "psnr", "msssim", "stlpips", "face_psnr"]
Box = tuple[int, int, int, int]


def bilinear(size: int, cells: int, cell: int) -> np.ndarray:
    """(size, cells) weights: pixel centres on a grid of ``cell``-pixel cells, clamped at the edges."""
    position = np.clip((np.arange(size) + 0.5) / cell - 0.5, 0, cells - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, cells - 1)
    weights = np.zeros((size, cells))
    np.add.at(weights, (np.arange(size), low), 1 - (position - low))
    np.add.at(weights, (np.arange(size), high), position - low)
    return weights


def corrected(original: np.ndarray, decoded: np.ndarray, boxes: list[Box], cell: int, step: float
              ) -> tuple[np.ndarray, int]:
    """``decoded`` with each box's residual grid added, and the grids' coded bytes."""
    out = decoded.astype(np.float64)
    size = 0
    for x0, y0, x1, y1 in boxes:
        residual = (original[y0:y1, x0:x1].astype(np.float64) - out[y0:y1, x0:x1]).transpose(2, 0, 1)
        rows = bilinear(y1 - y0, -(-(y1 - y0) // cell), cell)
        columns = bilinear(x1 - x0, -(-(x1 - x0) // cell), cell)
        grid = np.einsum("iy,cyx,jx->cij", np.linalg.pinv(rows), residual, np.linalg.pinv(columns))
        symbols = np.rint(grid / step).astype(np.int32)
        params, payload = get_coder("ctx1").encode(symbols)
        size += len(params) + len(payload) + CHUNK_OVERHEAD
        out[y0:y1, x0:x1] += np.einsum("yi,cij,xj->yxc", rows, symbols * step, columns)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), size


def face_boxes(image: Image.Image) -> list[Box]:
    """The codec's face boxes, a quarter wider on each side (the hair line and chin)."""
    boxes = []
    for x0, y0, x1, y1 in faces.face_boxes(image):
        margin = (x1 - x0) // 4
        boxes.append((max(0, x0 - margin), max(0, y0 - margin), min(image.width, x1 + margin),
                      min(image.height, y1 + margin)))
    return boxes


def rgb_of(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        return np.asarray(opened.convert("RGB"))


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(pipeline.decode_file(data).convert("RGB"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--face-photos", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.15])
    parser.add_argument("--csv", type=Path, required=True)
    args = parser.parse_args(argv)
    stlpips = STLPIPS()
    rows = []
    photos = [(path.stem, rgb_of(path), []) for index, path in enumerate(image_paths(TRAIN, None))
              if index % HELD_OUT_PERIOD == CHOICE_INDEX][:args.photos]
    photos += choice_photos(args.face_photos)  # (name, RGB, the fidelity benchmark's face boxes), as above
    for name, original, scored_faces in photos:
        image = Image.fromarray(original)
        metrics = ReferenceMetrics(stlpips, original)
        boxes = {"whole": [(0, 0, image.width, image.height)], "faces": face_boxes(image)}
        for rate in args.rates:
            base = pipeline.encode_image(image, {"bpp": rate})
            base_picture = decoded(base)
            scored = [("none", len(base), 0, base_picture)]
            for where, cell, step in GRIDS:
                if not boxes[where]:
                    continue
                _, size = corrected(original, base_picture, boxes[where], cell, step)
                if size >= len(base) // 3:  # the latent would keep too little to be a fair trade
                    continue
                latent_file = pipeline.encode_image(image, {"max_bytes": len(base) - size})
                picture, size = corrected(original, decoded(latent_file), boxes[where], cell, step)
                scored.append((f"{where} {cell}px/{step}", len(latent_file) + size, size, picture))
            for grid, size, correction, picture in scored:
                values = metrics(picture)
                face_psnr = np.mean([psnr(crop(original, box), crop(picture, box)) for box in scored_faces]) \
                    if scored_faces else float("nan")
                rows.append({"image": name, "rate": rate, "grid": grid, "bytes": size, "correction_bytes": correction,
                             "face_psnr": face_psnr, **{k: values[k] for k in ("psnr", "msssim", "stlpips")}})
                print(name, rate, grid, size, f"{values['psnr']:.2f}", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Mean change against the baseline of the same photo and rate, over the photos each grid was tried on."""
    base = {(r["image"], r["rate"]): r for r in rows if r["grid"] == "none"}
    changes: dict[tuple[float, str], list[list[float]]] = defaultdict(list)
    for row in rows:
        if row["grid"] != "none":
            ref = base[(row["image"], row["rate"])]
            changes[(row["rate"], row["grid"])].append(
                [100 * (row["bytes"] / ref["bytes"] - 1), 100 * row["correction_bytes"] / row["bytes"],
                 row["psnr"] - ref["psnr"], row["msssim"] - ref["msssim"], row["stlpips"] - ref["stlpips"],
                 row["face_psnr"] - ref["face_psnr"]])
    print("| rate | grid | photos | bytes | grid's share | PSNR | MS-SSIM | ST-LPIPS | face crops' PSNR |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (rate, grid), values in sorted(changes.items()):
        size, share, whole, msssim, stlpips = np.mean(values, axis=0)[:5]
        faces_changed = [v[5] for v in values if not np.isnan(v[5])]
        face = f"{np.mean(faces_changed):+.2f} dB ({len(faces_changed)})" if faces_changed else ""
        print(f"| {rate} | {grid} | {len(values)} | {size:+.1f}% | {share:.1f}% | {whole:+.2f} dB | {msssim:+.4f} | "
              f"{stlpips:+.4f} | {face} |")


if __name__ == "__main__":
    sys.exit(main())
