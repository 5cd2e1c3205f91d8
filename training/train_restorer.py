"""Train the latent restorer shipped as ``pillow_sdlatent/weights/restorer_taesd.safetensors``
(``--model taesd3``: ``restorer_taesd3.safetensors``, for taesd3's latents as its ``klt`` quantizer leaves them).

Reproducible on this project's 2-core CPU, seeded throughout (data, times, results: training/README.md):

    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_restorer.py

Four stages (``--stages``), each seeded; the cache is resumable:

1. ``cache``: two random 256x256 crops per training photo, encoded once with the TAESD encoder.
   Every 20th photo (sorted by path) is held out for validation. Kodak is never read.
2. ``latent``: the restorer learns to map rint(z/step)*step back to z, with step drawn log-uniformly
   from the codec's range; loss = latent MSE in units of step^2, so that every rate counts.
3. ``pixel``: a short fine-tune through the frozen TAESD decoder on 128x128 crops against the photo:
   pixel MSE plus ST-LPIPS, each relative to the unrestored decode. MSE alone blurs texture that
   the perceptual metric misses at fine steps.
4. ``val``: decoded PSNR and zstd bpp of the held-out crops, plain and restored, per step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # metrics.py: ST-LPIPS without torchvision

from pillow_sdlatent.core import coders  # noqa: E402
from pillow_sdlatent.core import quantize as codec_quantize  # noqa: E402
from pillow_sdlatent.enhance.restore import RestorerNet, load_net, save_weights  # noqa: E402
from pillow_sdlatent.weights import WEIGHTS_DIR  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "train"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pillow_sdlatent" / "restorer"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CROP = 256
CROPS_PER_IMAGE = 2
VAL_EVERY = 20
#: the step range training covers (latent units): the codec's coarsest step is 2.0; below 0.08 nothing is left to gain
STEP_MIN, STEP_MAX = 0.08, 2.0
#: Sun_Hays80 photos are q75 JPEGs: halve them (short side kept >= 256) so 8x8 blocking is not a target
HALVE_SETS = {"Sun_Hays80"}


def list_photos(data: Path) -> list[Path]:
    """All training photos, sorted, so that crops and the split do not depend on the file system."""
    photos = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if any(p.name.startswith("kodim") for p in photos):
        raise SystemExit("refusing to train on Kodak (the benchmark set)")
    return photos


def crop_cache(model_name: str) -> Path:
    """The default cache of a model's crops and latents: DEFAULT_CACHE, with the model's name but for taesd."""
    return DEFAULT_CACHE if model_name == "taesd" else DEFAULT_CACHE.with_name(f"restorer_{model_name}")


def load_photo(path: Path, data: Path) -> Image.Image:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if path.relative_to(data).parts[0] in HALVE_SETS:
        scale = max(0.5, CROP / min(rgb.size))
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
    return rgb


def build_cache(data: Path, cache: Path, seed: int, model_name: str, scale: float = 1.0) -> None:
    """One ``NNNN.npz`` per photo (pixels uint8 and the model's latents of its crops); skips existing ones.

    ``scale`` < 1: the latents are of each crop resized by it as the codec resizes an image it codes smaller
    (Lanczos), the pixels stay full size (``train_decoder.py`` takes its loss on the decode scaled back up)."""
    from pillow_sdlatent.models import load_model

    model = load_model(model_name, device="cpu")
    coded = round(CROP * scale)
    if coded % 8 or coded / CROP != scale:
        raise SystemExit(f"scale {scale} does not map {CROP}-pixel crops to whole latents")
    photos = list_photos(data)
    cache.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for index, path in enumerate(photos):
        out = cache / f"{index:04d}.npz"
        if out.exists():
            continue
        rng = np.random.default_rng([seed, index])
        rgb = np.asarray(load_photo(path, data))
        crops = []
        for _ in range(CROPS_PER_IMAGE):
            top = int(rng.integers(0, rgb.shape[0] - CROP + 1))
            left = int(rng.integers(0, rgb.shape[1] - CROP + 1))
            crops.append(rgb[top:top + CROP, left:left + CROP])
        pixels = np.stack(crops)
        coded_pixels = pixels if scale == 1 else np.stack(
            [np.asarray(Image.fromarray(c).resize((coded, coded), Image.Resampling.LANCZOS)) for c in crops])
        latents = model.encode(torch.from_numpy(coded_pixels).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy()
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, pixels=pixels, latents=latents, source=str(path.relative_to(data)))
        tmp.replace(out)
        done = index + 1
        print(f"cache {done}/{len(photos)} {path.name} {time.time() - start:.0f}s", flush=True)


def load_cache(cache: Path, count: int) -> dict[str, dict[str, np.ndarray]]:
    """{"train": {...}, "val": {...}} arrays; photo index % VAL_EVERY == 0 goes to validation."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {"train": {"pixels": [], "latents": []},
                                                     "val": {"pixels": [], "latents": []}}
    for index in range(count):
        with np.load(cache / f"{index:04d}.npz") as item:
            split = "val" if index % VAL_EVERY == 0 else "train"
            parts[split]["pixels"].append(item["pixels"])
            parts[split]["latents"].append(item["latents"])
    return {split: {k: np.concatenate(v) for k, v in arrays.items()} for split, arrays in parts.items()}


