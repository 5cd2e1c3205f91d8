"""Speed and memory of the codec's networks, against a matrix-product ceiling measured in the same run.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/speed.py [--device cpu|cuda] [--large]

For TAESD (real weights) and the full SD VAE (random weights of sd-vae-ft-mse's shape: the FLOPs and the
time do not depend on the values) it prints, per phase: ms per megapixel, GFLOP counted by
torch.utils.flop_counter, achieved GFLOP/s and its share of the measured float32 (CPU) or half-precision
(GPU) matrix-product ceiling, and peak memory (each measurement in a fresh process: peak RSS on the CPU,
peak allocated on CUDA). ``plain`` is diffusers as it comes; ``torch`` and ``onnxruntime`` are the
codec's two runtimes (``onnxruntime`` is the codec's default for TAESD on a CPU when it is installed).
``--large`` adds the bounded-memory checks: a 24-megapixel round trip's peak memory, the tiled-vs-untiled
PSNR, and the 1/8-scale preview's time and PSNR; ``--models`` with no names runs only those.
Writes benchmarks/results/speed_<device>.json.

``--stages`` adds where the time of opening and saving a photo goes (``open_speed.py``), beside AVIF,
JPEG XL and WebP, and writes docs/speed/stages.csv and stages.md (with ``--large``, the 24-megapixel
rows too). The whole set, to rerun on a quiet machine:

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/speed.py --models --stages --large --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "speed"
KODAK = HERE.parent.parent / "shared" / "data" / "kodak"
WIDTH, HEIGHT = 768, 512


def hardware_name() -> str:
    """The CPU model (from /proc/cpuinfo) and the cores this process may use."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling(device: str, sizes: tuple[int, ...] = (2048, 3072, 4096)) -> float:
    """Best GFLOP/s of large square matrix products: float32 on the CPU, float16 on a GPU.

    The best of several sizes and repeats, because a single 2048 product on a 2-core CPU reads 30-40%
    under what the BLAS sustains at 4096 (clock ramp-up, cache effects), which would flatter the ratio.
    """
    import torch

    dtype = torch.float32 if device == "cpu" else torch.float16
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.mm(a, b)
        for _ in range(5):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def sd_vae_random() -> Any:
    """An AutoencoderKL with sd-vae-ft-mse's architecture and random weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
        norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM): unlike ru_maxrss it does not carry over the
    parent's peak into a spawned worker."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: an upper bound


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, variant, phase) measurement; runs in a fresh process so peak memory is its own.

    Variants: ``plain`` is diffusers as it comes (float32, contiguous, no_grad); ``torch`` and
    ``onnxruntime`` are the codec's two runtimes (models.LatentModel).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pillow_sdlatent import models
    from pillow_sdlatent.models import weights

    device, variant, phase = job["device"], job["variant"], job["phase"]
    if job["model"] == "sd-vae":
        module, spec = sd_vae_random(), models.get_spec("sd-vae")
    else:
        spec = models.get_spec(job["model"])
        module = models._build_module(spec, None, os.environ.get(models.MODELS_ENV, ""))
    if variant == "plain":
        if isinstance(module, dict):  # TAESD weights load as a state dict: diffusers' own module holds them
            module = weights._tiny_module(spec, module)
        module = module.to(device).eval()
        encode = lambda x: module.encode(x)  # noqa: E731
        decode = lambda z: module.decode(z)  # noqa: E731
        dtype = torch.float32
        context = torch.no_grad
        count_encode, count_decode = encode, decode
    else:
        model = models.LatentModel(spec, module, device, models.default_dtype(device), variant)
        encode, decode, dtype, context = model.encode, model.decode, model.dtype, torch.inference_mode
        torch_model = models.LatentModel(spec, module, device, models.default_dtype(device))
        count_encode, count_decode = torch_model.encode, torch_model.decode  # ORT runs the same graph
    pixels = torch.rand(1, 3, HEIGHT, WIDTH, device=device) * 2 - 1
    latent = torch.randn(1, spec.channels, HEIGHT // 8, WIDTH // 8, device=device)
    if phase == "encode":
        run, count = (lambda: encode(pixels.to(dtype))), (lambda: count_encode(pixels.to(dtype)))
    else:
        run, count = (lambda: decode(latent.to(dtype))), (lambda: count_decode(latent.to(dtype)))
    with context():
        counter = FlopCounterMode(display=False)
        with counter:
            count()
        flops = counter.get_total_flops()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds = _timed(run, device, job["repeats"])
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()
    return {**job, "seconds": seconds, "ms_per_mp": seconds * 1e3 / (WIDTH * HEIGHT / 1e6),
            "gflop": flops / 1e9, "gflops": flops / seconds / 1e9, "peak_mib": peak / 2**20}


def large_checks(device: str) -> dict[str, Any]:
    """24-MP round trip peak memory, tiled vs untiled PSNR, and the preview's time and PSNR."""
    import io

    from PIL import Image

    import pillow_sdlatent  # noqa: F401
    from pillow_sdlatent import models, pipeline
    from pillow_sdlatent.models import tiling

    with Image.open(KODAK / "kodim23.png") as photo:
        photo = photo.convert("RGB")
    results: dict[str, Any] = {}

    model = models.load_model("taesd", device=device)
    medium = np.asarray(photo.resize((1536, 1024), Image.Resampling.LANCZOS))
    untiled_limit = tiling.TILED_ABOVE_PIXELS
    tiling.TILED_ABOVE_PIXELS = 1 << 40
    latent = model.encode_image(medium)
    whole = model.decode_image(latent)
    tiling.TILED_ABOVE_PIXELS = 1
    tiled = model.decode_image(model.encode_image(medium))
    tiling.TILED_ABOVE_PIXELS = untiled_limit
    results["tile_seam_psnr_db"] = _psnr(whole, tiled)
    results["quantization_psnr_db"] = _psnr(medium, whole)

    buffer = io.BytesIO()
    photo.save(buffer, format="SDL")
    start = time.perf_counter()
    with Image.open(io.BytesIO(buffer.getvalue())) as preview:
        preview.draft("RGB", (WIDTH // 8, HEIGHT // 8))
        preview.load()
    results["preview_ms"] = (time.perf_counter() - start) * 1e3
    full = pipeline.decode_file(buffer.getvalue())
    results["preview_psnr_db"] = _psnr(np.asarray(full.reduce(8)), np.asarray(preview))

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results.update(pool.apply(_round_trip_24mp, (device,)))
    return results


def _round_trip_24mp(device: str) -> dict[str, Any]:
    import io

    from PIL import Image

    import pillow_sdlatent
    from pillow_sdlatent import pipeline

    with Image.open(KODAK / "kodim23.png") as photo:
        big = photo.convert("RGB").resize((6000, 4000), Image.Resampling.BICUBIC)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    buffer = io.BytesIO()
    big.save(buffer, format="SDL", device=device)
    encoded = time.perf_counter() - start
    image = pipeline.decode_file(buffer.getvalue(), device=device)
    peak = peak_rss_bytes()
    assert image.size == big.size and pillow_sdlatent
    return {"24mp_peak_rss_mib": peak / 2**20, "24mp_rss_before_mib": baseline / 2**20,
            "24mp_encode_s": encoded, "24mp_decode_s": time.perf_counter() - start - encoded,
            "24mp_bytes": buffer.tell(), "24mp_psnr_db": _psnr(np.asarray(big), np.asarray(image))}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["taesd", "sd-vae"],
                        help="models for the speed table (none: only --large)")
    parser.add_argument("--large", action="store_true", help="add the 24-MP, tiling and preview checks")
    parser.add_argument("--stages", action="store_true",
                        help="add each stage of opening and saving a 768x512 photo, beside AVIF, JPEG XL and WebP")
    args = parser.parse_args()
    import torch

    from pillow_sdlatent import models

    ceiling = matmul_ceiling(args.device) if args.models else float("nan")  # a minute of products: only for the table
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{hardware_name()}, {torch.get_num_threads()} threads")
    defaults = {m: models.resolve_runtime(models.get_spec(m), args.device) for m in args.models}
    jobs = [{"model": m, "variant": v, "phase": p, "device": args.device, "repeats": args.repeats}
            for m in args.models for v in ("plain", *dict.fromkeys(("torch", defaults[m])))
            for p in ("encode", "decode")]
    context = multiprocessing.get_context("spawn")
    rows = []
    for job in jobs:
        with context.Pool(1) as pool:
            row = pool.apply(measure, (job,))
        row["ceiling_share"] = row["gflops"] / ceiling
        rows.append(row)
        print(f"  measured {job['model']} {job['variant']} {job['phase']}", file=sys.stderr)
    if rows:
        print(f"\n{hardware}; matrix-product ceiling {ceiling:.0f} GFLOP/s "
              f"({'float32' if args.device == 'cpu' else 'float16'})\n")
        print("| model | variant | phase | ms / MP | GFLOP (768x512) | GFLOP/s | of ceiling | peak MiB |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['phase']} | {r['ms_per_mp']:.0f} | {r['gflop']:.0f} | "
              f"{r['gflops']:.0f} | {r['ceiling_share']:.0%} | {r['peak_mib']:.0f} |")
    for model in args.models:
        trip = [r for r in rows if r["model"] == model and r["variant"] == defaults[model]]
        share = sum(r["gflop"] for r in trip) / sum(r["seconds"] for r in trip) / ceiling
        print(f"\n{model} round trip as the codec runs it ({defaults[model]}): "
              f"{sum(r['seconds'] for r in trip):.2f} s for 768x512, {share:.0%} of the ceiling")
    report = {"device": args.device, "hardware": hardware, "ceiling_gflops": ceiling, "rows": rows}
    if args.stages:
        import open_speed

        report["stages"] = open_speed.stage_rows(args.repeats)
    if args.large:
        report["large"] = large_checks(args.device)
        print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in report["large"].items()))
    if args.stages:
        write_stages(report["stages"], report.get("large", {}), args.repeats)
    out = HERE / "results" / f"speed_{args.device.split(':')[0]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


