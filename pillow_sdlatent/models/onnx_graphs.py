"""ONNX graphs of the package's networks, written straight from safetensors weights.

Why: ONNX Runtime needs only a serialized ``ModelProto``, so a small protobuf writer
and the networks' layer lists are enough to run TAESD and the restorer without
torch, diffusers or the ``onnx`` package (each a large install). The weights are
read with numpy here too, bfloat16 included (numpy has no such dtype).

Every graph takes and returns float32 NCHW tensors; batch, height and width are
dynamic, so one ONNX Runtime session serves every image and tile size. The TAESD
decoder also has an int8 form (``taesd_decoder_int8``): the float weights quantized
when the graph is written, and activation ranges fitted by ``training/fit_int8_ranges.py``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path

import numpy as np

OPSET = 17
IR_VERSION = 8  # the highest opset-17 runtimes (onnxruntime >= 1.14) all read
FLOAT, UINT8, INT8, INT32, INT64 = 1, 2, 3, 6, 7  # TensorProto.DataType
_TENSOR_TYPES = {np.dtype("float32"): FLOAT, np.dtype("uint8"): UINT8, np.dtype("int8"): INT8,
                 np.dtype("int32"): INT32, np.dtype("int64"): INT64}
ATTR_FLOAT, ATTR_INT, ATTR_STRING, ATTR_INTS = 1, 2, 3, 7  # AttributeProto.AttributeType


# --- safetensors with numpy -------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_MAX_HEADER = 100 << 20


def read_safetensors(path: str | PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A .safetensors file's float tensors as float32 arrays, and its metadata.

    bfloat16 is widened exactly: its 16 bits are the top half of a float32.
    ``OSError`` for anything that is not a well-formed file of float tensors.
    """
    data = Path(path).read_bytes()
    try:
        (size,) = struct.unpack_from("<Q", data)
        if size > min(_MAX_HEADER, len(data) - 8):
            raise ValueError("header larger than the file")
        header = json.loads(data[8 : 8 + size])
        metadata = header.pop("__metadata__", None) or {}
        body = memoryview(data)[8 + size :]
        tensors = {}
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} is {entry['dtype']}, not a float type")
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
            if not 0 <= begin <= end <= len(body) or end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"tensor {name!r} has bad offsets")
            raw = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
            tensors[name] = (raw.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" \
                else raw.astype(np.float32)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise OSError(f"{path}: not a readable .safetensors file of float tensors ({exc})") from exc
    return tensors, dict(metadata)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the int16 bit patterns torch's ``.to(torch.bfloat16)`` gives (round to nearest even)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(values), 0x7FC0, rounded)
    return rounded.astype(np.uint16).view(np.int16)


# --- protobuf wire format ---------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s as ten-byte two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _attribute(name: str, value: int | float | str | Iterable[int]) -> bytes:
    """AttributeProto: name 1, f 2, i 3, s 4, ints 8, type 20."""
    if isinstance(value, float):
        return _bytes(1, name) + _float(2, value) + _int(20, ATTR_FLOAT)
    if isinstance(value, int):
        return _bytes(1, name) + _int(3, value) + _int(20, ATTR_INT)
    if isinstance(value, str):
        return _bytes(1, name) + _bytes(4, value) + _int(20, ATTR_STRING)
    return _bytes(1, name) + b"".join(_int(8, v) for v in value) + _int(20, ATTR_INTS)


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims 1, data_type 2, name 8, raw_data 9 (little-endian).

    float32, uint8, int8 and int32 arrays keep their type; other integers are written as int64, other floats
    as float32.
    """
    dtype = array.dtype if array.dtype in _TENSOR_TYPES else np.dtype("<i8" if array.dtype.kind in "iu" else "<f4")
    raw = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    return b"".join(_int(1, n) for n in array.shape) + _int(2, _TENSOR_TYPES[dtype]) + _bytes(8, name) + _bytes(9, raw)


def _value_info(name: str, dims: Iterable[int | str] | None) -> bytes:
    """ValueInfoProto(name 1, type 2) of a float tensor; str dims are named dynamic axes, None no shape."""
    tensor_type = _int(1, FLOAT)
    if dims is not None:
        tensor_type += _bytes(2, b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in dims))
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


class GraphBuilder:
    """Nodes and initializers of one graph, serialized as they are added."""

    def __init__(self) -> None:
        self._nodes: list[bytes] = []
        self._initializers: list[bytes] = []
        self._count = 0
        #: intermediate tensors the model also returns (after its main output), unshaped
        self.extra_outputs: list[str] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self._initializers.append(_tensor(name, array))
        return name

    def node(self, op: str, inputs: Iterable[str], **attributes: int | float | str | Iterable[int]) -> str:
        """NodeProto(input 1, output 2, name 3, op_type 4, attribute 5); returns its one output."""
        self._count += 1
        output = f"{op.lower()}_{self._count}"
        self._nodes.append(b"".join(_bytes(1, i) for i in inputs) + _bytes(2, output) + _bytes(3, output)
                           + _bytes(4, op) + b"".join(_bytes(5, _attribute(k, v)) for k, v in attributes.items()))
        return output

    def model(self, inputs: Mapping[str, Iterable[int | str]], output: str,
              output_dims: Iterable[int | str]) -> bytes:
        """ModelProto bytes (ir_version 1, producer_name 2, graph 7, opset_import 8)."""
        final = self.node("Identity", [output])
        graph = (b"".join(_bytes(1, n) for n in self._nodes) + _bytes(2, "main")
                 + b"".join(_bytes(5, t) for t in self._initializers)
                 + b"".join(_bytes(11, _value_info(name, dims)) for name, dims in inputs.items())
                 + _bytes(12, _value_info(final, output_dims))
                 + b"".join(_bytes(12, _value_info(name, None)) for name in self.extra_outputs))
        return (_int(1, IR_VERSION) + _bytes(2, "pillow_sdlatent") + _bytes(7, graph)
                + _bytes(8, _bytes(1, "") + _int(2, OPSET)))

    def conv(self, x: str, weights: Mapping[str, np.ndarray], prefix: str, stride: int = 1) -> str:
        """``torch.nn.Conv2d`` with 'same' padding for odd kernels; a bias when the weights hold one."""
        weight = weights[f"{prefix}.weight"]
        inputs = [x, self.constant(f"{prefix}.weight", weight)]
        if f"{prefix}.bias" in weights:
            inputs.append(self.constant(f"{prefix}.bias", weights[f"{prefix}.bias"]))
        pad = weight.shape[-1] // 2
        return self.node("Conv", inputs, kernel_shape=weight.shape[2:], pads=[pad] * 4, strides=[stride, stride])

    def scalar(self, value: float) -> str:
        return self.constant(f"scalar_{len(self._initializers)}", np.array(value, np.float32))

    def tap(self, name: str, x: str) -> str:
        """An activation an int8 graph rounds to uint8 (``name``: the torch module that makes it); kept as is."""
        return x


# --- TAESD ------------------------------------------------------------------------------------

#: diffusers' AutoencoderTiny (and taesd.py) layer by layer; index = position in ``layers``
ENCODER_LAYERS = ("conv", "block", "down", "block", "block", "block", "down", "block", "block", "block",
                  "down", "block", "block", "block", "conv")
DECODER_LAYERS = ("conv", "relu", "block", "block", "block", "up", "conv", "block", "block", "block", "up", "conv",
                  "block", "block", "block", "up", "conv", "block", "conv")


def _dims(channels: int, prefix: str = "") -> tuple[int | str, ...]:
    """NCHW with a fixed channel count: batch shared by input and output, sides named per tensor."""
    return ("batch", channels, f"{prefix}height", f"{prefix}width")


def taesd_keys(part: str, weights: Mapping[str, np.ndarray]) -> set[str]:
    """The parameter names (diffusers layout) one TAESD half must have; skips follow the weights."""
    layers = ENCODER_LAYERS if part == "encoder" else DECODER_LAYERS
    keys: set[str] = set()
    for index, kind in enumerate(layers):
        prefix = f"{part}.layers.{index}"
        if kind == "block":
            keys |= {f"{prefix}.conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
            if f"{prefix}.skip.weight" in weights:
                keys.add(f"{prefix}.skip.weight")
        elif kind in ("conv", "down"):
            keys.add(f"{prefix}.weight")
            if kind == "conv" and not (part == "decoder" and index > 0 and layers[index - 1] == "up"):
                keys.add(f"{prefix}.bias")
    return keys


def _taesd_layers(graph: GraphBuilder, x: str, part: str, weights: Mapping[str, np.ndarray]) -> str:
    """The layers; every activation a later Conv, Add or Resize reads is tapped (``GraphBuilder.tap``), except a
    Conv's output that a Relu layer reads (the Relu's is) and the last layer's."""
    layers = ENCODER_LAYERS if part == "encoder" else DECODER_LAYERS
    for index, kind in enumerate(layers):
        prefix = f"{part}.layers.{index}"
        if kind in ("conv", "down"):
            x = graph.conv(x, weights, prefix, stride=2 if kind == "down" else 1)
        elif kind == "relu":
            x = graph.node("Relu", [x])
        elif kind == "up":
            scales = graph.constant(f"{prefix}.scales", np.array([1, 1, 2, 2], np.float32))
            x = graph.node("Resize", [x, "", scales], mode="nearest", nearest_mode="floor",
                           coordinate_transformation_mode="asymmetric")
        else:  # conv-relu-conv-relu-conv plus a skip (1x1 conv or identity), then relu
            y = graph.tap(f"{prefix}.conv.1", graph.node("Relu", [graph.conv(x, weights, f"{prefix}.conv.0")]))
            y = graph.tap(f"{prefix}.conv.3", graph.node("Relu", [graph.conv(y, weights, f"{prefix}.conv.2")]))
            y = graph.tap(f"{prefix}.conv.4", graph.conv(y, weights, f"{prefix}.conv.4"))
            skip = graph.conv(x, weights, f"{prefix}.skip") if f"{prefix}.skip.weight" in weights else x
            x = graph.node("Relu", [graph.node("Add", [y, skip])])
        if index + 1 < len(layers) and layers[index + 1] != "relu":
            x = graph.tap(prefix, x)
    return x