class Degrader:
    """The codec's quantizer for a model, quantizing and dequantizing in torch: ``rint(z/step)*step`` for
    taesd; for a model with a KLT transform, its components each at ``step`` times their weight, rounded
    with the model's offset toward zero. Also the step the decoder conditions the restorer on, the file's
    largest step (``pipeline.clean_latent``)."""

    def __init__(self, model_name: str) -> None:
        transform = codec_quantize.klt_for_model(model_name)
        self.offset = codec_quantize.ROUNDING_OFFSETS.get(model_name, 0.0)
        self.klt = None if transform is None else (
            torch.tensor(transform.matrix, dtype=torch.float32), torch.tensor(transform.mean, dtype=torch.float32),
            torch.tensor(transform.step_weights, dtype=torch.float32))

    def __call__(self, latent: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dequantized latent, conditioning step), ``step`` (N, 1, 1, 1) broadcast per sample."""
        if self.klt is None:
            return torch.round(latent / step) * step, step
        matrix, mean, weights = self.klt
        steps = step * weights.view(1, -1, 1, 1)
        values = torch.einsum("kc,nchw->nkhw", matrix, latent - mean.view(1, -1, 1, 1)) / steps
        symbols = torch.round(values) if self.offset == 0 else torch.sign(values) * torch.floor(
            values.abs() + (0.5 - self.offset))
        back = torch.einsum("kc,nkhw->nchw", matrix, symbols * steps) + mean.view(1, -1, 1, 1)
        return back, step * weights.max()

    @property
    def largest_weight(self) -> float:
        """The largest component step over the base step: the file's largest step is this times the base."""
        return 1.0 if self.klt is None else float(self.klt[2].max())


def draw_steps(generator: torch.Generator, count: int) -> torch.Tensor:
    """Steps log-uniform in [STEP_MIN, STEP_MAX], shaped (count, 1, 1, 1)."""
    u = torch.rand(count, generator=generator)
    return torch.exp(math.log(STEP_MIN) + u * (math.log(STEP_MAX) - math.log(STEP_MIN))).view(-1, 1, 1, 1)


