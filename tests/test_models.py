"""Model registry and weight lookup: sd-vae through diffusers, cross-decoding, clear errors."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillow_sdlatent import models, pipeline
from pillow_sdlatent.core import read
from pillow_sdlatent.core.registry import REGISTRY
from pillow_sdlatent.models import WeightsNotFoundError, load_model
from tests.conftest import psnr


@pytest.fixture(scope="module")
def tiny_sd_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, randomly initialised AutoencoderKL with SD's 8x downsampling, saved as diffusers does.

    The real stabilityai/sd-vae-ft-mse is not reachable here; this exercises the same code path.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, scaling_factor=0.18215,
    )
    folder = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(folder, safe_serialization=True)
    assert not list(folder.glob("*.bin"))
    return folder


def test_sd_vae_from_pretrained_round_trip(photo: Image.Image, tiny_sd_vae: Path) -> None:
    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", model="sd-vae", weights=str(tiny_sd_vae))
    buffer.seek(0)
    with Image.open(buffer) as image:
        assert image.info["sdl"]["model"] == "sd-vae"
        image.decode_options = {"weights": str(tiny_sd_vae)}
        image.load()
        assert image.size == photo.size and image.mode == "RGB"
    model = load_model("sd-vae", weights=tiny_sd_vae)
    assert model.spec.family == "kl" and model.decoder_digest != load_model("taesd").decoder_digest


def test_taesd_file_decodes_with_sd_vae(photo: Image.Image, tiny_sd_vae: Path) -> None:
    """taesd and sd-vae share SD 1.x's latent space: either decoder reads the other's files."""
    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", model="taesd")
    decoded = pipeline.decode_file(buffer.getvalue(), model="sd-vae", weights=str(tiny_sd_vae))
    assert decoded.size == photo.size
    with pytest.raises(ValueError, match="latent space"):
        pipeline.decode_file(buffer.getvalue(), model="taesdxl")


@pytest.mark.parametrize("name", ["taesdxl", "taesd3", "taef1"])
def test_other_taesd_models(photo: Image.Image, name: str) -> None:
    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", model=name, scale=1)
    buffer.seek(0)
    with Image.open(buffer) as image:
        channels = REGISTRY[name].channels
        assert image.info["sdl"]["latent_shape"] == (channels, 16, 24)
        image.load()
        assert psnr(photo, image) > 22


def test_missing_weights_error_names_the_search_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PILLOW_SDLATENT_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_model("taesdxl", weights=tmp_path / "elsewhere")
    message = str(info.value)
    for expected in ("weights= argument", str(tmp_path), "PILLOW_SDLATENT_MODELS", "madebyollin/taesdxl",
                     "taesdxl_decoder.safetensors"):
        assert expected in message


def test_models_load_once_per_device() -> None:
    assert load_model("taesd") is load_model("taesd", device=models.resolve_device())  # on any machine


def test_decoder_digest_is_precision_independent() -> None:
    """fp32 hub weights and their bf16 re-saves give one digest (FORMAT.md)."""
    model = load_model("taesd")
    state = {k: v.float() for k, v in model.module.state_dict().items()}
    halved = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert models.decoder_digest(state, "tiny") == models.decoder_digest(halved, "tiny") == model.decoder_digest
    state["decoder.layers.0.weight"] = state["decoder.layers.0.weight"] * 1.01
    assert models.decoder_digest(state, "tiny") != model.decoder_digest


def test_encoding_is_deterministic(photo: Image.Image) -> None:
    first, second = io.BytesIO(), io.BytesIO()
    photo.save(first, format="SDL")
    photo.save(second, format="SDL")
    assert first.getvalue() == second.getvalue()
    latent = read.read_latent(first.getvalue())
    assert np.isfinite(latent).all()


def test_single_file_tiny_weights(tmp_path: Path, photo: Image.Image) -> None:
    """weights= may name one diffusers-layout .safetensors file; a wrong one is an error, not a fallback."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in load_model("taesd").module.state_dict().items()}
    good = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(state, str(good))
    assert load_model("taesd", weights=good).decoder_digest == load_model("taesd").decoder_digest
    bad = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(OSError, match="AutoencoderTiny layout"):
        load_model("taesd", weights=bad)


def test_onnxruntime_and_torch_runtimes_agree(photo: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU default (ONNX Runtime) runs the same network as torch: same latent, pixels within one level."""
    ort_model, torch_model = load_model("taesd"), load_model("taesd", runtime="torch")
    assert (ort_model.runtime, torch_model.runtime) == ("onnxruntime", "torch")
    rgb = pipeline.padded_rgb(photo)
    latent = ort_model.encode_image(rgb)
    assert np.abs(latent - torch_model.encode_image(rgb)).max() < 1e-3
    by_ort, by_torch = ort_model.decode_image(latent), torch_model.decode_image(latent)
    assert np.abs(by_ort.astype(int) - by_torch).max() <= 1 and np.mean(by_ort != by_torch) < 1e-3
    # tiled images and batches of odd sizes go through the same dynamic-shape session
    odd = np.random.default_rng(0).standard_normal((2, 4, 9, 13)).astype(np.float32)
    assert [a.shape for a in ort_model.decode_images(list(odd))] == [(72, 104, 3)] * 2
    monkeypatch.setenv(models.RUNTIME_ENV, "torch")
    assert load_model("taesd") is torch_model


def test_runtime_choice_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    taesd, sd_vae = models.get_spec("taesd"), models.get_spec("sd-vae")
    assert models.resolve_runtime(taesd, "cpu") == "onnxruntime"
    assert models.resolve_runtime(taesd, "cuda") == "torch"  # ORT is the CPU path only
    assert models.resolve_runtime(sd_vae, "cpu", "onnxruntime") == "torch"  # the KL VAE is not exported
    with pytest.raises(ValueError, match="unknown runtime"):
        models.resolve_runtime(taesd, "cpu", "tensorrt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert models.resolve_runtime(taesd, "cpu") == "torch"
    with pytest.raises(ImportError, match="onnxruntime"):
        models.resolve_runtime(taesd, "cpu", "onnxruntime")


@pytest.mark.gpu
def test_files_cross_between_gpu_and_cpu(photo: Image.Image) -> None:
    """A file encoded on the GPU (float16) decodes on the CPU and the reverse; the two decoders agree
    within what float16 allows (FORMAT.md: the network's output is best effort)."""
    on_gpu, on_cpu = io.BytesIO(), io.BytesIO()
    photo.save(on_gpu, "SDL", device="cuda")
    photo.save(on_cpu, "SDL", device="cpu")
    for data in (on_gpu.getvalue(), on_cpu.getvalue()):
        cpu, gpu = pipeline.decode_file(data, device="cpu"), pipeline.decode_file(data, device="cuda")
        assert psnr(photo, cpu) > 22 and psnr(photo, gpu) > 22
        assert psnr(cpu, gpu) > 35
    refined = io.BytesIO()
    photo.save(refined, "SDL", device="cuda", quality=40, effort=1)  # effort through the restorer on CUDA
    assert psnr(photo, pipeline.decode_file(refined.getvalue(), device="cpu")) > 20
