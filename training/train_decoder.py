"""Train taesd3's restoring decoder, shipped as ``pillow_sdlatent/weights/restorer_taesd3_decoder.safetensors``.

TAESD's decoders were trained on clean latents; a file gives them quantized ones. This fine-tunes the
decoder on latents quantized as the codec quantizes them (``klt`` components, steps across
``restore.DECODER_STEPS``) against the photo. The loss is pixel MSE plus ST-LPIPS, each relative to the
original decoder's output for the same latent, so that it gains PSNR without trading away the look
(MSE alone blurs; see training/README.md for what else was tried).

Reproducible on this project's 2-core CPU, seeded (data, times, results: training/README.md); it reuses
``train_restorer.py``'s cache of 256x256 crops and their latents (every 20th photo held out, Kodak never
read):

    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_restorer.py \\
        --model taesd3 --stages cache
    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_decoder.py
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # metrics.py: ST-LPIPS without torchvision
sys.path.insert(0, str(REPO / "training"))

from train_restorer import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_DATA,
    Degrader,
    decode,
    list_photos,
    load_cache,
    mean_psnr,
    random_batch,
    relative_errors,
)

from pillow_sdlatent.enhance.restore import DECODER_STEPS, DECODERS  # noqa: E402
from pillow_sdlatent.weights import WEIGHTS_DIR  # noqa: E402

MODEL = "taesd3"


def draw_steps(generator: torch.Generator, count: int, weight: float) -> torch.Tensor:
    """Base steps whose largest component step (``weight`` times the base) is log-uniform over DECODER_STEPS."""
    low, high = (math.log(s / weight) for s in DECODER_STEPS)
    return torch.exp(low + torch.rand(count, generator=generator) * (high - low)).view(-1, 1, 1, 1)


def validate(original: torch.nn.Module, tuned: torch.nn.Module, data: dict, steps: list[float], lpips: torch.nn.Module,
             degrade: Degrader) -> list[dict[str, float]]:
    """PSNR and ST-LPIPS of the held-out crops decoded by both decoders, per largest component step."""
    latents = torch.from_numpy(data["val"]["latents"]).float()
    pixels = torch.from_numpy(data["val"]["pixels"]).permute(0, 3, 1, 2).double()
    target = pixels.float() / 127.5 - 1
    weight = float(degrade.klt[2].max())
    rows = []
    with torch.no_grad():
        for step in steps:
            noisy, _ = degrade(latents, torch.full((len(latents), 1, 1, 1), step / weight))
            row = {"step": step}
            for name, decoder in (("original", original), ("restoring", tuned)):
                decoded = torch.cat([decode(decoder, noisy[i:i + 8]) for i in range(0, len(noisy), 8)])
                rounded = torch.round((decoded + 1) * 127.5) / 127.5 - 1
                row[f"{name}_psnr"] = mean_psnr(decoded, pixels)
                row[f"{name}_stlpips"] = float(torch.cat([lpips(rounded[i:i + 8], target[i:i + 8]).flatten()
                                                          for i in range(0, len(noisy), 8)]).mean())
            rows.append(row)
            print(f"val step {step:.2f}: PSNR {row['original_psnr']:.2f} -> {row['restoring_psnr']:.2f} dB, "
                  f"ST-LPIPS {row['original_stlpips']:.4f} -> {row['restoring_stlpips']:.4f}", flush=True)
    return rows


def save_decoder(decoder: torch.nn.Module, out: Path, base_digest: str, meta: dict[str, str]) -> None:
    """The decoder's tensors in diffusers' names ("decoder." prefix), float16, with the digest of the
    decoder it was tuned from (``restore.restoring_decoder`` checks it)."""
    from safetensors.numpy import save_file

    tensors = {f"decoder.{k}": v.detach().numpy().astype(np.float16) for k, v in decoder.decoder.state_dict().items()}
    save_file(tensors, str(out), metadata={"base_digest": base_digest, **meta})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, nargs="+", default=[DEFAULT_CACHE.with_name(f"restorer_{MODEL}")],
                        help="crop caches of train_restorer.py, trained on together (default: the photos whole)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / DECODERS[MODEL])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=16, help="latent crop side (pixels: 8x)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lpips-weight", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--val-every", type=int, default=1000)
    parser.add_argument("--val-steps", type=float, nargs="+", default=[0.2, 0.4, 0.8, 1.6])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from metrics import STLPIPS

    from pillow_sdlatent.models import load_model

    loaded = load_model(MODEL, device="cpu")
    original = loaded.module
    tuned = copy.deepcopy(original).requires_grad_(False)
    tuned.decoder.requires_grad_(True)
    degrade = Degrader(MODEL)
    weight = float(degrade.klt[2].max())
    lpips = STLPIPS("alex").net
    caches = [load_cache(cache, len(list_photos(args.data))) for cache in args.cache]
    data = {split: {key: np.concatenate([c[split][key] for c in caches]) for key in caches[0][split]}
            for split in caches[0]}
    print(f"train crops {len(data['train']['latents'])}, val crops {len(data['val']['latents'])}", flush=True)
    latents = torch.from_numpy(data["train"]["latents"]).float()
    pixels = torch.from_numpy(data["train"]["pixels"]).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(tuned.decoder.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.iters, pct_start=0.05)
    start = time.time()
    for it in range(1, args.iters + 1):
        z, x = random_batch(latents, pixels, args.batch, args.crop, generator)
        target = x.float() / 127.5 - 1
        noisy, _ = degrade(z, draw_steps(generator, len(z), weight))
        with torch.no_grad():
            plain = decode(original, noisy)
        mse, perceptual = relative_errors(decode(tuned, noisy), plain, target, lpips)
        loss = (mse + args.lpips_weight * perceptual).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if it % args.log_every == 0:
            print(f"{it}/{args.iters} mse ratio {mse.mean().item():.4f} lpips ratio {perceptual.mean().item():.4f} "
                  f"{time.time() - start:.0f}s", flush=True)
        if it % args.val_every == 0 or it == args.iters:
            rows = validate(original, tuned, data, args.val_steps, lpips, degrade)
            save_decoder(tuned, args.out, loaded.decoder_digest.hex(),
                         {"seed": str(args.seed), "iterations": str(it), "lpips_weight": str(args.lpips_weight)})
    with open(args.cache[0] / "decoder_val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
