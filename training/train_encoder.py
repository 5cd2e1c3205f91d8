"""Fine-tune taesd3's encoder for the codec: fewer bits and a closer picture from the same decoder (a probe:
nothing it writes ships; results in training/README.md).

TAESD's encoder was distilled to match the SD 3 VAE's latents; the codec then quantizes them and a
restoring decoder decodes them. This trains the encoder through that path as the codec runs it at low
rates: a training crop (``--crop`` pixels cut from the cache's 256x256 crops) resized to ``--scale``
(Lanczos, as a linear map), encoded, its ``klt`` components rounded at the codec's rounding offset
(straight through), decoded by the restoring decoder that serves such files, scaled back up and rounded
to 8 bits. The loss is pixel MSE plus ST-LPIPS (VGG trunk: the benchmarks score with AlexNet's) plus
``--rate-weight`` times the bits of the symbols under a Laplace density per component (with a uniform
noise proxy for the rounding; its scales are learned with it), each relative to the shipped encoder's on
the same crop and step.

The decoder is unchanged, so a file from the tuned encoder reads with any build. Validation codes the
held-out crops (every 20th photo) with the real ``ctx3`` coder at fixed steps, both encoders, and prints
the rate, PSNR and ST-LPIPS (AlexNet); ``--out`` gets a models folder for ``PILLOW_SDLATENT_MODELS``. Uses
``train_restorer.py``'s crop cache:

    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_encoder.py --out /tmp/enc
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "training"))

from train_decoder import draw_steps, upscale, upscaling  # noqa: E402
from train_restorer import DEFAULT_DATA, crop_cache, list_photos, load_cache, mean_psnr, relative_errors  # noqa: E402

from pillow_sdlatent.core import coders, quantize  # noqa: E402
from pillow_sdlatent.enhance.restore import decoder_file  # noqa: E402
from pillow_sdlatent.weights import WEIGHTS_DIR  # noqa: E402

MODEL = "taesd3"


class CodecPath(torch.nn.Module):
    """Crop -> resized -> latent -> rounded klt components -> restoring decoder -> scaled back up."""

    def __init__(self, autoencoder: torch.nn.Module, decoder_weights: Path, scale: float) -> None:
        super().__init__()
        from safetensors.torch import load_file

        self.decoding = copy.deepcopy(autoencoder).requires_grad_(False)
        self.decoding.decoder.load_state_dict({k.removeprefix("decoder."): v.float()
                                               for k, v in load_file(decoder_weights).items()})
        transform = quantize.klt_for_model(MODEL)
        self.register_buffer("matrix", torch.from_numpy(transform.matrix).float())
        self.register_buffer("mean", torch.from_numpy(transform.mean).float().view(1, -1, 1, 1))
        self.register_buffer("weights", torch.from_numpy(transform.step_weights).float().view(1, -1, 1, 1))
        self.scale = scale
        self.offset = quantize.ROUNDING_OFFSETS[MODEL]
        self.resizing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def resizers(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The Lanczos maps from a ``side``-pixel crop to the coded size and back, built once per side."""
        if side not in self.resizing:
            down = upscaling(side, 1 / self.scale)
            self.resizing[side] = down, upscaling(down.shape[0], self.scale)
        return self.resizing[side]

    def components(self, encoder: torch.nn.Module, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Each crop's klt components in units of its component steps, unrounded."""
        down, _ = self.resizers(x.shape[-1])
        small = torch.einsum("oh,nchw,pw->ncop", down, x, down).clamp(-1, 1)
        latent = encoder(small)
        return torch.einsum("kc,nchw->nkhw", self.matrix, latent - self.mean) / (steps * self.weights)

    def decode(self, symbols: torch.Tensor, steps: torch.Tensor, side: int) -> torch.Tensor:
        """The ``side``-pixel crop the reader shows for these symbols."""
        latent = torch.einsum("kc,nkhw->nchw", self.matrix, symbols * steps * self.weights) + self.mean
        return upscale(self.decoding.decode(latent).sample.clamp(-1, 1), self.resizers(side)[1])

    def symbols(self, y: torch.Tensor) -> torch.Tensor:
        """The codec's rounding toward zero by ``offset`` (``quantize.rounded``)."""
        return torch.sign(y) * torch.floor(y.abs() + 0.5 - self.offset)

    def rounded(self, y: torch.Tensor) -> torch.Tensor:
        """``symbols`` with gradients straight through."""
        return y + (self.symbols(y) - y).detach()


def laplace_bits(y: torch.Tensor, log_scale: torch.Tensor, steps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Bits per crop of the unit bins around ``y`` (components in step units) under a zero-mean Laplace density
    per component whose scale in latent units is ``exp(log_scale)``."""
    scale = torch.exp(log_scale).view(1, -1, 1, 1) / (steps * weights)

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.5 * torch.sign(v) * (1 - torch.exp(-v.abs() / scale))

    probability = (cdf(y + 0.5) - cdf(y - 0.5)).clamp_min(1e-9)
    return -torch.log2(probability).sum(dim=(1, 2, 3))


def validate(path: CodecPath, name: str, encoder: torch.nn.Module, pixels: np.ndarray, steps: list[float],
             lpips: torch.nn.Module) -> None:
    """Print, per base step, the held-out crops' bits per full-size pixel with ``ctx3``, PSNR and ST-LPIPS
    (AlexNet) through ``encoder``."""
    coder = coders.get_coder("ctx3")
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        for step in steps:
            s = torch.full((1, 1, 1, 1), step)
            bits, decoded = 0, []
            for i in range(0, len(x), 8):
                symbols = path.symbols(path.components(encoder, x[i:i + 8], s))
                for item in symbols.numpy().astype(np.int32):
                    params, payload = coder.encode(item)
                    bits += 8 * (len(params) + len(payload))
                decoded.append(path.decode(symbols, s, x.shape[-1]))
            decoded = torch.cat(decoded)
            score = torch.cat([lpips(decoded[i:i + 8], x[i:i + 8]).flatten() for i in range(0, len(x), 8)])
            psnr = mean_psnr(decoded, torch.from_numpy(pixels).permute(0, 3, 1, 2).double())
            print(f"val {name} step {step:.2f}: {bits / x[:, 0].numel():.4f} bpp {psnr:.2f} dB "
                  f"ST-LPIPS {float(score.mean()):.4f}", flush=True)


def save_models_folder(encoder: torch.nn.Module, out: Path, models: Path) -> None:
    """``out``: the tuned taesd3 encoder (original taesd.py key layout, float32) and links to everything else."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for item in models.iterdir():
        link = out / item.name
        if item.name != f"{MODEL}_encoder.safetensors" and not link.exists():
            link.symlink_to(item.resolve())
    state = {k.removeprefix("layers."): v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / f"{MODEL}_encoder.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, required=True, help="models folder to write")
    parser.add_argument("--scale", type=float, default=0.625)
    parser.add_argument("--steps", type=float, nargs=2, default=(0.35, 1.1), metavar=("LOW", "HIGH"))
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128, help="training crop side in pixels (validation: 256)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--lpips-weight", type=float, default=0.5)
    parser.add_argument("--rate-weight", type=float, default=1.0)
    parser.add_argument("--val-steps", type=float, nargs="+", default=[0.4, 0.7, 1.0])
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from metrics import STLPIPS

    from pillow_sdlatent.models import load_model

    autoencoder = load_model(MODEL, device="cpu").module.float()
    data = load_cache(crop_cache(MODEL), len(list_photos(args.data)))
    pixels = torch.from_numpy(data["train"]["pixels"]).permute(0, 3, 1, 2)
    path = CodecPath(autoencoder, WEIGHTS_DIR / decoder_file(MODEL, args.scale), args.scale)
    shipped = autoencoder.encoder.requires_grad_(False)
    tuned = copy.deepcopy(shipped).requires_grad_(True)
    training_lpips, scoring_lpips = STLPIPS("vgg").net, STLPIPS("alex").net
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # the Laplace scales start at the shipped encoder's components on some crops
        sample = pixels[torch.randperm(len(pixels), generator=generator)[:32]].float() / 127.5 - 1
        components = path.components(shipped, sample, torch.ones(1, 1, 1, 1)) * path.weights
    log_scale = torch.log(components.abs().mean(dim=(0, 2, 3))).requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": tuned.parameters(), "lr": args.lr},
                                  {"params": [log_scale], "lr": 1e-2}])
    models = Path(os.environ.get("PILLOW_SDLATENT_MODELS", REPO.parent / "shared" / "models" / "taesd"))
    val = data["val"]["pixels"]
    print(f"train crops {len(pixels)}, val crops {len(val)}", flush=True)
    validate(path, "shipped", shipped, val, args.val_steps, scoring_lpips)
    start = time.time()
    for it in range(1, args.iters + 1):
        index = torch.randint(len(pixels), (args.batch,), generator=generator)
        top, left = (int(torch.randint(pixels.shape[-1] - args.crop + 1, (1,), generator=generator)) for _ in range(2))
        x = pixels[index, :, top:top + args.crop, left:left + args.crop].float() / 127.5 - 1
        if bool(torch.randint(2, (1,), generator=generator)):
            x = x.flip(-1)
        steps = draw_steps(generator, args.batch, args.steps, 1.0)
        with torch.no_grad():
            y0 = path.components(shipped, x, steps)
            plain = path.decode(path.rounded(y0), steps, args.crop)
        y = path.components(tuned, x, steps)
        decoded = path.decode(path.rounded(y), steps, args.crop)
        noisy = y + torch.rand(y.shape, generator=generator) - 0.5
        bits = laplace_bits(noisy, log_scale, steps, path.weights)
        with torch.no_grad():
            plain_bits = laplace_bits(y0 + torch.rand(y0.shape, generator=generator) - 0.5, log_scale, steps,
                                      path.weights)
        mse, perceptual = relative_errors(decoded, plain, x, training_lpips)
        rate = bits / plain_bits  # its gradient also fits the Laplace scales to the tuned encoder's components
        loss = (mse + args.lpips_weight * perceptual + args.rate_weight * rate).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % args.log_every == 0:
            print(f"{it}/{args.iters} mse {mse.mean().item():.4f} lpips {perceptual.mean().item():.4f} "
                  f"rate {rate.mean().item():.4f} {time.time() - start:.0f}s", flush=True)
        if it % args.val_every == 0 or it == args.iters:
            validate(path, f"tuned {it}", tuned, val, args.val_steps, scoring_lpips)
            save_models_folder(tuned, args.out, models)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
