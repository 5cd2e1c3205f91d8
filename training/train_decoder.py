"""Train the restoring decoders (``restore.DECODERS``): for taesd3, ``restorer_taesd3_decoder.safetensors``
(files coded whole) and ``restorer_taesd3_scaled_decoder.safetensors`` (files coded smaller); for taesd
(``--model taesd``), one per coded scale (commands in training/README.md).

TAESD's decoders were trained on clean latents; a file gives them quantized ones. This fine-tunes the
decoder on latents quantized as the codec quantizes them (taesd3's ``klt`` components, taesd's plain
rounding; steps across ``restore.DECODER_STEPS``, for taesd ``--steps 0.1 0.45``) against the photo. The
loss is pixel MSE plus ST-LPIPS, each relative to the original decoder's output for the same latent, so
that it gains PSNR without trading away the look (MSE alone blurs; see training/README.md for what else
was tried).

Reproducible on this project's 2-core CPU, seeded (data, times, results: training/README.md); it reuses
``train_restorer.py``'s cache of 256x256 crops and their latents (every 20th photo held out, Kodak never
read):

    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_restorer.py \\
        --model taesd3 --stages cache
    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_decoder.py

The scaled one starts from the whole one and takes its loss on the decode scaled back up to full-size crops
(a cache of those and the latents of their 0.625-scaled versions is built on first use):

    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_decoder.py \\
        --scaled-cache ~/.cache/pillow_sdlatent/restorer_taesd3_full0625 --scaled-every 1 --lpips-weight 0.3 \\
        --init pillow_sdlatent/weights/restorer_taesd3_decoder.safetensors --iters 1200 --lr 5e-5 --val-every 600
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

from PIL import Image  # noqa: E402
from train_restorer import (  # noqa: E402
    DEFAULT_DATA,
    Degrader,
    build_cache,
    crop_cache,
    decode,
    list_photos,
    load_cache,
    mean_psnr,
    random_batch,
    relative_errors,
)

from pillow_sdlatent.enhance.restore import DECODER_STEPS, decoder_file  # noqa: E402
from pillow_sdlatent.weights import WEIGHTS_DIR  # noqa: E402


def draw_steps(generator: torch.Generator, count: int, steps: tuple[float, float], weight: float) -> torch.Tensor:
    """Base steps whose largest component step (``weight`` times the base) is log-uniform over ``steps``."""
    low, high = (math.log(s / weight) for s in steps)
    return torch.exp(low + torch.rand(count, generator=generator) * (high - low)).view(-1, 1, 1, 1)


def upscaling(size: int, scale: float) -> torch.Tensor:
    """The (size/scale, size) matrix of Pillow's Lanczos resize from ``size`` to ``size/scale`` samples: the
    codec's upscaling of a file coded smaller, as a linear map that gradients pass through."""
    out = round(size / scale)
    columns = [np.asarray(Image.fromarray(np.eye(size, dtype=np.float32)[i:i + 1]).resize(
        (out, 1), Image.Resampling.LANCZOS))[0] for i in range(size)]
    return torch.from_numpy(np.stack(columns, axis=1))