def random_batch(latents: torch.Tensor, pixels: torch.Tensor | None, size: int, crop: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``size`` random latent crops of ``crop`` (and the matching 8x pixel crops), randomly flipped."""
    n, _, height, width = latents.shape
    zs, xs = [], []
    for _ in range(size):
        i = int(torch.randint(n, (1,), generator=generator))
        top = int(torch.randint(height - crop + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop + 1, (1,), generator=generator))
        z = latents[i, :, top:top + crop, left:left + crop]
        x = None if pixels is None else pixels[i, :, 8 * top:8 * (top + crop), 8 * left:8 * (left + crop)]
        if bool(torch.randint(2, (1,), generator=generator)):
            z = z.flip(-1)
            x = None if x is None else x.flip(-1)
        zs.append(z)
        xs.append(x)
    return torch.stack(zs), None if pixels is None else torch.stack(xs)


def val_latent_loss(net: RestorerNet, latents: torch.Tensor, steps: list[float], degrade: Degrader) -> list[float]:
    """Latent MSE / step^2 on the whole validation set, restored and (as a reference) plain, per step."""
    out = []
    with torch.inference_mode():
        for step in steps:
            noisy, cond = degrade(latents, torch.full((latents.shape[0], 1, 1, 1), step))
            restored = net(noisy, cond)
            out.append(float(((restored - latents) ** 2).mean() / step**2))
            out.append(float(((noisy - latents) ** 2).mean() / step**2))
    return out


def train_latent(data: dict[str, dict[str, np.ndarray]], args: argparse.Namespace) -> RestorerNet:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    latents = torch.from_numpy(data["train"]["latents"]).float()
    net = RestorerNet(channels=latents.shape[1], width=args.width, inner=args.inner, depth=args.depth)
    degrade = Degrader(args.model)
    val = torch.from_numpy(data["val"]["latents"]).float()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.latent_iters,
                                                   pct_start=0.05)
    start = time.time()
    for it in range(1, args.latent_iters + 1):
        z, _ = random_batch(latents, None, args.batch, args.latent_crop, generator)
        noisy, cond = degrade(z, draw_steps(generator, z.shape[0]))
        loss = (((net(noisy, cond) - z) / cond) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if it % args.log_every == 0 or it == args.latent_iters:
            vals = val_latent_loss(net, val, [0.15, 0.4, 1.0], degrade)
            print(f"latent {it}/{args.latent_iters} loss {loss.item():.4f} val(restored,plain) "
                  + " ".join(f"{v:.4f}" for v in vals) + f" {time.time() - start:.0f}s", flush=True)
    return net


def decode(autoencoder: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """TAESD decode with gradients (LatentModel.decode runs under inference_mode)."""
    return autoencoder.decode(latent).sample.clamp(-1, 1)


def relative_errors(decoded: torch.Tensor, plain: torch.Tensor, target: torch.Tensor,
                    lpips: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, pixel MSE and ST-LPIPS of ``decoded`` divided by those of ``plain`` (the unrestored decode):
    so every step weighs alike, and a loss on both must beat the plain decode on both."""
    with torch.no_grad():
        plain_mse = ((plain - target) ** 2).mean(dim=(1, 2, 3))
        plain_lpips = lpips(plain, target).flatten()
    mse = ((decoded - target) ** 2).mean(dim=(1, 2, 3)) / plain_mse.clamp_min(1e-6)
    return mse, lpips(decoded, target).flatten() / plain_lpips.clamp_min(1e-4)


def train_pixel(net: RestorerNet, data: dict[str, dict[str, np.ndarray]], args: argparse.Namespace) -> None:
    """Fine-tune through the frozen decoder against the photo: pixel MSE plus ST-LPIPS.

    Both terms are taken relative to the unrestored decode of the same crop, so that every step
    weighs alike and the restorer is pushed to beat the plain decode on both: MSE alone blurs fine
    texture away and loses on perceptual metrics at fine steps.
    """
    from metrics import STLPIPS

    from pillow_sdlatent.models import load_model

    autoencoder = load_model(args.model, device="cpu").module
    degrade = Degrader(args.model)
    lpips = STLPIPS(args.perceptual).net
    generator = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.from_numpy(data["train"]["latents"]).float()
    pixels = torch.from_numpy(data["train"]["pixels"]).permute(0, 3, 1, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.pixel_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.pixel_iters)
    start = time.time()
    for it in range(1, args.pixel_iters + 1):
        z, x = random_batch(latents, pixels, args.pixel_batch, args.pixel_crop, generator)
        target = x.float() / 127.5 - 1
        noisy, cond = degrade(z, draw_steps(generator, z.shape[0]))
        with torch.no_grad():
            plain = decode(autoencoder, noisy)
        mse, perceptual = relative_errors(decode(autoencoder, net(noisy, cond)), plain, target, lpips)
        loss = (mse + args.lpips_weight * perceptual).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if it % max(1, args.log_every // 10) == 0 or it == args.pixel_iters:
            print(f"pixel {it}/{args.pixel_iters} mse ratio {mse.mean().item():.4f} "
                  f"lpips ratio {perceptual.mean().item():.4f} {time.time() - start:.0f}s", flush=True)


def mean_psnr(decoded: torch.Tensor, pixels: torch.Tensor) -> float:
    """Mean over the batch of each image's PSNR (dB): ``decoded`` in [-1, 1], rounded to 8 bits as the codec
    rounds it, against ``pixels`` (0-255, float64)."""
    rgb = ((decoded + 1) * 127.5).round().clamp(0, 255).double()
    mse = ((rgb - pixels) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def val_psnr(net: RestorerNet, data: dict[str, dict[str, np.ndarray]], steps: list[float],
             model_name: str) -> list[dict[str, float]]:
    """Mean decoded PSNR (dB) of the validation crops, plain and restored, and the bpp of the model's default
    coder, per step."""
    from pillow_sdlatent.models import load_model

    model = load_model(model_name, device="cpu")
    coder = coders.get_coder(coders.default_coder(model_name))
    degrade = Degrader(model_name)
    latents = torch.from_numpy(data["val"]["latents"]).float()
    target = torch.from_numpy(data["val"]["pixels"]).permute(0, 3, 1, 2).double()
    rows = []
    for step in steps:
        noisy, cond = degrade(latents, torch.full((latents.shape[0], 1, 1, 1), float(np.float32(step))))
        with torch.inference_mode():
            restored = net(noisy, cond)
        row = {"step": step}
        for name, z in (("plain", noisy), ("restored", restored)):
            row[name] = mean_psnr(model.decode(z), target)
        quantizer = codec_quantize.quantizer_for(model_name, step, latents.shape[1])
        row["bpp"] = float(np.mean([len(coder.encode(quantizer.quantize(z))[1]) * 8 / CROP**2
                                    for z in latents.numpy()]))
        rows.append(row)
        print(f"val step {step:.3f}: bpp {row['bpp']:.3f} PSNR plain {row['plain']:.3f} "
              f"restored {row['restored']:.3f} gain {row['restored'] - row['plain']:+.3f} dB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("taesd", "taesd3"), default="taesd")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, help=f"default: {DEFAULT_CACHE}, with the model's name for taesd3")
    parser.add_argument("--out", type=Path, help="default: pillow_sdlatent/weights/restorer_MODEL.safetensors")
    parser.add_argument("--stages", default="cache,latent,pixel,val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=32, help="restorer channels at latent resolution")
    parser.add_argument("--inner", type=int, default=64, help="restorer channels at half resolution")
    parser.add_argument("--depth", type=int, default=2, help="residual blocks at half resolution")
    parser.add_argument("--latent-iters", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--latent-crop", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pixel-iters", type=int, default=150)
    parser.add_argument("--pixel-batch", type=int, default=4)
    parser.add_argument("--pixel-crop", type=int, default=16)
    parser.add_argument("--pixel-lr", type=float, default=2e-4)
    parser.add_argument("--lpips-weight", type=float, default=1.0)
    parser.add_argument("--perceptual", choices=("alex", "vgg"), default="alex",
                        help="ST-LPIPS trunk of the pixel stage's perceptual term (the shipped weights: alex, "
                             "the benchmark's metric; vgg is a different network, see training/README.md)")
    parser.add_argument("--init", type=Path, help="start the pixel stage from these weights, not the latent stage's")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--val-steps", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    if args.cache is None:
        args.cache = crop_cache(args.model)
    if args.out is None:
        args.out = WEIGHTS_DIR / f"restorer_{args.model}.safetensors"
    if "cache" in stages:
        build_cache(args.data, args.cache, args.seed, args.model)
    if not stages & {"latent", "pixel", "val"}:
        return
    data = load_cache(args.cache, len(list_photos(args.data)))
    print(f"train crops {len(data['train']['latents'])}, val crops {len(data['val']['latents'])}", flush=True)
    checkpoint = args.cache / f"latent_stage_w{args.width}_i{args.inner}_d{args.depth}.pt"
    if "latent" in stages:
        net = train_latent(data, args)
        torch.save(net.state_dict(), checkpoint)
    elif args.init or not checkpoint.exists():
        net = load_net(args.init or args.out)
    else:
        net = RestorerNet(channels=data["train"]["latents"].shape[1], width=args.width, inner=args.inner,
                          depth=args.depth)
        net.load_state_dict(torch.load(checkpoint, weights_only=True))
    if "pixel" in stages:
        train_pixel(net, data, args)
    net.eval()
    if "latent" in stages or "pixel" in stages:
        save_weights(net, args.out, {"seed": str(args.seed), "stages": args.stages,
                                     "step_range": json.dumps([STEP_MIN, STEP_MAX])})
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    if "val" in stages:
        rows = val_psnr(net, data, args.val_steps, args.model)
        with open(args.cache / "val.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