def write_stages(stages: list[dict[str, Any]], large: dict[str, Any], repeats: int) -> None:
    """docs/speed/stages.csv and stages.md: the stage table, the machine, and the 24-MP round trip if measured."""
    import csv

    import open_speed

    load = os.getloadavg()[0]
    rows = [*stages, *({"stage": f"24 MP round trip (6000x4000): {name}", "side": side, "value": large[key],
                        "unit": unit, "statistic": "once, fresh process", "bytes": large["24mp_bytes"],
                        "load1": load, "ratio_to_avif": None}
                       for key, name, side, unit in (("24mp_peak_rss_mib", "peak RSS (VmHWM)", "both", "MiB"),
                                                     ("24mp_encode_s", "save", "encode", "s"),
                                                     ("24mp_decode_s", "decode", "decode", "s"))
                       if key in large)]
    machine = f"{hardware_name()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    DOCS.mkdir(parents=True, exist_ok=True)
    with open(DOCS / "stages.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stage", "side", "value", "unit", "ratio_to_avif", "statistic",
                                               "bytes", "load1", "machine"])
        writer.writeheader()
        writer.writerows({**row, "machine": machine} for row in rows)
    command = ("PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/speed.py --models --stages"
               f"{' --large' if large else ''} --repeats {repeats}")
    lines = open_speed.table(rows)
    text = "\n".join([f"# Opening and saving a 768x512 photo, stage by stage\n\n`{command}`\n\n{machine}.",
                      open_speed.NOTES, *lines]) + "\n"
    (DOCS / "stages.md").write_text(text)
    print("\n" + text + f"\nwrote {DOCS / 'stages.csv'}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
