"""Payload bytes of the ctx1 coder against zstd on identical quantized latents (Kodak by default).

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/entropy.py [--model taesd] [--steps 0.25 0.38 0.6]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pillow_sdlatent.codec import padded_rgb
from pillow_sdlatent.context_coder import ContextCoder
from pillow_sdlatent.entropy import ZstdCoder
from pillow_sdlatent.models import load_model
from pillow_sdlatent.quantize import DEFAULT_STEP, UniformQuantizer

KODAK = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kodak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=KODAK)
    parser.add_argument("--model", default="taesd")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.25, DEFAULT_STEP, 0.6, 0.8])
    args = parser.parse_args()
    model = load_model(args.model)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    latents, pixels = [], []
    for path in tqdm(files, desc="encode"):
        with Image.open(path) as image:
            latents.append(model.encode_image(padded_rgb(image.convert("RGB"))))
            pixels.append(image.width * image.height)
    zstd, ctx1 = ZstdCoder(), ContextCoder()
    print(f"\n{args.model}, {len(files)} images from {args.images}\n")
    print("| step | zstd bytes/img | ctx1 bytes/img (params+payload) | saving | ctx1 bpp "
          "| ctx1 encode ms | ctx1 decode ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for step in args.steps:
        sizes_z, sizes_c, enc_s, dec_s = [], [], [], []
        for latent in latents:
            symbols = UniformQuantizer.with_step(step, latent.shape[0]).quantize(latent)
            sizes_z.append(sum(map(len, zstd.encode(symbols))))
            start = time.perf_counter()
            params, payload = ctx1.encode(symbols)
            enc_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert np.array_equal(ctx1.decode(params, payload, symbols.shape), symbols)
            dec_s.append(time.perf_counter() - start)
            sizes_c.append(len(params) + len(payload))
        saving = 1 - sum(sizes_c) / sum(sizes_z)
        bpp = np.mean([8 * c / n for c, n in zip(sizes_c, pixels, strict=True)])
        print(f"| {step:.3g} | {np.mean(sizes_z):.0f} | {np.mean(sizes_c):.0f} | {saving:.1%} | {bpp:.3f} | "
              f"{1e3 * np.mean(enc_s):.0f} | {1e3 * np.mean(dec_s):.0f} |")


if __name__ == "__main__":
    main()
