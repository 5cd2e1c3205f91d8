"""Encoder effort with a perceptual term: does it buy ST-LPIPS where squared error alone loses it?

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/perceptual_effort.py --limit 6

Per image and quality (TAESD, the codec's quantizer, ctx1 coder, restorer where it is on by default):
effort 0, effort N on squared error (what the codec does) and effort N on squared error plus the
shift-tolerant LPIPS on a **VGG-16** trunk (``refine_latent(distance=...)``). Scored with PSNR and the
benchmark's ST-LPIPS on an **AlexNet** trunk, a different network. Rate = ctx1 params + payload (the
~100-byte file header left out, the same for all three). Prints mean curves and BD-rates against
effort 0. The VGG pass is slow on a CPU: about a minute per 768x512 photo at effort 1 on two cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bdrate import bd_rate
from metrics import STLPIPS, psnr
from rd import image_paths

from pillow_sdlatent.core.coders.ctx1 import ContextCoder
from pillow_sdlatent.core.quantize import UniformQuantizer, step_for_quality
from pillow_sdlatent.enhance import effort, restore
from pillow_sdlatent.models import load_model
from pillow_sdlatent.pipeline import padded_rgb

KODAK = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kodak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=KODAK)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--qualities", type=int, nargs="+", default=[30, 45, 60])
    parser.add_argument("--effort", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("taesd", runtime="torch")  # refinement needs torch's gradients
    alex, vgg = STLPIPS("alex"), STLPIPS("vgg").net
    files = image_paths(args.images, args.limit)
    variants = ("effort 0", f"effort {args.effort}, squared error", f"effort {args.effort}, + VGG ST-LPIPS")
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for path, quality in tqdm([(f, q) for f in files for q in args.qualities], desc="points"):
        with Image.open(path) as image:
            rgb = padded_rgb(image.convert("RGB"))
            reference = np.asarray(image.convert("RGB"))
        latent = model.encode_image(rgb)
        step = step_for_quality(quality)
        quantizer = UniformQuantizer.with_step(step, latent.shape[0])
        candidates = (latent, effort.refine_latent(model, latent, rgb, step, args.effort),
                      effort.refine_latent(model, latent, rgb, step, args.effort, distance=vgg))
        for name, candidate in zip(variants, candidates, strict=True):
            symbols = quantizer.quantize(candidate)
            size = sum(map(len, ContextCoder().encode(symbols)))
            dequantized = quantizer.dequantize(symbols)
            if restore.has_restorer("taesd", quantizer.steps[0]):
                dequantized = restore.restore_latent(dequantized, quantizer.steps[0], "taesd")
            decoded = model.decode_image(dequantized)[:reference.shape[0], :reference.shape[1]]
            bpp = 8 * size / (reference.shape[0] * reference.shape[1])
            rows.setdefault((name, quality), []).append((bpp, psnr(reference, decoded), alex(reference, decoded)))
    print(f"\n{len(files)} images from {args.images}; rate without the file header\n")
    print("| variant | quality | bpp | PSNR | ST-LPIPS (AlexNet) |\n| --- | ---: | ---: | ---: | ---: |")
    curves = {}
    for name in variants:
        means = [np.mean(rows[(name, q)], axis=0) for q in args.qualities]
        curves[name] = np.asarray(means)
        for q, (bpp, db, lp) in zip(args.qualities, means, strict=True):
            print(f"| {name} | {q} | {bpp:.4f} | {db:.2f} | {lp:.4f} |")
    anchor = curves[variants[0]]
    print("\n| BD-rate vs effort 0 | PSNR | ST-LPIPS |\n| --- | ---: | ---: |")
    for name in variants[1:]:
        test = curves[name]
        print(f"| {name} | {bd_rate(anchor[:, 0], anchor[:, 1], test[:, 0], test[:, 1]):+.1f}% "
              f"| {bd_rate(anchor[:, 0], -anchor[:, 2], test[:, 0], -test[:, 2]):+.1f}% |")


if __name__ == "__main__":
    main()
