"""Train a ctx2 coder network: ``ctx2_sd1.safetensors`` (4-channel TAESD latents, ``--model taesd``)
or ``ctx2_sd3.safetensors`` (16-channel taesd3 latents as their KLT components, ``--model taesd3``).

Reproducible on this project's 2-core CPU, seeded throughout (data, times, results: training/README.md):

    PILLOW_SDLATENT_MODELS=../shared/models/taesd HF_HUB_OFFLINE=1 python training/train_ctx2.py [--model taesd3]

Stages (``--stages``):

1. ``cache``: every training photo, whole, encoded once with the model's encoder (as the codec pads it).
   Every 40th photo in path order is held out: those are the "other photos" of docs/rd_other, and
   the validation set here. Kodak is never read.
2. ``train``: the float MLP of ``ctx2`` learns a mixture of discretised logistics for each
   symbol from its causal neighbourhood, minimising code length. Every batch row draws a photo, a
   position and a conditioning step (half from the codec's whole range, half around the model's usual
   steps), quantized as the codec does: ``rint(z / step)`` for taesd; for taesd3 the KLT components,
   each divided by its step weight, rounded 0.1 of a step toward zero (``quantize.ROUNDING_OFFSETS``).
3. ``export``: weights rounded to the integer layout ``ctx2`` runs, plus its lookup tables,
   into the cache folder; ``--install`` writes the package's file instead (then set its hash in
   ``ctx2.NETWORKS`` to the printed one: files coded with the old network stop decoding).
4. ``val``: real ctx2 bytes against zstd and ctx1 on the held-out photos at a few steps, quantized by the
   codec's own quantizer for the model.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pillow_sdlatent.core import quantize  # noqa: E402
from pillow_sdlatent.core.coders import ContextCoder, ZstdCoder  # noqa: E402
from pillow_sdlatent.core.coders import ctx2 as lc  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "train"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pillow_sdlatent" / "ctx2"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
HOLD_OUT_EVERY = 40
#: conditioning indices: the codec's whole step range (0.03 .. 4) and, per model, the band of its usual
#: steps: taesd's default quality (0.25 .. 0.6), taesd3 at 0.1 .. 0.3 bpp (0.3 .. 1.2, coded at 0.625)
COND_RANGE = (79, 192)
COND_FOCUS = {"taesd": (128, 148), "taesd3": (132, 164)}
LOG_SCALE_RANGE = (-48, 112)  # ln(scale) * 16: scales 0.05 .. 1100 symbols
MIN_SCALE = math.exp(LOG_SCALE_RANGE[0] / lc.LOG_SCALE_STEPS)


def photo_paths(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if any(p.name.lower().startswith("kodim") for p in paths):
        raise SystemExit("refusing to train on a Kodak photo")
    return paths


def cache_latents(data: Path, cache: Path, model_name: str) -> Path:
    """All training photos' latents of ``model_name`` in one .npz (an existing file is kept)."""
    out = cache / ("latents.npz" if model_name == "taesd" else f"latents_{model_name}.npz")
    if out.is_file():
        return out
    from tqdm import tqdm

    from pillow_sdlatent.models import load_model
    from pillow_sdlatent.pipeline import padded_rgb

    model = load_model(model_name)
    latents = []
    for path in tqdm(photo_paths(data), desc="encode"):
        with Image.open(path) as image:
            latents.append(model.encode_image(padded_rgb(image.convert("RGB"))))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, *latents)
    return out


def coder_units(latents: list[np.ndarray], model_name: str) -> list[np.ndarray]:
    """Latents as the coder sees them times the step: for a model with a KLT quantizer, its components
    divided by their step weights (a symbol is then ``rounded(value / step)`` for every channel)."""
    transform = quantize.klt_for_model(model_name)
    if transform is None:
        return latents
    klt = quantize.KltQuantizer.with_step(1.0, transform)
    weights = np.asarray(klt.steps, dtype=np.float64)[:, None, None]
    return [(klt.components(z) / weights).astype(np.float32) for z in latents]


