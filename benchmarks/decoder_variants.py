"""int8 and float16 ONNX Runtime variants of the TAESD decoders and the restorer, against float32.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/decoder_variants.py [--held-out 8] [--kodak 8] \
        [--sensitivity 8]

The codec runs its networks in float32 through ONNX Runtime, where the TAESD decoder already reaches
about the float32 ceiling; this measures whether cheaper arithmetic keeps the pictures. Each network
(the ``taesd`` and ``taesd3`` decoders, and the ``taesd`` latent restorer) is exported with torch's
ONNX exporter as the codec does (``ort_engine``) and turned into:

- ``float16``: the module cast to half before export (weights, activations, inputs in float16);
- ``int8-qdq`` and ``int8-qop``: ``onnxruntime.quantization.quantize_static``, QDQ and QOperator
  formats, uint8 activations, int8 per-channel weights, MinMax calibration on the inputs the network
  sees in real files (latents of 16 training photos outside the held-out split, centre-cropped to
  384x256; never Kodak);
- for the ``taesd`` decoder also other int8 recipes (``TAESD_INT8``): Percentile and Entropy
  calibration, 64 calibration photos, symmetric activations, 7-bit weights (``reduce_range``), and
  parts of the graph left in float32 (the input's soft clamp and first Conv, the last Conv, the
  1/8-resolution stage), and ``int8-codec``, the int8 graph the codec itself writes (``precision="int8"``,
  ``onnx_graphs.taesd_decoder_int8``). With ``--sensitivity N``, each decoder layer is also quantized alone and
  scored on N training photos outside the held-out split, for the noise it adds to float32's output.

Speed: ms per 768x512 decode (the restorer: per 768x512 image's latent), best of ``--repeats``, every
variant run back to back with float32 in each round so that machine load hits all alike. Quality:
photos saved as ``.sdl`` (the decoders at the default quality; the restorer at quality 60 and scale 1,
where it runs), decoded by each variant (a restorer variant feeds the float32 decoder) and scored
against the photo: PSNR and ST-LPIPS minus float32's, and the largest pixel difference from
float32's output, on held-out training photos (sorted training files with index % 40 in {0, 20},
centre-cropped to at most 768x512) and on Kodak. A variant qualifies when it is faster and keeps
the mean PSNR within 0.1 dB and the mean ST-LPIPS within 0.002 of float32 on both sets.

Also the float32 decoder under ORT session options (optimization level, threads, spinning, arena).
Writes docs/speed/variants.md, variants.csv, session_options.csv and (``--sensitivity``)
int8_sensitivity.csv.
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
from pillow_sdlatent.models import onnx_graphs, tiling
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
    """The calibration feeds, handed to the calibrator one at a time (``CalibStridedMinMax`` = 1): the
    histogram calibrators stack a batch's tensors, which fails for photos of different shapes, and one
    at a time keeps memory bounded. MinMax ranges come out the same either way."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._all = feeds
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._feeds = iter(self._all[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@dataclass(frozen=True)
class Int8:
    """One static int8 recipe for ``quantize_static``: uint8 activations with per-tensor ranges from the
    calibration photos, int8 per-channel weights."""

    fmt: str = "QDQ"  # or "QOperator"
    method: str = "MinMax"  # or "Percentile", "Entropy" (quantization.CalibrationMethod)
    photos: int = CALIBRATION_PHOTOS
    percentile: float | None = None
    #: parts of the graph left in float32 (``float_nodes``): "first", "last", "stage1"
    keep_float: tuple[str, ...] = ()
    reduce_range: bool = False  # 7-bit weights
    activation_symmetric: bool = False

    @property
    def calibration(self) -> tuple[str, int, float | None]:
        return self.method, self.photos, self.percentile


#: every network gets these
BASE_INT8 = {"int8-qdq": Int8(), "int8-qop": Int8(fmt="QOperator")}
#: the taesd decoder (the default model) also gets calibration methods, options and parts kept in float32
TAESD_INT8 = {
    **BASE_INT8,
    "int8-minmax64": Int8(photos=64),
    "int8-pct99.999": Int8(method="Percentile", percentile=99.999),
    "int8-pct99.99": Int8(method="Percentile", percentile=99.99),
    "int8-entropy": Int8(method="Entropy"),
    "int8-act-symmetric": Int8(activation_symmetric=True),
    "int8-7bit": Int8(reduce_range=True),
    "int8-float-first": Int8(keep_float=("first",)),
    "int8-float-first-last": Int8(keep_float=("first", "last")),
    "int8-float-first-last-7bit": Int8(keep_float=("first", "last"), reduce_range=True),
    "int8-float-first-last-minmax64": Int8(keep_float=("first", "last"), photos=64),
    "int8-float-stage1-last": Int8(keep_float=("stage1", "last")),
}


#: what each variant is, for the tables
DESCRIPTIONS = {
    "float16": "the module cast to half before export",
    "int8-qdq": "QDQ, MinMax ranges from 16 photos, every Conv/Add/Resize/Mul quantized",
    "int8-qop": "as int8-qdq in QOperator form (QLinearConv, QLinearAdd)",
    "int8-minmax64": "as int8-qdq, ranges from 64 photos",
    "int8-pct99.999": "as int8-qdq, ranges at the 99.999th percentile of each tensor's histogram",
    "int8-pct99.99": "as int8-qdq, 99.99th percentile",
    "int8-entropy": "as int8-qdq, ranges minimizing the KL divergence of each histogram (Entropy)",
    "int8-act-symmetric": "as int8-qdq, activation ranges symmetric about 0 (ActivationSymmetric)",
    "int8-7bit": "as int8-qdq, 7-bit weights (reduce_range, for AVX2 CPUs without VNNI)",
    "int8-float-first": "as int8-qdq, the input's soft clamp (Mul) and the first Conv in float32",
    "int8-float-first-last": "as int8-float-first, the last Conv (64 -> 3 channels) in float32 too",
    "int8-float-first-last-7bit": "as int8-float-first-last, 7-bit weights (reduce_range)",
    "int8-float-first-last-minmax64": "as int8-float-first-last, ranges from 64 photos",
    "int8-float-stage1-last": "as int8-qdq, the 1/8-resolution stage (layers 0-4) and the last Conv in float32",
    "int8-codec": "the codec's own int8 graph (`precision=\"int8\"`), written by onnx_graphs from the weights "
                  "and the ranges of training/fit_int8_ranges.py: the 1/8-resolution stage, the Conv after "
                  "it and the last Conv in float32",
}


def codec_int8_graph(model: str) -> bytes:
    """The int8 decoder graph the codec runs for ``model`` (``LatentModel.decoding_in``)."""
    decoder = models.load_model(model, device="cpu", runtime="onnxruntime")
    return onnx_graphs.taesd_decoder_int8(decoder._state, models.int8_ranges()[model]["ranges"])


def float_nodes(graph: bytes, parts: tuple[str, ...]) -> list[str]:
    """Names of the nodes ``quantize_static`` should leave in float32: "first" is the input's soft clamp
    (its Mul) and the first Conv, so the latent is not rounded to uint8; "stage1" every node before the
    first Resize (the 1/8-resolution stage); "last" the last Conv (64 -> 3 channels, the pixels)."""
    import onnx

    nodes = list(onnx.load_from_string(graph).graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    names: list[str] = []
    for part in parts:
        if part == "first":
            chosen: Any = range(convs[0] + 1)
        elif part == "stage1":
            chosen = range(next(i for i, node in enumerate(nodes) if node.op_type == "Resize"))
        else:
            chosen = [convs[-1]]
        names += [nodes[i].name for i in chosen if nodes[i].name not in names]
    return names


class Calibrations:
    """Calibration ranges computed once per (method, photos, percentile) and reused by every recipe
    (``quantize_static``'s calibration cache), for one network."""

    def __init__(self, network: Network, float_graph: bytes, folder: Path) -> None:
        self.network, self.folder = network, folder
        self.source, self.prepared = folder / "f32.onnx", folder / "pre.onnx"
        self.source.write_bytes(float_graph)
        quantization.quant_pre_process(str(self.source), str(self.prepared), skip_symbolic_shape=True)
        self._feeds: dict[int, list[dict[str, np.ndarray]]] = {}

    def feeds(self, count: int) -> list[dict[str, np.ndarray]]:
        if count not in self._feeds:
            calibration = photos(self.network, calibration_paths(count), CALIBRATION_SIZE)
            self._feeds[count] = [self.network.feeds(p.latent, p.step, np.float32) for p in calibration]
        return self._feeds[count]

    def quantized(self, recipe: Int8, exclude: list[str] | None = None) -> bytes:
        """The float graph quantized by ``recipe``, ``exclude`` (node names) overriding its float parts."""
        method, count, percentile = recipe.calibration
        cache = self.folder / f"ranges-{method}-{count}-{percentile}.json"
        extra: dict[str, Any] = {"CalibStridedMinMax": 1, "ActivationSymmetric": recipe.activation_symmetric}
        if percentile is not None:
            extra["CalibPercentile"] = percentile
        target = self.folder / "int8.onnx"
        if exclude is None:
            exclude = float_nodes(self.prepared.read_bytes(), recipe.keep_float)
        quantization.quantize_static(
            str(self.prepared), str(target), None if cache.exists() else _Calibration(self.feeds(count)),
            quant_format=getattr(quantization.QuantFormat, recipe.fmt), per_channel=True,
            reduce_range=recipe.reduce_range, activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, nodes_to_exclude=exclude,
            calibrate_method=getattr(quantization.CalibrationMethod, method), extra_options=extra,
            calibration_cache_path=str(cache))
        return target.read_bytes()


def _layer(name: str) -> str:
    """The decoder layer a node of the exported graph belongs to ("layers.6"), or "input" for the soft
    clamp in front of them."""
    import re

    found = re.search(r"layers\.(\d+)/", name)
    return f"layers.{found.group(1)}" if found else "input"


def int8_sensitivity(calibrations: Calibrations, float_variant: Variant, network: Network,
                     photo_set: list[Photo]) -> list[dict[str, Any]]:
    """Each decoder layer quantized alone (int8-qdq's recipe, every other node in float32): the noise it
    adds to float32's pixels (PSNR of the int8 output against float32's, over all photos) and the PSNR
    it costs against the photos, beside the layer's share of the network's convolution MACs. The Resize
    layers are left out: ``quantize_static`` quantizes a Resize only when its input already is."""
    import onnx

    graph = onnx.load_from_string(calibrations.prepared.read_bytes()).graph
    shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    quantizable = [node for node in graph.node if node.op_type in ("Conv", "Add", "Resize", "Mul")]
    macs: dict[str, float] = {}
    resizes = 0
    for node in graph.node:
        resizes += node.op_type == "Resize"
        if node.op_type == "Conv":
            macs[_layer(node.name)] = macs.get(_layer(node.name), 0.0) + 4.0**resizes * np.prod(shapes[node.input[1]])
    references = [to_pixels(network, float_variant(p.latent, p.step), None, p.step) for p in photo_set]
    rows = []
    for layer in dict.fromkeys(_layer(node.name) for node in quantizable):
        if layer != "input" and layer not in macs:
            continue  # a Resize alone stays float: it is quantized only when its input is
        mine = [node.name for node in quantizable if _layer(node.name) == layer]
        variant = Variant(layer, network, calibrations.quantized(
            Int8(), exclude=[node.name for node in quantizable if node.name not in mine]))
        noise, d_psnr = [], []
        for photo, reference in zip(photo_set, references, strict=True):
            pixels = to_pixels(network, variant(photo.latent, photo.step), None, photo.step)
            noise.append(np.mean((pixels.astype(np.float64) - reference) ** 2))
            d_psnr.append(psnr(photo.rgb, pixels) - psnr(photo.rgb, reference))
        rows.append({"network": network.name, "layer": layer, "nodes": len(mine),
                     "mac_share": macs.get(layer, 0.0) / sum(macs.values()),
                     "noise_psnr": float(10 * np.log10(255.0**2 / max(np.mean(noise), 1e-12))),
                     "d_psnr": float(np.mean(d_psnr)), "worst_d_psnr": float(min(d_psnr))})
        print(f"{network.name}: sensitivity {layer}: {rows[-1]['noise_psnr']:.1f} dB", file=sys.stderr)
    return rows


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
        self.inputs = [value.name for value in self.session.get_inputs()]  # the codec's graphs name theirs apart
        self.dtype = np.float16 if name == "float16" else np.float32

    def __call__(self, latent: np.ndarray, step: float) -> np.ndarray:
        feeds = self.network.feeds(latent, step, self.dtype).values()
        output = self.session.run(None, dict(zip(self.inputs, feeds, strict=True)))[0]
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
        yield Photo(path.stem, rgb, *codec_latent(rgb, network.save_options, cleaned=not network.is_restorer))


def codec_latent(rgb: np.ndarray, save_options: dict[str, Any], cleaned: bool = True) -> tuple[np.ndarray, float]:
    """The photo saved as ``.sdl``: its latent as read back (``cleaned``: restored, as the decoder gets it) and
    its quantization step."""
    data = pipeline.encode_image(Image.fromarray(rgb), save_options)
    fp = io.BytesIO(data)
    layout = container.read_layout(fp)
    latent = read.latent_from_layout(fp, layout)
    if cleaned:
        options = DecodeOptions()
        latent = pipeline.clean_latent(latent, layout, pipeline.decoder_for(layout, options), options)
    return latent, max(read.file_quantizer(layout.header).steps)


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
    parser.add_argument("--recipes", default=None, help="only these int8 variants (comma-separated; default all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--sensitivity", type=int, default=0, metavar="N",
                        help="also quantize each taesd decoder layer alone, scored on N training photos outside "
                             "the held-out split")
    args = parser.parse_args()
    os.environ.setdefault(models.MODELS_ENV, str(REPO.parent / "shared" / "models" / "taesd"))
    kodak = sorted(KODAK.glob("*.png"))
    kodak = kodak[:: max(1, len(kodak) // args.kodak)][: args.kodak]
    sets = {"held-out": held_out_paths(args.held_out), "kodak": kodak}
    stlpips = STLPIPS()
    rows: list[dict[str, Any]] = []
    option_rows: list[dict[str, Any]] = []
    sensitivity_rows: list[dict[str, Any]] = []
    wanted = args.networks.split(",")
    recipes = None if args.recipes is None else args.recipes.split(",")
    candidates = networks()
    taesd = candidates[0]
    float_decoder = Variant("float32", taesd, export(taesd, torch.float32)) if "restorer" in wanted else None
    for network in [n for n in candidates if n.name in wanted]:
        print(f"{network.name}: encoding photos", file=sys.stderr)
        graph = export(network, torch.float32)
        variants = [Variant("float32", network, graph), Variant("float16", network, export(network, torch.float16))]
        with tempfile.TemporaryDirectory() as folder:
            calibrations = Calibrations(network, graph, Path(folder))
            for name, recipe in (TAESD_INT8 if network.name == "taesd" else BASE_INT8).items():
                if recipes is None or name in recipes:
                    print(f"{network.name}: quantizing {name}", file=sys.stderr)
                    variants.append(Variant(name, network, calibrations.quantized(recipe)))
            if network.name in models.int8_ranges() and (recipes is None or "int8-codec" in recipes):
                variants.append(Variant("int8-codec", network, codec_int8_graph(network.name)))
            if network.name == "taesd" and args.sensitivity:
                chosen = list(photos(network, calibration_paths(args.sensitivity)))
                sensitivity_rows = int8_sensitivity(calibrations, variants[0], network, chosen)
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
        write(args, rows, option_rows, sensitivity_rows)  # after each network: a long run keeps what it measured


def qualifies(rows: list[dict[str, Any]], network: str, variant: str) -> bool:
    """The adoption rule: faster, and within the PSNR and ST-LPIPS tolerances on every photo set."""
    mine = [r for r in rows if r["network"] == network and r["variant"] == variant]
    return all(r["speedup"] > 1 and r["d_psnr"] >= -PSNR_TOLERANCE_DB and r["d_stlpips"] <= STLPIPS_TOLERANCE
               for r in mine)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], option_rows: list[dict[str, Any]],
          sensitivity_rows: list[dict[str, Any]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in (("variants.csv", rows), ("session_options.csv", option_rows),
                        ("int8_sensitivity.csv", sensitivity_rows)):
        if table:
            with open(args.out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
    command = ("PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/decoder_variants.py "
               f"--held-out {args.held_out} --kodak {args.kodak} --repeats {args.repeats} --networks {args.networks}"
               + (f" --recipes {args.recipes}" if args.recipes else "")
               + (f" --sensitivity {args.sensitivity}" if args.sensitivity else ""))
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
        "Variants (int8: `onnxruntime.quantization.quantize_static`, uint8 activations with one range per "
        "tensor, int8 weights with one scale per output channel, calibrated on the latents of training "
        "photos outside the held-out split, centre-cropped to 384x256; never Kodak):", "",
        *[f"- `{name}`: {text}" for name, text in DESCRIPTIONS.items() if any(r["variant"] == name for r in rows)],
        "",
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
    for network in dict.fromkeys(r["network"] for r in rows):
        passed = {r["variant"]: r["ms"] for r in rows
                  if r["network"] == network and r["variant"] != "float32" and qualifies(rows, network, r["variant"])}
        best = min(passed, key=passed.__getitem__) if passed else None
        lines += ["", f"Fastest qualifying variant of `{network}`: " + (f"`{best}`." if best else "none.")]
    if sensitivity_rows:
        lines += ["", "## int8 sensitivity per layer (taesd decoder)", "",
                  f"Each layer quantized alone as in `int8-qdq` (every other node in float32), on "
                  f"{args.sensitivity} training photos outside the held-out split (768x512, the codec's "
                  "default quality): `noise PSNR` is the int8 output against float32's output (higher is "
                  "less noise), `dPSNR` the change against the photos, `MACs` the layer's share of the "
                  "network's convolution work. `input` is the soft clamp's Mul, whose output (the latent "
                  "fed to the first Conv) is rounded to uint8.", "",
                  "| layer | nodes | MACs | noise PSNR dB | dPSNR dB | worst dPSNR |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['layer']} | {r['nodes']} | {100 * r['mac_share']:.1f}% | {r['noise_psnr']:.1f} | "
                  f"{r['d_psnr']:+.3f} | {r['worst_d_psnr']:+.3f} |" for r in sensitivity_rows]
    if option_rows:
        lines += ["", "## float32 session options (taesd decoder, 768x512)", "",
                  "| setting | ms | vs the codec's | load1 |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['setting']} | {r['ms']:.0f} | {r['vs_codec']:.2f} | {r['load1']:.1f} |" for r in option_rows]
    (args.out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