def upscale(decoded: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """A decode (N, 3, h, w), h = w, rounded to 8 bits as the codec stores it, scaled up by ``matrix``;
    the rounding passes gradients straight through."""
    rounded = decoded + (torch.round((decoded + 1) * 127.5) / 127.5 - 1 - decoded).detach()
    return torch.einsum("oh,nchw,pw->ncop", matrix, rounded, matrix).clamp(-1, 1)


def grid_block(scale: float) -> int:
    """The fewest latents whose pixels at ``scale`` span a whole number of full-size pixels (0.625: 5 -> 64)."""
    return next(k for k in range(1, 64) if (8 * k / scale).is_integer())


def scaled_batch(latents: torch.Tensor, pixels: torch.Tensor, size: int, scale: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random latent crops, one aligned block smaller than the cached ones, at offsets where latent
    and full-size pixel grids meet (multiples of ``block`` latents), with their full-size pixel crops."""
    n, _, side, _ = latents.shape
    block = grid_block(scale)
    full = round(8 * block / scale)
    crop = side - block
    zs, xs = [], []
    for _ in range(size):
        i = int(torch.randint(n, (1,), generator=generator))
        top, left = (block * int(torch.randint(2, (1,), generator=generator)) for _ in range(2))
        z = latents[i, :, top:top + crop, left:left + crop]
        x = pixels[i, :, top // block * full:top // block * full + round(8 * crop / scale),
                   left // block * full:left // block * full + round(8 * crop / scale)]
        if bool(torch.randint(2, (1,), generator=generator)):
            z, x = z.flip(-1), x.flip(-1)
        zs.append(z)
        xs.append(x)
    return torch.stack(zs), torch.stack(xs)


def validate(original: torch.nn.Module, tuned: torch.nn.Module, data: dict, steps: list[float], lpips: torch.nn.Module,
             degrade: Degrader, matrix: torch.Tensor | None = None) -> list[dict[str, float]]:
    """PSNR and ST-LPIPS of the held-out crops decoded by both decoders, per largest component step (with
    ``matrix``, scaled up by it to the full-size crops first)."""
    latents = torch.from_numpy(data["val"]["latents"]).float()
    pixels = torch.from_numpy(data["val"]["pixels"]).permute(0, 3, 1, 2).double()
    target = pixels.float() / 127.5 - 1
    weight = degrade.largest_weight
    rows = []
    with torch.no_grad():
        for step in steps:
            noisy, _ = degrade(latents, torch.full((len(latents), 1, 1, 1), step / weight))
            row = {"step": step}
            for name, decoder in (("original", original), ("restoring", tuned)):
                decoded = torch.cat([decode(decoder, noisy[i:i + 8]) for i in range(0, len(noisy), 8)])
                if matrix is not None:
                    decoded = upscale(decoded, matrix)
                rounded = torch.round((decoded + 1) * 127.5) / 127.5 - 1
                row[f"{name}_psnr"] = mean_psnr(decoded, pixels)
                row[f"{name}_stlpips"] = float(torch.cat([lpips(rounded[i:i + 8], target[i:i + 8]).flatten()
                                                          for i in range(0, len(noisy), 8)]).mean())
            rows.append(row)
            print(f"val{'' if matrix is None else ' scaled'} step {step:.2f}: PSNR {row['original_psnr']:.2f} -> "
                  f"{row['restoring_psnr']:.2f} dB, ST-LPIPS {row['original_stlpips']:.4f} -> "
                  f"{row['restoring_stlpips']:.4f}", flush=True)
    return rows


def save_decoder(decoder: torch.nn.Module, out: Path, base_digest: str, meta: dict[str, str]) -> None:
    """The decoder's tensors in diffusers' names ("decoder." prefix), float16, with the digest of the
    decoder it was tuned from (``restore.restoring_decoder`` checks it)."""
    from safetensors.numpy import save_file

    tensors = {f"decoder.{k}": v.detach().numpy().astype(np.float16) for k, v in decoder.decoder.state_dict().items()}
    save_file(tensors, str(out), metadata={"base_digest": base_digest, **meta})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DECODER_STEPS), default="taesd3")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=None, help="train_restorer.py's crop cache (default: its own)")
    parser.add_argument("--scaled-cache", type=Path, default=None,
                        help="a cache of full-size crops and the latents of their --scale versions (built if "
                             "missing): every --scaled-every-th batch then comes from it, with the loss on the "
                             "decode scaled back up")
    parser.add_argument("--steps", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="range of the largest component step drawn (default: the model's DECODER_STEPS)")
    parser.add_argument("--scaled-every", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.625)
    parser.add_argument("--init", type=Path, default=None, help="start from these restoring-decoder weights")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: the shipped file (the scaled one with --scaled-cache --scaled-every 1)")
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
    only_scaled = args.scaled_cache is not None and args.scaled_every == 1
    args.cache = args.cache or crop_cache(args.model)
    args.out = args.out or WEIGHTS_DIR / decoder_file(args.model, args.scale if only_scaled else 1.0)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from metrics import STLPIPS

    from pillow_sdlatent.models import load_model

    loaded = load_model(args.model, device="cpu")
    original = loaded.module
    tuned = copy.deepcopy(original).requires_grad_(False)
    tuned.decoder.requires_grad_(True)
    degrade = Degrader(args.model)
    weight = degrade.largest_weight
    lpips = STLPIPS("alex").net
    data = load_cache(args.cache, len(list_photos(args.data)))
    print(f"train crops {len(data['train']['latents'])}, val crops {len(data['val']['latents'])}", flush=True)
    latents = torch.from_numpy(data["train"]["latents"]).float()
    pixels = torch.from_numpy(data["train"]["pixels"]).permute(0, 3, 1, 2)
    scaled = None
    if args.scaled_cache is not None:
        build_cache(args.data, args.scaled_cache, args.seed, args.model, args.scale)
        scaled = load_cache(args.scaled_cache, len(list_photos(args.data)))
        scaled_latents = torch.from_numpy(scaled["train"]["latents"]).float()
        scaled_pixels = torch.from_numpy(scaled["train"]["pixels"]).permute(0, 3, 1, 2)
        side = scaled_latents.shape[-1]
        train_matrix, val_matrix = (upscaling(8 * n, args.scale) for n in (side - grid_block(args.scale), side))
    if args.init is not None:
        from safetensors.torch import load_file

        tuned.decoder.load_state_dict({k.removeprefix("decoder."): v.float() for k, v in load_file(args.init).items()})
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(tuned.decoder.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.iters, pct_start=0.05)
    start = time.time()
    for it in range(1, args.iters + 1):
        on_scaled = scaled is not None and it % args.scaled_every == 0
        if on_scaled:
            z, x = scaled_batch(scaled_latents, scaled_pixels, args.batch, args.scale, generator)
        else:
            z, x = random_batch(latents, pixels, args.batch, args.crop, generator)
        target = x.float() / 127.5 - 1
        noisy, _ = degrade(z, draw_steps(generator, len(z), args.steps or DECODER_STEPS[args.model], weight))
        with torch.no_grad():
            plain = decode(original, noisy)
        decoded = decode(tuned, noisy)
        if on_scaled:
            plain, decoded = upscale(plain, train_matrix), upscale(decoded, train_matrix)
        mse, perceptual = relative_errors(decoded, plain, target, lpips)
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
            if scaled is not None:
                rows += [{"scale": args.scale, **row} for row in
                         validate(original, tuned, scaled, args.val_steps, lpips, degrade, val_matrix)]
            save_decoder(tuned, args.out, loaded.decoder_digest.hex(),
                         {"seed": str(args.seed), "iterations": str(it), "lpips_weight": str(args.lpips_weight),
                          **({"scale": str(args.scale)} if args.scaled_cache is not None else {})})
    with open(args.cache / "decoder_val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]), restval=1.0)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