def taesd_encoder(weights: Mapping[str, np.ndarray]) -> bytes:
    """AutoencoderTiny.encode(x).latents: pixels in [-1, 1] -> latents."""
    graph = GraphBuilder()
    x = graph.node("Mul", [graph.node("Add", ["input", graph.scalar(1.0)]), graph.scalar(0.5)])  # to [0, 1]
    x = _taesd_layers(graph, x, "encoder", weights)
    return graph.model({"input": _dims(3)}, x, _dims(weights["encoder.layers.14.weight"].shape[0], "out_"))


def taesd_decoder(weights: Mapping[str, np.ndarray], graph: GraphBuilder | None = None) -> bytes:
    """AutoencoderTiny.decode(z).sample: latents -> pixels in about [-1, 1] (not clamped).

    ``graph``: a builder whose ``tap`` and ``conv`` make another form (``taesd_decoder_taps``,
    ``taesd_decoder_int8``); the input's soft clamp and the output's scaling stay float32 in all.
    """
    graph = graph or GraphBuilder()
    x = graph.node("Div", ["input", graph.scalar(3.0)])
    x = graph.node("Mul", [graph.node("Tanh", [x]), graph.scalar(3.0)])  # taesd's soft clamp to (-3, 3)
    x = _taesd_layers(graph, x, "decoder", weights)
    x = graph.node("Sub", [graph.node("Mul", [x, graph.scalar(2.0)]), graph.scalar(1.0)])
    return graph.model({"input": _dims(weights["decoder.layers.0.weight"].shape[1])}, x, _dims(3, "out_"))