def split(latents: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    train = [z for i, z in enumerate(latents) if i % HOLD_OUT_EVERY]
    return train, latents[::HOLD_OUT_EVERY]


class Sampler:
    """Random batch rows straight from the padded float latents: no feature matrix in memory."""

    def __init__(self, latents: list[np.ndarray], seed: int, focus: tuple[int, int], rounding_offset: float) -> None:
        pad = lc.PAD
        self.channels = latents[0].shape[0]
        self.focus, self.rounding_offset = focus, rounding_offset
        padded = [np.pad(z, ((0, 0), (pad, pad), (pad, pad))) for z in latents]
        self.flat = np.concatenate([z.ravel() for z in padded])
        sizes = [z[0].size for z in latents]
        self.weights = np.asarray(sizes, dtype=np.float64) / sum(sizes)
        self.starts = np.cumsum([0] + [z.size for z in padded])[:-1]
        self.shapes = [z.shape for z in latents]
        self.rng = np.random.default_rng(seed)
        self.steps = 2.0 ** ((np.arange(256) - lc.COND_ZERO) / 16)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Inputs (latent units, zero where the channel is not yet coded), channel, cond, step, symbol."""
        rng = self.rng
        img = rng.choice(len(self.shapes), n, p=self.weights)
        shapes = np.asarray(self.shapes)[img]
        ch = rng.integers(0, self.channels, n)
        y = (rng.random(n) * shapes[:, 1]).astype(np.int64)
        x = (rng.random(n) * shapes[:, 2]).astype(np.int64)
        focus = rng.random(n) < 0.5
        cond = np.where(focus, rng.integers(*self.focus, n), rng.integers(*COND_RANGE, n))
        step = self.steps[cond]
        stride = shapes[:, 2] + 2 * lc.PAD
        plane = (shapes[:, 1] + 2 * lc.PAD) * stride
        centre = self.starts[img] + ch * plane + (y + lc.PAD) * stride + x + lc.PAD
        offs = [dy * stride + dx for dy, dx in lc.SAME_TAPS]
        for prev in range(lc.WINDOW_CHANNELS):
            offs += [(prev - ch) * plane + dy * stride + dx for dy, dx in lc.PREV_TAPS]
        idx = centre[:, None] + np.stack(offs, 1)
        coded = [np.repeat((prev < ch)[:, None], len(lc.PREV_TAPS), 1) for prev in range(lc.WINDOW_CHANNELS)]
        avail = np.concatenate([np.ones((n, len(lc.SAME_TAPS)), bool), *coded], 1)
        idx = np.where(avail, idx, 0)
        sym_in = quantize.rounded(self.flat[idx] / step[:, None], self.rounding_offset) * avail
        inputs = np.clip(sym_in * step[:, None], -lc.INPUT_LIMIT / 2**lc.INPUT_BITS, lc.INPUT_LIMIT / 2**lc.INPUT_BITS)
        target = quantize.rounded(self.flat[centre] / step, self.rounding_offset)
        return inputs.astype(np.float32), ch, cond, step.astype(np.float32), target.astype(np.float32)


class FloatNet(nn.Module):
    """The float twin of ctx2's integer network (same inputs, clamps and outputs)."""

    def __init__(self, hidden: int, mixtures: int, channels: int) -> None:
        super().__init__()
        self.mixtures = mixtures
        self.l1 = nn.Linear(lc.N_INPUTS, hidden, bias=False)
        self.b1 = nn.Parameter(torch.zeros(channels, hidden))
        self.w_cond = nn.Parameter(torch.zeros(hidden))
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, 3 * mixtures)
        self.act_max = lc.ACT_LIMIT / 2**lc.INPUT_BITS

    def forward(self, x: torch.Tensor, ch: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        log_step = (cond.float() - lc.COND_ZERO) / 16
        h = (self.l1(x) + self.b1[ch] + log_step[:, None] * self.w_cond).clamp(0, self.act_max)
        return self.l3(self.l2(h).clamp(0, self.act_max))

    def bits(self, x: torch.Tensor, ch: torch.Tensor, cond: torch.Tensor, step: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        out = self(x, ch, cond)
        k = self.mixtures
        mu = out[:, :k] / step[:, None]
        scale = torch.exp(out[:, k : 2 * k]).clamp_min(MIN_SCALE)
        weight = torch.softmax(out[:, 2 * k :], 1)
        yy = y[:, None]
        p = (weight * (torch.sigmoid((yy + 0.5 - mu) / scale) - torch.sigmoid((yy - 0.5 - mu) / scale))).sum(1)
        return -torch.log2(p.clamp_min(2.0**-20))


def train(sampler: Sampler, hidden: int, mixtures: int, iters: int, batch: int) -> FloatNet:
    from tqdm import tqdm

    torch.manual_seed(0)
    net = FloatNet(hidden, mixtures, sampler.channels)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=iters, pct_start=0.05)
    bar = tqdm(range(iters), desc="train", mininterval=30)
    running = None
    for i in bar:
        x, ch, cond, step, y = (torch.from_numpy(a) for a in sampler.batch(batch))
        loss = net.bits(x, ch, cond, step, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = float(loss) if running is None else 0.99 * running + 0.01 * float(loss)
        if i % 200 == 0:
            bar.set_postfix(bits=f"{running:.3f}")
    return net


def lookup_tables() -> dict[str, np.ndarray]:
    """The integer tables ctx2 reads instead of computing exp and sigmoid itself."""
    log_scales = np.arange(LOG_SCALE_RANGE[0], LOG_SCALE_RANGE[1] + 1) / lc.LOG_SCALE_STEPS
    sig_args = (np.arange(2 * lc.SIG_HALF + 1) - lc.SIG_HALF) / lc.SIG_RES
    tables = {
        "step_table": 2.0 ** ((np.arange(256) - lc.COND_ZERO) / 16 + lc.STEP_BITS),
        "inv_scale": 2.0**lc.INV_SCALE_BITS / np.maximum(np.exp(log_scales), MIN_SCALE),
        "log_scale_min": np.asarray([LOG_SCALE_RANGE[0]]),
        "sigmoid": 2.0**lc.SIG_BITS / (1 + np.exp(-sig_args)),
        "exp_table": 2.0**16 * np.exp(-np.arange(256) / lc.EXP_STEPS),
    }
    return {name: np.ascontiguousarray(np.rint(values).astype(np.int64)) for name, values in tables.items()}


def export(net: FloatNet, path: Path) -> str:
    """Round to ctx2's integer layout and write the safetensors file; returns its SHA-256."""
    from safetensors.numpy import save

    def q(t: torch.Tensor, bits: int) -> np.ndarray:
        """Fixed point; int16 where every value fits (the weight matrices), which halves the file."""
        values = np.rint(t.detach().double().numpy() * 2.0**bits).astype(np.int64)
        # C order: safetensors writes the buffer as it lies in memory, and a transpose is only a view
        return np.ascontiguousarray(values.astype(np.int16 if np.abs(values).max() < 2**15 else np.int32))

    acc = lc.ACC_BITS
    tensors = {
        "w1": q(net.l1.weight.T, lc.WEIGHT_BITS),
        "b1": q(net.b1, acc),
        "w_cond": q(net.w_cond / 16, acc),  # per 1/16 of log2(step)
        "w2": q(net.l2.weight.T, lc.WEIGHT_BITS),
        "b2": q(net.l2.bias, acc),
        "w3": q(net.l3.weight.T, lc.WEIGHT_BITS),
        "b3": q(net.l3.bias, acc),
        **lookup_tables(),
    }
    data = save(tensors, metadata={"hidden": str(net.l2.in_features), "mixtures": str(net.mixtures)})
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def validate(latents: list[np.ndarray], steps: list[float], model_name: str, coder_name: str) -> None:
    """Real bytes of the learned coder, ctx1 and zstd on held-out latents, quantized as the codec quantizes
    them for ``model_name``; every learned file must decode back exactly."""
    coder, zstd, ctx1 = lc.LearnedContextCoder(coder_name), ZstdCoder(), ContextCoder()
    print(f"| step | zstd bytes | ctx1 bytes | {coder_name} bytes | saving vs zstd | vs ctx1 | encode s/img "
          "| decode s/img |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for step in steps:
        total_z = total_1 = total_c = enc_s = dec_s = 0.0
        for z in latents:
            sym = quantize.quantizer_for(model_name, step, z.shape[0]).quantize(z)
            total_z += sum(map(len, zstd.encode(sym)))
            total_1 += sum(map(len, ctx1.encode(sym)))
            t0 = time.perf_counter()
            params, payload = coder.encode(sym)
            t1 = time.perf_counter()
            assert np.array_equal(coder.decode(params, payload, sym.shape), sym)
            dec_s += time.perf_counter() - t1
            enc_s += t1 - t0
            total_c += len(params) + len(payload)
        n = len(latents)
        print(f"| {step} | {total_z / n:.0f} | {total_1 / n:.0f} | {total_c / n:.0f} | {1 - total_c / total_z:.1%} "
              f"| {1 - total_c / total_1:.1%} | {enc_s / n:.2f} | {dec_s / n:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(COND_FOCUS), default="taesd")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--stages", default="cache,train,export,val")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mixtures", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="weights file to write (default: the network's file name in CACHE)")
    parser.add_argument("--install", action="store_true",
                        help="write the package's weights file; every ctx2 file made with the old one stops decoding")
    parser.add_argument("--val-steps", type=float, nargs="+", default=[0.12, 0.38, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    latents = list(np.load(cache_latents(args.data, args.cache, args.model)).values())
    channels = latents[0].shape[0]
    coder_name = next(name for name, net in lc.NETWORKS.items() if net.channels == channels)
    network = lc.NETWORKS[coder_name]
    if args.out is None:
        args.out = network.file if args.install else args.cache / network.file.name
    train_set, held_out = split(latents)
    print(f"{len(train_set)} training latents, {len(held_out)} held out")
    float_path = args.cache / (f"float_h{args.hidden}_k{args.mixtures}.pt" if args.model == "taesd"
                               else f"float_{args.model}_h{args.hidden}_k{args.mixtures}.pt")
    if "train" in stages:
        t0 = time.time()
        units = coder_units(train_set, args.model)
        print(f"RMS in coder units: {np.sqrt(np.mean([np.mean(np.square(z)) for z in units])):.3f}")
        sampler = Sampler(units, 0, COND_FOCUS[args.model], quantize.ROUNDING_OFFSETS.get(args.model, 0.0))
        net = train(sampler, args.hidden, args.mixtures, args.iters, args.batch)
        torch.save(net.state_dict(), float_path)
        print(f"trained in {time.time() - t0:.0f} s")
    if "export" in stages:
        net = FloatNet(args.hidden, args.mixtures, channels)
        net.load_state_dict(torch.load(float_path))
        digest = export(net, args.out)
        print(f"wrote {args.out} (sha256 {digest}); set its hash in ctx2.NETWORKS to it")
    if "val" in stages:
        lc.NETWORKS[coder_name] = replace(network, file=args.out,
                                          sha256=hashlib.sha256(args.out.read_bytes()).hexdigest())
        lc.clear_cache()
        validate(held_out, args.val_steps, args.model, coder_name)


if __name__ == "__main__":
    main()
