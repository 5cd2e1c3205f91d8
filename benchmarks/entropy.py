"""Payload bytes of the ctx2 and ctx1 coders against zstd on identical quantized latents (Kodak by default).

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/entropy.py [--model taesd] [--steps 0.25 0.38 0.6]
        [--repeat 3]

Times are per image: encode once, decode the best of ``--repeat`` runs, wall clock and CPU (the
CPU time of the process, less disturbed by other load on a shared machine). "wavefronts" counts
the decoder's sequential steps per image (one batched model evaluation each), which no load changes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pillow_sdlatent.core.coders import ZstdCoder, ctx1, ctx2
from pillow_sdlatent.core.coders.ctx1 import ContextCoder
from pillow_sdlatent.core.coders.ctx2 import NETWORKS, LearnedContextCoder
from pillow_sdlatent.core.quantize import DEFAULT_STEP, UniformQuantizer
from pillow_sdlatent.models import load_model
from pillow_sdlatent.pipeline import padded_rgb

KODAK = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kodak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=KODAK)
    parser.add_argument("--model", default="taesd")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.25, DEFAULT_STEP, 0.6, 0.8])
    parser.add_argument("--repeat", type=int, default=1, help="decode each payload this often, keep the fastest")
    args = parser.parse_args()
    model = load_model(args.model)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    latents, pixels = [], []
    for path in tqdm(files, desc="encode"):
        with Image.open(path) as image:
            latents.append(model.encode_image(padded_rgb(image.convert("RGB"))))
            pixels.append(image.width * image.height)
    zstd = ZstdCoder()
    learned = latents[0].shape[0] == NETWORKS["ctx2"].channels  # ctx3 codes klt components, not raw latents
    coders = [LearnedContextCoder("ctx2"), ContextCoder()] if learned else [ContextCoder()]
    print(f"\n{args.model}, {len(files)} images from {args.images}\n")
    layouts = {"ctx2": ctx2._layout, "ctx1": ctx1._layout}
    print("| step | coder | zstd bytes/img | bytes/img (params+payload) | saving over zstd | bpp "
          "| encode ms | decode ms | decode CPU ms | wavefronts/img |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for step in args.steps:
        symbol_sets = [UniformQuantizer.with_step(step, latent.shape[0]).quantize(latent) for latent in latents]
        sizes_z = [sum(map(len, zstd.encode(symbols))) for symbols in symbol_sets]
        for coder in coders:
            sizes, enc_s, dec_s, dec_cpu, waves = [], [], [], [], []
            for symbols in symbol_sets:
                start = time.perf_counter()
                params, payload = coder.encode(symbols)
                enc_s.append(time.perf_counter() - start)
                wall, cpu = [], []
                for _ in range(args.repeat):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    assert np.array_equal(coder.decode(params, payload, symbols.shape), symbols)
                    wall.append(time.perf_counter() - start)
                    cpu.append(time.process_time() - start_cpu)
                dec_s.append(min(wall))
                dec_cpu.append(min(cpu))
                waves.append(len(layouts[coder.name](symbols.shape).steps))
                sizes.append(len(params) + len(payload))
            saving = 1 - sum(sizes) / sum(sizes_z)
            bpp = np.mean([8 * c / n for c, n in zip(sizes, pixels, strict=True)])
            print(f"| {step:.3g} | {coder.name} | {np.mean(sizes_z):.0f} | {np.mean(sizes):.0f} | {saving:.1%} "
                  f"| {bpp:.3f} | {1e3 * np.mean(enc_s):.0f} | {1e3 * np.mean(dec_s):.0f} "
                  f"| {1e3 * np.mean(dec_cpu):.0f} | {np.mean(waves):.0f} |", flush=True)


if __name__ == "__main__":
    main()