# --- the int8 TAESD decoder -------------------------------------------------------------------

#: layers the int8 decoder keeps in float32: the last Conv (64 -> 3 channels) writes the pixels, and rounding
#: its weights or output costs the most PSNR for the least time (the first Conv stays float32 too: it reads
#: the latent, which is never tapped)
INT8_FLOAT_LAYERS = frozenset({"decoder.layers.18"})
#: the int8 decoder rounds no activation of a layer before this one: the 1/8-resolution stage (layers 0-5)
#: and the Conv after its upsampling run in float32. They are 1.5% of the work; rounded, they cost flat
#: colours about twice the PSNR (a constant rounding error there becomes a colour shift of the whole
#: area) and small text some legibility (docs/speed/README.md)
INT8_FIRST_ROUNDED_LAYER = 6
Ranges = Mapping[str, Sequence[float]]  # (min, max) per tapped activation


class _Taps(GraphBuilder):
    """The float32 graph that also returns each tapped activation, for fitting their ranges."""

    def __init__(self) -> None:
        super().__init__()
        self.taps: dict[str, str] = {}

    def tap(self, name: str, x: str) -> str:
        self.taps[name] = x
        self.extra_outputs.append(x)
        return x


def taesd_decoder_taps(weights: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The float32 decoder with every activation the int8 graph rounds as an extra output, and the output
    name of each (keyed by the torch module that makes it, the keys of ``taesd_decoder_int8``'s ranges)."""
    graph = _Taps()
    return taesd_decoder(weights, graph), graph.taps


def activation_quantization(low: float, high: float) -> tuple[float, int]:
    """uint8 scale and zero point of an activation range, as ``onnxruntime.quantization`` computes them
    (the range widened to hold 0, so that 0 is exact)."""
    rmin, rmax = np.float32(min(low, 0.0)), np.float32(max(high, 0.0))
    scale = np.float32((np.float64(rmax) - np.float64(rmin)) / 255)
    if scale == 0:
        return 1.0, 0
    return float(scale), int(np.clip(np.rint(-rmin / scale), 0, 255))


def weight_quantization(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and their float32 scale per output channel: symmetric, max|w| -> 127 (as ORT's
    per-channel QInt8; not -128, so that the sum of two products fits VPMADDUBSW's int16)."""
    peak = np.abs(weight).reshape(len(weight), -1).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(127), 1).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale.reshape(-1, *[1] * (weight.ndim - 1))), -127, 127)
    return quantized.astype(np.int8), scale


class _Int8(GraphBuilder):
    """The QDQ form: each tapped activation rounded to uint8 (QuantizeLinear -> DequantizeLinear), each Conv
    that reads one on int8 weights and int32 bias; ONNX Runtime fuses these into QLinearConv and QLinearAdd."""

    def __init__(self, ranges: Ranges) -> None:
        super().__init__()
        self._ranges = ranges
        self._scales: dict[str, float] = {}  # a DequantizeLinear output -> its scale

    def tap(self, name: str, x: str) -> str:
        if name not in self._ranges:
            raise ValueError(f"no int8 range for {name!r}")
        if _layer_index(name) < INT8_FIRST_ROUNDED_LAYER:
            return x  # unrounded, so the Convs that read it stay float32
        scale, zero_point = activation_quantization(*self._ranges[name])
        parameters = [self.constant(f"{name}.scale", np.array(scale, np.float32)),
                      self.constant(f"{name}.zero_point", np.array(zero_point, np.uint8))]
        out = self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, *parameters]), *parameters])
        self._scales[out] = scale
        return out

    def conv(self, x: str, weights: Mapping[str, np.ndarray], prefix: str, stride: int = 1) -> str:
        if x not in self._scales or prefix in INT8_FLOAT_LAYERS:
            return super().conv(x, weights, prefix, stride)
        weight = weights[f"{prefix}.weight"]
        quantized, scale = weight_quantization(weight)
        inputs = [x, self._dequantized(f"{prefix}.weight", quantized, scale)]
        if f"{prefix}.bias" in weights:
            bias_scale = np.float32(self._scales[x]) * scale
            bias = np.rint(weights[f"{prefix}.bias"] / bias_scale).astype(np.int32)
            inputs.append(self._dequantized(f"{prefix}.bias", bias, bias_scale))
        pad = weight.shape[-1] // 2
        return self.node("Conv", inputs, kernel_shape=weight.shape[2:], pads=[pad] * 4, strides=[stride, stride])

    def _dequantized(self, name: str, values: np.ndarray, scale: np.ndarray) -> str:
        """DequantizeLinear per output channel (axis 0), zero point 0."""
        return self.node("DequantizeLinear", [self.constant(f"{name}.quantized", values),
                                              self.constant(f"{name}.scale", scale),
                                              self.constant(f"{name}.zero_point", np.zeros(len(values), values.dtype))],
                         axis=0)


