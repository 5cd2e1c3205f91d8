"""The int8 taesd decoder: its graph, its quality against float32, and when ``precision="auto"`` takes it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pillow_sdlatent import models, pipeline
from pillow_sdlatent.models import onnx_graphs, ort_engine
from pillow_sdlatent.options import DecodeOptions
from tests.conftest import KODAK, psnr

PHOTO = KODAK / "kodim23.png"  # the sdist has no examples/: the shared photos are there for every test


@pytest.fixture(scope="module")
def crop() -> Image.Image:
    """384x256 of a real photo: the size the ranges were fitted at, quick to decode."""
    with Image.open(PHOTO) as image:
        return image.convert("RGB").crop((192, 128, 576, 384))


@pytest.fixture(scope="module")
def sdl(crop: Image.Image) -> bytes:
    buffer = io.BytesIO()
    crop.save(buffer, format="SDL", model="taesd")
    return buffer.getvalue()


def taesd() -> models.LatentModel:
    return models.load_model("taesd", device="cpu", runtime="onnxruntime")


def test_ranges_cover_the_graph_for_the_shipped_weights() -> None:
    fitted = models.int8_ranges()["taesd"]
    _, taps = onnx_graphs.taesd_decoder_taps(taesd()._state)
    assert set(fitted["ranges"]) == set(taps) and len(taps) == 47
    assert fitted["decoder_digest"] == taesd().decoder_digest.hex()
    assert all(low <= high for low, high in fitted["ranges"].values())


@pytest.mark.parametrize("scale", [0.625, 0.75])
def test_restoring_decoders_have_ranges_of_their_own(crop: Image.Image, scale: float) -> None:
    """taesd's restoring decoders decode in int8 too, each with ranges fitted for its own weights, within
    0.15 dB of their float32 decode (measured on held-out photos: -0.014 dB on average, worst -0.112)."""
    from pillow_sdlatent.enhance import restore

    tuned = restore.restoring_decoder(taesd(), 0.4, scale)
    fitted = models.int8_ranges()[restore.decoder_file("taesd", scale)]
    assert tuned is not taesd() and fitted["decoder_digest"] == tuned.decoder_digest.hex()
    from pillow_sdlatent.core.read import read_latent

    data = io.BytesIO()
    crop.save(data, format="SDL", quality=45, scale=scale)
    latent = read_latent(data.getvalue())
    int8, float32 = (tuned.decoding_in(precision).decode_image(latent) for precision in ("int8", "float32"))
    reference = crop.resize(int8.shape[1::-1], Image.Resampling.LANCZOS)  # (H, W, 3) at the coded size
    assert psnr(int8, reference) > psnr(float32, reference) - 0.15


def test_int8_graph_runs_without_the_onnx_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setitem(sys.modules, "onnx", None)  # any import of onnx now fails
    graph = onnx_graphs.taesd_decoder_int8(taesd()._state, models.int8_ranges()["taesd"]["ranges"])
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    latent = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    assert session.run(None, {"input": latent})[0].shape == (2, 3, 64, 96)


def test_int8_graph_needs_every_range() -> None:
    ranges = dict(models.int8_ranges()["taesd"]["ranges"])
    del ranges["decoder.layers.5"]
    with pytest.raises(ValueError, match=r"decoder\.layers\.5\b"):
        onnx_graphs.taesd_decoder_int8(taesd()._state, ranges)


def test_weight_quantization_is_symmetric_per_channel() -> None:
    weight = np.array([[127, -254, 0, 0], [127, 1.5, 0.5, -2.5], [0, 0, 0, 0]], np.float32).reshape(3, 1, 1, 4)
    quantized, scale = onnx_graphs.weight_quantization(weight)
    assert quantized.dtype == np.int8 and scale.dtype == np.float32
    assert scale.tolist() == [2, 1, 1]
    assert quantized[:, 0, 0].tolist() == [[64, -127, 0, 0], [127, 2, 0, -2], [0, 0, 0, 0]]  # halves to even
    assert onnx_graphs.activation_quantization(0.0, 2.55) == (pytest.approx(0.01), 0)
    assert onnx_graphs.activation_quantization(-1.0, 0.275)[1] == 200


def test_int8_decode_is_close_to_float32(crop: Image.Image, sdl: bytes) -> None:
    float32 = pipeline.decode_file(sdl, precision="float32")
    int8 = pipeline.decode_file(sdl, precision="int8")
    assert int8.size == float32.size == crop.size
    assert not np.array_equal(np.asarray(int8), np.asarray(float32))
    assert abs(psnr(crop, int8) - psnr(crop, float32)) < 0.15


def test_precision_option_is_checked(sdl: bytes) -> None:
    for bad in ("fp16", "INT8", 8, None):
        with pytest.raises(ValueError, match="precision"):
            DecodeOptions(precision=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        pipeline.decode_file(sdl, precision="bfloat16")
    with pytest.raises(ValueError, match="precision"):
        taesd().decoding_in("half")


def test_auto_takes_int8_only_where_the_cpu_computes_it_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    model = taesd()
    monkeypatch.setattr(ort_engine, "int8_exact", lambda: False)
    assert model.decoding_in("auto") is model and model.decoding_in().precision == "float32"
    assert model.decoding_in("int8").precision == "int8"  # asked for: taken anyway
    monkeypatch.setattr(ort_engine, "int8_exact", lambda: True)
    twin = model.decoding_in("auto")
    assert twin.precision == "int8" and twin is model.decoding_in("int8")  # built once
    assert twin.decoding_in("float32") is model and model.decoding_in("float32") is model
    assert twin.decoder_digest == model.decoder_digest and twin.spec is model.spec


def test_default_decodes_files_in_int8_only_where_exact(monkeypatch: pytest.MonkeyPatch, sdl: bytes) -> None:
    monkeypatch.setattr(ort_engine, "int8_exact", lambda: True)
    auto = np.asarray(pipeline.decode_file(sdl, precision="auto"))
    assert np.array_equal(auto, np.asarray(pipeline.decode_file(sdl, precision="int8")))
    assert np.array_equal(np.asarray(pipeline.decode_file(sdl)), auto)  # the default
    float32 = np.asarray(pipeline.decode_file(sdl, precision="float32"))
    assert not np.array_equal(auto, float32)
    monkeypatch.setattr(ort_engine, "int8_exact", lambda: False)
    assert np.array_equal(np.asarray(pipeline.decode_file(sdl, precision="auto")), float32)
    assert np.array_equal(np.asarray(pipeline.decode_file(sdl)), float32)  # no exact int8 here: float32


def test_ranges_for_other_weights_mean_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    fitted = models.int8_ranges()
    monkeypatch.setattr(models, "int8_ranges", lambda: {"taesd": {**fitted["taesd"], "decoder_digest": "00" * 32}})
    monkeypatch.setattr(ort_engine, "int8_exact", lambda: True)
    model = taesd()
    assert model.decoding_in("auto") is model
    with pytest.raises(ValueError, match="other decoder weights"):
        model.decoding_in("int8")


def test_no_int8_without_ranges_or_onnxruntime() -> None:
    taesd3 = models.load_model("taesd3", device="cpu", runtime="onnxruntime")
    assert taesd3.decoding_in("auto") is taesd3
    with pytest.raises(ValueError, match="no int8 ranges"):
        taesd3.decoding_in("int8")
    on_torch = models.load_model("taesd", device="cpu", runtime="torch")
    assert on_torch.decoding_in("auto") is on_torch
    with pytest.raises(ValueError, match="ONNX Runtime"):
        on_torch.decoding_in("int8")


def test_clear_cache_drops_the_int8_decoder() -> None:
    twin = taesd().decoding_in("int8")
    models.clear_cache()
    assert taesd().decoding_in("int8") is not twin


def test_int8_exact_reads_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_engine, "int8_exact", ort_engine.int8_exact.__wrapped__)
    monkeypatch.setattr(ort_engine.platform, "machine", lambda: "aarch64")
    assert ort_engine.int8_exact()
    monkeypatch.setattr(ort_engine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ort_engine.sys, "platform", "win32")
    assert not ort_engine.int8_exact()  # no /proc/cpuinfo: unknown
    monkeypatch.setattr(ort_engine.sys, "platform", "linux")
    with open("/proc/cpuinfo") as cpuinfo:
        has_vnni = any(flag in line.split() for line in cpuinfo if line.startswith("flags")
                       for flag in ort_engine.VNNI_FLAGS)
    assert ort_engine.int8_exact() == has_vnni


def test_cli_decodes_in_the_precision_asked(tmp_path: Path, sdl: bytes) -> None:
    from pillow_sdlatent.cli import main

    source, target = tmp_path / "in.sdl", tmp_path / "out.png"
    source.write_bytes(sdl)
    for precision in ("int8", "float32"):
        assert main(["decode", str(source), "--precision", precision, "-o", str(target)]) == 0
        with Image.open(target) as decoded:
            assert np.array_equal(np.asarray(decoded), np.asarray(pipeline.decode_file(sdl, precision=precision)))
