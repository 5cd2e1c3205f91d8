"""int8 and float16 ONNX Runtime variants of the TAESD decoders and the restorer, against float32.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/decoder_variants.py [--held-out 8] [--kodak 8]

The codec runs its networks in float32 through ONNX Runtime, where the TAESD decoder already reaches
about the float32 ceiling; this measures whether cheaper arithmetic keeps the pictures. Each network
(the ``taesd`` and ``taesd3`` decoders, and the ``taesd`` latent restorer) is exported with torch's
ONNX exporter as the codec does (``ort_engine``) and turned into:

- ``float16``: the module cast to half before export (weights, activations, inputs in float16);
- ``int8-qdq`` and ``int8-qop``: ``onnxruntime.quantization.quantize_static``, QDQ and QOperator
  formats, uint8 activations, int8 per-channel weights, MinMax calibration on the inputs the network
  sees in real files (latents of 16 training photos outside the held-out split, centre-cropped to
  384x256; never Kodak).

Speed: ms per 768x512 decode (the restorer: per 768x512 image's latent), best of ``--repeats``, every
variant run back to back with float32 in each round so that machine load hits all alike. Quality:
photos saved as ``.sdl`` (the decoders at the default quality; the restorer at quality 60 and scale 1,
where it runs), decoded by each variant (a restorer variant feeds the float32 decoder) and scored
against the photo: PSNR and ST-LPIPS minus float32's, and the largest pixel difference from
float32's output, on held-out training photos (sorted training files with index % 40 in {0, 20},
centre-cropped to at most 768x512) and on Kodak. A variant qualifies when it is faster and keeps
the mean PSNR within 0.1 dB and the mean ST-LPIPS within 0.002 of float32 on both sets.

Also the float32 decoder under ORT session options (optimization level, threads, spinning, arena).
Writes docs/speed/variants.md, variants.csv and session_options.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from onnxruntime import quantization
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics import STLPIPS, psnr
from rd import image_paths
from speed import KODAK, hardware_name

from pillow_sdlatent import models, pipeline
from pillow_sdlatent.core import container, read
from pillow_sdlatent.enhance import restore
from pillow_sdlatent.models import tiling
from pillow_sdlatent.options import DecodeOptions

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO.parent / "shared" / "data" / "train"
OUT = REPO / "docs" / "speed"
#: the adoption rule: a variant may lose at most this much against float32 (means over a photo set)
PSNR_TOLERANCE_DB = 0.1
STLPIPS_TOLERANCE = 0.002
CALIBRATION_PHOTOS = 16
#: ORT's MinMax calibration keeps every intermediate tensor of every run until it is done: crops keep that
#: bounded (16 whole 768x512 decodes would hold several GB), and the ranges it takes are per tensor anyway
CALIBRATION_SIZE = (384, 256)
#: the restorer runs from step 0.45 up (restore.HELPFUL_STEPS); quality 60 is step 0.61
RESTORER_QUALITY = 60
TIMING_SIZE = (768, 512)


@dataclass
class Photo:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8, H and W multiples of 8
    latent: np.ndarray  # (C, H/8, W/8): what the network under test gets
    step: float


@dataclass
class Network:
    """One network under test: how to export it and what feeds it."""

    name: str
    model: str  # the codec model whose files feed it
    save_options: dict[str, Any]
    module: torch.nn.Module
    channels: int
    is_restorer: bool = False

    def example(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        latent = torch.zeros(1, self.channels, 8, 8, dtype=dtype)
        return (latent, torch.ones(1, 1, 1, 1, dtype=dtype)) if self.is_restorer else (latent,)

    def feeds(self, latent: np.ndarray, step: float, dtype: type) -> dict[str, np.ndarray]:
        inputs = {"latent": latent[None].astype(dtype)}
        if self.is_restorer:
            inputs["step"] = np.full((1, 1, 1, 1), step, dtype)
        return inputs


class _Decoder(torch.nn.Module):
    """A TAESD decoder as one forward (a module, so that casting and copying reach its weights)."""

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latent).sample


def networks() -> list[Network]:
    def decoder(name: str) -> Network:
        module = models.load_model(name, device="cpu", runtime="torch").module
        module = copy.deepcopy(module).to(memory_format=torch.contiguous_format)
        return Network(name, name, {"model": name}, _Decoder(module), models.get_spec(name).channels)

    restorer = copy.deepcopy(restore.restorer_net("taesd"))
    return [decoder("taesd"),
            Network("restorer", "taesd", {"model": "taesd", "quality": RESTORER_QUALITY, "scale": 1}, restorer,
                    restorer.head.in_channels - 1, is_restorer=True),
            decoder("taesd3")]


def export(network: Network, dtype: torch.dtype) -> bytes:
    """The network as an ONNX graph with dynamic batch, height and width, as ``ort_engine`` exports it."""
    import warnings

    module = copy.deepcopy(network.module).to(dtype).eval()
    names = ["latent", "step"] if network.is_restorer else ["latent"]
    axes = {0: "batch", 2: "height", 3: "width"}
    graph = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, network.example(dtype), graph, dynamo=False, opset_version=17,
                          input_names=names, output_names=["output"],
                          dynamic_axes={"latent": axes, "output": axes, "step": {0: "batch"}})
    return graph.getvalue()


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantized(float_graph: bytes, feeds: list[dict[str, np.ndarray]], fmt: quantization.QuantFormat) -> bytes:
    """Static int8: uint8 activations, per-channel int8 weights, MinMax ranges from ``feeds``."""
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / name for name in ("f32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(float_graph)
        quantization.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(str(prepared), str(target), _Calibration(feeds), quant_format=fmt,
                                     per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8,
                                     calibrate_method=quantization.CalibrationMethod.MinMax)
        return target.read_bytes()


def session(graph: bytes, **settings: Any) -> onnxruntime.InferenceSession:
    """A CPU session as the codec builds it (ort_engine), with ``settings`` changed."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.get("threads", torch.get_num_threads())
    options.graph_optimization_level = settings.get("level", onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.enable_cpu_mem_arena = settings.get("arena", True)
    if "spinning" in settings:
        options.add_session_config_entry("session.intra_op.allow_spinning", settings["spinning"])
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class Variant:
    """One runnable form of a network: float32, float16 or int8."""

    def __init__(self, name: str, network: Network, graph: bytes, **settings: Any) -> None:
        self.name, self.network = name, network
        self.session = session(graph, **settings)
        self.dtype = np.float16 if name == "float16" else np.float32

    def __call__(self, latent: np.ndarray, step: float) -> np.ndarray:
        output = self.session.run(None, self.network.feeds(latent, step, self.dtype))[0]
        return output[0].astype(np.float32)


def held_out_paths(count: int) -> list[Path]:
    """``count`` photos spread over the held-out split (sorted training files, index % 40 in {0, 20})."""
    held = [p for i, p in enumerate(image_paths(TRAIN, None)) if i % 40 in (0, 20)]
    return held[:: max(1, len(held) // count)][:count]


def calibration_paths(count: int) -> list[Path]:
    """``count`` training photos spread over those outside the held-out split."""
    rest = [p for i, p in enumerate(image_paths(TRAIN, None)) if i % 40 not in (0, 20)]
    return rest[len(rest) // (2 * count) :: max(1, len(rest) // count)][:count]


def load_rgb(path: Path, size: tuple[int, int] = TIMING_SIZE) -> np.ndarray:
    """The photo centre-cropped to at most ``size`` (either orientation), sides multiples of 8."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    long_side, short_side = max(size), min(size)
    limit = (long_side, short_side) if image.width >= image.height else (short_side, long_side)
    width, height = (min(side, cap) // 8 * 8 for side, cap in zip(image.size, limit, strict=True))
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def photos(network: Network, paths: list[Path], size: tuple[int, int] = TIMING_SIZE) -> Iterator[Photo]:
    """Each photo (cropped to ``size``) through the codec: saved as ``.sdl``, then the latent this network
    receives on decode."""
    for path in paths:
        rgb = load_rgb(path, size)
        data = pipeline.encode_image(Image.fromarray(rgb), network.save_options)
        fp = io.BytesIO(data)
        layout = container.read_layout(fp)
        latent = read.latent_from_layout(fp, layout)
        step = max(read.file_quantizer(layout.header).steps)
        if not network.is_restorer:
            options = DecodeOptions()
            latent = pipeline.clean_latent(latent, layout, pipeline.decoder_for(layout, options), options)
        yield Photo(path.stem, rgb, latent, step)


def best_times(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best seconds of each run, over ``repeats`` rounds that run them all back to back."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def to_pixels(network: Network, output: np.ndarray, decoder: Variant | None, step: float) -> np.ndarray:
    """uint8 pixels as the codec makes them; a restorer's output goes through the float32 decoder first."""
    if decoder is not None:
        output = decoder(output, step)
    return tiling.to_uint8(output.transpose(1, 2, 0))


def score(network: Network, variants: list[Variant], photo_set: list[Photo], decoder: Variant | None,
          stlpips: STLPIPS) -> dict[str, dict[str, float]]:
    """Per variant: mean PSNR and ST-LPIPS against the photos, their differences from float32's, the
    worst photo's PSNR difference and the largest pixel difference from float32's output."""
    totals: dict[str, dict[str, list[float]]] = {v.name: {"psnr": [], "stlpips": [], "max_diff": []}
                                                  for v in variants}
    for photo in photo_set:
        reference = stlpips.features(photo.rgb)
        height, width = photo.rgb.shape[:2]
        outputs = {v.name: to_pixels(network, v(photo.latent, photo.step), decoder, photo.step)[:height, :width]
                   for v in variants}
        for name, pixels in outputs.items():
            totals[name]["psnr"].append(psnr(photo.rgb, pixels))
            totals[name]["stlpips"].append(stlpips.distance(reference, pixels))
            difference = np.abs(pixels.astype(np.int16) - outputs["float32"].astype(np.int16))
            totals[name]["max_diff"].append(float(difference.max()))
    base = totals["float32"]
    return {name: {"psnr": float(np.mean(t["psnr"])), "stlpips": float(np.mean(t["stlpips"])),
                   "d_psnr": float(np.mean(t["psnr"]) - np.mean(base["psnr"])),
                   "d_stlpips": float(np.mean(t["stlpips"]) - np.mean(base["stlpips"])),
                   "worst_d_psnr": float(min(np.subtract(t["psnr"], base["psnr"]))),
                   "max_diff": max(t["max_diff"])} for name, t in totals.items()}


def session_option_rows(network: Network, graph: bytes, latent: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """The float32 network under ORT session settings, timed back to back with the codec's own."""
    level = onnxruntime.GraphOptimizationLevel
    settings: dict[str, dict[str, Any]] = {
        "codec (ENABLE_ALL, all threads, spinning, arena)": {},
        "ENABLE_EXTENDED (no NCHWc layout)": {"level": level.ORT_ENABLE_EXTENDED},
        "ENABLE_BASIC": {"level": level.ORT_ENABLE_BASIC},
        "1 thread": {"threads": 1},
        "no spinning": {"spinning": "0"},
        "no arena": {"arena": False},
        "no spinning, no arena": {"spinning": "0", "arena": False},
    }
    runs = {}
    for label, chosen in settings.items():
        variant = Variant("float32", network, graph, **chosen)
        runs[label] = lambda variant=variant: variant(latent, 1.0)
    times = best_times(runs, repeats)
    codec_time = times[next(iter(settings))]
    load = os.getloadavg()[0]
    return [{"network": network.name, "setting": label, "ms": seconds * 1e3, "vs_codec": seconds / codec_time,
             "load1": load} for label, seconds in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=8, help="held-out training photos scored")
    parser.add_argument("--kodak", type=int, default=8, help="Kodak photos scored (spread over the 24)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--networks", default="taesd,taesd3,restorer")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.environ.setdefault(models.MODELS_ENV, str(REPO.parent / "shared" / "models" / "taesd"))
    kodak = sorted(KODAK.glob("*.png"))
    kodak = kodak[:: max(1, len(kodak) // args.kodak)][: args.kodak]
    sets = {"held-out": held_out_paths(args.held_out), "kodak": kodak}
    stlpips = STLPIPS()
    rows: list[dict[str, Any]] = []
    option_rows: list[dict[str, Any]] = []
    wanted = args.networks.split(",")
    candidates = networks()
    taesd = candidates[0]
    float_decoder = Variant("float32", taesd, export(taesd, torch.float32)) if "restorer" in wanted else None
    for network in [n for n in candidates if n.name in wanted]:
        print(f"{network.name}: encoding photos", file=sys.stderr)
        calibration = list(photos(network, calibration_paths(CALIBRATION_PHOTOS), CALIBRATION_SIZE))
        feeds = [network.feeds(p.latent, p.step, np.float32) for p in calibration]
        graph = export(network, torch.float32)
        variants = [Variant("float32", network, graph), Variant("float16", network, export(network, torch.float16))]
        for name, fmt in (("int8-qdq", quantization.QuantFormat.QDQ),
                          ("int8-qop", quantization.QuantFormat.QOperator)):
            variants.append(Variant(name, network, quantized(graph, feeds, fmt)))
        (timing,) = photos(network, [KODAK / "kodim23.png"])
        print(f"{network.name}: timing", file=sys.stderr)
        times = best_times({v.name: (lambda v=v, t=timing: v(t.latent, t.step)) for v in variants}, args.repeats)
        load = os.getloadavg()[0]
        decoder = float_decoder if network.is_restorer else None
        for set_name, paths in sets.items():
            print(f"{network.name}: scoring {set_name}", file=sys.stderr)
            scores = score(network, variants, list(photos(network, paths)), decoder, stlpips)
            for variant in variants:
                rows.append({"network": network.name, "variant": variant.name, "set": set_name, "photos": len(paths),
                             "ms": times[variant.name] * 1e3, "speedup": times["float32"] / times[variant.name],
                             "load1": load, **scores[variant.name]})
        if network.name == "taesd":
            print(f"{network.name}: session options", file=sys.stderr)
            option_rows = session_option_rows(network, graph, timing.latent, args.repeats)
        write(args, rows, option_rows)  # after each network, so that a long run keeps what it measured


def qualifies(rows: list[dict[str, Any]], network: str, variant: str) -> bool:
    """The adoption rule: faster, and within the PSNR and ST-LPIPS tolerances on every photo set."""
    mine = [r for r in rows if r["network"] == network and r["variant"] == variant]
    return all(r["speedup"] > 1 and r["d_psnr"] >= -PSNR_TOLERANCE_DB and r["d_stlpips"] <= STLPIPS_TOLERANCE
               for r in mine)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], option_rows: list[dict[str, Any]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in (("variants.csv", rows), ("session_options.csv", option_rows)):
        if table:
            with open(args.out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
    command = ("PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/decoder_variants.py "
               f"--held-out {args.held_out} --kodak {args.kodak} --repeats {args.repeats} --networks {args.networks}")
    lines = [
        "# Decoder variants: int8 and float16 against float32 (ONNX Runtime, CPU)", "",
        f"`{command}`", "",
        f"{hardware_name()}; ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}. "
        f"Times are the best of {args.repeats} rounds, each running every variant back to back; "
        "`load1` is the 1-minute load average when they were taken (a shared machine reads slower).", "",
        "Quality: mean over the photos of the variant's PSNR and ST-LPIPS against the photo, minus float32's "
        "(negative dPSNR and positive dST-LPIPS are losses); `worst dPSNR` is the worst single photo; "
        "`max diff` the largest 8-bit pixel difference from float32's output. Rule: faster, and "
        f"dPSNR >= -{PSNR_TOLERANCE_DB} dB and dST-LPIPS <= {STLPIPS_TOLERANCE} on both sets.", "",
        "| network | variant | set | ms (768x512) | speed vs float32 | load1 | PSNR dB | dPSNR dB | worst dPSNR | "
        "ST-LPIPS | dST-LPIPS | max diff | qualifies |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        verdict = "" if r["variant"] == "float32" else ("yes" if qualifies(rows, r["network"], r["variant"]) else "no")
        lines.append(f"| {r['network']} | {r['variant']} | {r['set']} ({r['photos']}) | {r['ms']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['load1']:.1f} | {r['psnr']:.2f} | {r['d_psnr']:+.3f} | "
                     f"{r['worst_d_psnr']:+.3f} | {r['stlpips']:.4f} | {r['d_stlpips']:+.4f} | "
                     f"{r['max_diff']:.0f} | {verdict} |")
    if option_rows:
        lines += ["", "## float32 session options (taesd decoder, 768x512)", "",
                  "| setting | ms | vs the codec's | load1 |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['setting']} | {r['ms']:.0f} | {r['vs_codec']:.2f} | {r['load1']:.1f} |" for r in option_rows]
    (args.out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
