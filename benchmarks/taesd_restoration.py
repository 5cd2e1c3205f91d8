"""Which restoration serves a ``taesd`` file best at its step: the latent restorer, the restoring decoder for
its coded scale, or both (what ``restore.DECODER_STEPS`` and ``restore.restores_latent`` decide).

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/taesd_restoration.py \\
        --targets 20 30 40 50 60 0.06 0.08 0.1

Training photos outside every held-out set (sorted index % 40 == 10; never Kodak), centre-cropped to at
most 768x512 (512x768 upright; ``scale_per_rate.center_crop``), saved with ``model="taesd"`` at each
target (a number from 1 up: a quality; below: ``bpp``). Each file's latent is decoded four ways and
scored at full size; prints one row per file and the means per target, and writes a CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from metrics import STLPIPS, psnr
from PIL import Image
from rd import image_paths
from scale_per_rate import center_crop

from pillow_sdlatent import pipeline
from pillow_sdlatent.core.read import file_quantizer, read_latent
from pillow_sdlatent.enhance import restore
from pillow_sdlatent.models import load_model

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent.parent / "shared" / "data" / "train"
OUT = HERE.parent / "docs" / "fidelity" / "restoring_decoder" / "taesd_steps.csv"
WAYS = ("plain", "restorer", "decoder", "both")


def decodes(data: bytes) -> tuple[float, float, dict[str, Image.Image]]:
    """The file's largest step, its coded scale, and its picture decoded each of the four ways."""
    header = pipeline.read_checked_layout(io.BytesIO(data)).header
    step, scale = max(file_quantizer(header).steps), pipeline.coded_scale(header)
    model = load_model("taesd")
    latent = read_latent(data)
    restored = restore.restore_latent(latent, step, "taesd")
    file = restore.decoder_file("taesd", scale)
    tuned = model if file is None else restore.decoding_with(model, file)
    pairs = {"plain": (model, latent), "restorer": (model, restored), "decoder": (tuned, latent),
             "both": (tuned, restored)}
    return step, scale, {way: pipeline.full_size(decoder.decode_image(z), header)
                         for way, (decoder, z) in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=6)
    parser.add_argument("--targets", type=float, nargs="+", default=[20, 30, 40, 50, 60, 0.06, 0.08, 0.1])
    parser.add_argument("--csv", type=Path, default=OUT)
    args = parser.parse_args()
    lpips = STLPIPS("alex")
    rows = []
    for path in image_paths(TRAIN, args.photos, every=40, offset=10):
        with Image.open(path) as opened:
            photo = center_crop(opened.convert("RGB"))
        reference = np.asarray(photo)
        for target in args.targets:
            buffer = io.BytesIO()
            photo.save(buffer, format="SDL", model="taesd",
                       **({"quality": int(target)} if target >= 1 else {"bpp": target}))
            step, scale, pictures = decodes(buffer.getvalue())
            row = {"image": path.name, "target": target, "step": round(step, 4), "scale": round(scale, 4),
                   "bpp": len(buffer.getvalue()) * 8 / (photo.width * photo.height)}
            for way, picture in pictures.items():
                row[f"{way}_psnr"] = psnr(reference, np.asarray(picture))
                row[f"{way}_stlpips"] = lpips(reference, np.asarray(picture))
            rows.append(row)
            print(f"{path.name} {target:g}: step {step:.3f}, scale {scale:.3f}, " + ", ".join(
                f"{way} {row[f'{way}_psnr']:.2f}/{row[f'{way}_stlpips']:.4f}" for way in WAYS), flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| target | steps | " + " | ".join(f"{way} PSNR / ST-LPIPS" for way in WAYS) + " |")
    print("| ---: | --- | " + " | ".join("---" for _ in WAYS) + " |")
    for target in args.targets:
        of = [row for row in rows if row["target"] == target]
        steps = f"{min(r['step'] for r in of):.2f}-{max(r['step'] for r in of):.2f}"
        print(f"| {target:g} | {steps} | " + " | ".join(
            f"{np.mean([r[f'{way}_psnr'] for r in of]):.2f} / {np.mean([r[f'{way}_stlpips'] for r in of]):.4f}"
            for way in WAYS) + " |")
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