def _layer_index(name: str) -> int:
    """The index of the decoder layer a tapped activation belongs to ("decoder.layers.12.conv.3" -> 12)."""
    return int(name.split(".")[2])


def taesd_decoder_int8(weights: Mapping[str, np.ndarray], ranges: Ranges) -> bytes:
    """``taesd_decoder`` in int8: weights quantized here, activations with ``ranges`` ((min, max) per
    tapped activation, from ``training/fit_int8_ranges.py``); the same input and output."""
    return taesd_decoder(weights, _Int8(ranges))


# --- the latent restorer ----------------------------------------------------------------------


def restorer(weights: Mapping[str, np.ndarray]) -> bytes:
    """``restore.RestorerNet.forward(latent, step)``: inputs ``latent`` (N, C, H, W) and ``step`` (N, 1, 1, 1), or
    (N, 1, H, W) for a step per position (``restore.restorer_steps``)."""
    graph = GraphBuilder()

    def res_block(x: str, prefix: str) -> str:
        y = graph.conv(graph.node("Relu", [graph.conv(x, weights, f"{prefix}.conv1")]), weights, f"{prefix}.conv2")
        return graph.node("Add", [x, y])

    shape = graph.node("Shape", ["latent"])
    plane_shape = graph.node("Add", [graph.node("Mul", [shape, graph.constant("keep", np.array([1, 0, 1, 1]))]),
                                     graph.constant("one_channel", np.array([0, 1, 0, 0]))])
    level = graph.node("Expand", [graph.node("Log", ["step"]), plane_shape])
    x = graph.node("Relu", [graph.conv(graph.node("Concat", ["latent", level], axis=1), weights, "head")])
    skip = res_block(x, "enc")
    y = graph.node("Relu", [graph.conv(graph.node("Relu", [skip]), weights, "down", stride=2)])
    index = 0
    while f"mid.{index}.conv1.weight" in weights:  # RestorerNet's ``depth``
        y = res_block(y, f"mid.{index}")
        index += 1
    y = graph.node("DepthToSpace", [graph.conv(y, weights, "up")], blocksize=2, mode="CRD")
    size = graph.node("Slice", [shape, graph.constant("from_h", np.array([2])), graph.constant("to_w", np.array([4]))])
    y = graph.node("Slice", [y, graph.constant("origin", np.array([0, 0])), size,
                             graph.constant("spatial", np.array([2, 3]))])
    x = res_block(graph.node("Relu", [graph.node("Add", [skip, y])]), "dec")
    correction = graph.node("Mul", ["step", graph.conv(graph.node("Relu", [x]), weights, "tail")])
    channels = weights["tail.weight"].shape[0]
    return graph.model({"latent": _dims(channels), "step": _dims(1, "step_")},
                       graph.node("Add", ["latent", correction]), _dims(channels))
