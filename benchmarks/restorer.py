"""Does decoder-side latent restoration pay? PSNR, MS-SSIM and ST-LPIPS on Kodak, with and without it.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python benchmarks/restorer.py
    python benchmarks/restorer.py --steps 0.3,0.6,1.0 --limit 4      # quick look
    python benchmarks/restorer.py --unet DIR_OR_HUB_ID               # also the SD-UNet denoiser (slow)
    python benchmarks/restorer.py --from-csv results.csv             # table of an earlier or partial run

Each image is encoded once with TAESD; per step the latent is quantized with the codec's uniform
quantizer and the rate is what the package's current default entropy coder makes of the symbols
(coder parameters + payload; the fixed ~100-byte header is left out), so the step -> bpp column stays
true when the coder improves. Decoding with and without the restorer uses the same TAESD decoder.
Prints a Markdown table (means over the images) and, with --csv, writes one row per image, step and
variant as it goes.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics import STLPIPS, ReferenceMetrics

from pillow_sdlatent.core import coders, quantize
from pillow_sdlatent.enhance import restore
from pillow_sdlatent.models import LatentModel, load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "kodak"
#: on Kodak with the zstd coder about 0.2, 0.1 and 0.05 bpp (training/README.md)
DEFAULT_STEPS = "0.3,0.8,2.0"
VARIANTS = ("plain", "restored")


def encode(model: LatentModel, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (C, ceil(H/8), ceil(W/8)) latent, edges replicated to a multiple of 8 as the codec does."""
    height, width = rgb.shape[:2]
    padded = np.pad(rgb, ((0, (-height) % 8), (0, (-width) % 8), (0, 0)), mode="edge")
    return model.encode(torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1)[0].numpy()


def decode(model: LatentModel, latent: np.ndarray, width: int, height: int) -> np.ndarray:
    """(C, h, w) latent -> (height, width, 3) uint8."""
    pixels = model.decode(torch.from_numpy(np.ascontiguousarray(latent))[None])[0]
    rgb = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(rgb[:height, :width])


def coded_bpp(latent: np.ndarray, step: float, pixels: int) -> tuple[np.ndarray, float]:
    """Dequantized latent and bits per pixel of its symbols under the default coder."""
    quantizer = quantize.UniformQuantizer.with_step(step, latent.shape[0])
    symbols = quantizer.quantize(latent)
    params, payload = coders.get_coder(coders.DEFAULT_CODER).encode(symbols)
    return quantizer.dequantize(symbols), 8 * (len(params) + len(payload)) / pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="comma-separated quantization steps")
    parser.add_argument("--limit", type=int, default=0, help="first N images only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", type=Path, help="per-image results, written as each image finishes")
    parser.add_argument("--from-csv", type=Path, help="only print the table of an earlier (or partial) run")
    parser.add_argument("--unet", help="also score denoise_latent with this SD 1.x model (folder, file or hub id)")
    args = parser.parse_args()
    if args.from_csv:
        with open(args.from_csv, newline="") as f:
            rows = [{k: v if k in ("image", "variant") else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)]
        steps = sorted({float(r["step"]) for r in rows})
        variants = tuple(dict.fromkeys(str(r["variant"]) for r in rows))
        print(report(rows, steps, variants, len({r["image"] for r in rows}), {}))
        return
    torch.set_num_threads(args.threads)
    steps = [float(np.float32(s)) for s in args.steps.split(",")]
    variants = (*VARIANTS, "unet") if args.unet else VARIANTS
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".png", ".jpg", ".ppm"})
    files = files[: args.limit] if args.limit else files
    if not files:
        raise SystemExit(f"no images in {args.images}")
    model = load_model("taesd", device="cpu")
    stlpips = STLPIPS()
    rows: list[dict[str, object]] = []
    timings: dict[str, list[float]] = {"decode": [], "restore": []}
    for number, path in enumerate(files, 1):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        reference = ReferenceMetrics(stlpips, rgb)
        latent = encode(model, rgb)
        for step in steps:
            dequantized, bpp = coded_bpp(latent, step, width * height)
            start = time.perf_counter()
            restored = restore.restore_latent(dequantized, step, "taesd")
            timings["restore"].append(time.perf_counter() - start)
            latents = {"plain": dequantized, "restored": restored}
            if args.unet:
                from pillow_sdlatent.enhance.unet import denoise_latent

                latents["unet"] = denoise_latent(dequantized, step, model=args.unet)
            for variant, z in latents.items():
                start = time.perf_counter()
                decoded = decode(model, z, width, height)
                timings["decode"].append(time.perf_counter() - start)
                rows.append({"image": path.name, "step": step, "bpp": bpp, "variant": variant, **reference(decoded)})
        if args.csv:
            write_csv(args.csv, rows)
        print(f"[{number}/{len(files)}] {path.name}", file=sys.stderr, flush=True)
    print(report(rows, steps, variants, len(files), timings))


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """All rows so far, replaced atomically, so an interrupted run still leaves a readable file."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def report(rows: list[dict[str, object]], steps: list[float], variants: tuple[str, ...], count: int,
           timings: dict[str, list[float]]) -> str:
    """Markdown: one line per step, each metric plain -> other variants, and where restoring helps."""

    def mean(step: float, variant: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["step"] == step and r["variant"] == variant]))

    others = variants[1:]
    head = ["step", "bpp"]
    for metric in ("PSNR dB", "MS-SSIM", "ST-LPIPS"):
        head += [f"{metric} plain", *(f"{metric} {v}" for v in others)]
    lines = [f"Kodak, {count} images, TAESD, coder `{coders.DEFAULT_CODER}` (means)", "",
             "| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    helpful = []
    for step in steps:
        cells = [f"{step:.3g}", f"{mean(step, 'plain', 'bpp'):.4f}"]
        for key, fmt in (("psnr", ".2f"), ("msssim", ".4f"), ("stlpips", ".4f")):
            base = mean(step, "plain", key)
            cells.append(format(base, fmt))
            cells += [f"{mean(step, v, key):{fmt}} ({mean(step, v, key) - base:+{fmt}})" for v in others]
        lines.append("| " + " | ".join(cells) + " |")
        if (mean(step, "restored", "psnr") > mean(step, "plain", "psnr")
                and mean(step, "restored", "stlpips") < mean(step, "plain", "stlpips")):
            helpful.append(step)
    lines += ["", f"restorer improves PSNR and ST-LPIPS at steps: {', '.join(f'{s:.3g}' for s in helpful) or 'none'}"]
    if timings:
        lines.append(f"median time per image: restorer {1000 * np.median(timings['restore']):.0f} ms, "
                     f"TAESD decode {1000 * np.median(timings['decode']):.0f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
