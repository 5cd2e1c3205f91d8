"""SD-UNet latent denoising: loading, noise-level mapping and determinism, on a tiny random SD 1.x.

The real SD 1.5 weights cannot be fetched here; a randomly initialised model with SD's folder layout
(unet/, text_encoder/, tokenizer/, scheduler/, all safetensors) exercises the same code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pillow_sdlatent.enhance import unet
from pillow_sdlatent.models import UnsafeWeightsError, WeightsNotFoundError

#: SD 1.x's scheduler configuration (stable-diffusion-v1-5, scheduler/scheduler_config.json)
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                "steps_offset": 1}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised SD 1.x lookalike saved the way the hub stores one."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    ).save_pretrained(folder / "unet", safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "a</w>": 4, "b</w>": 5, "ab</w>": 6}
    (tokenizer / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    PNDMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".ckpt", ".pth")]
    return folder


@pytest.fixture(scope="module")
def latent() -> np.ndarray:
    """A dequantized latent: coarse multiples of the step, odd size (not a multiple of the UNet's 2)."""
    rng = np.random.default_rng(0)
    return (np.rint(rng.normal(0, 1, (4, 9, 12)) / 0.8) * 0.8).astype(np.float32)


def test_denoise_shape_finite_deterministic(tiny_sd: Path, latent: np.ndarray) -> None:
    out = unet.denoise_latent(latent, 0.5, model=tiny_sd, device="cpu")
    assert out.shape == latent.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.array_equal(out, latent)
    again = unet.denoise_latent(latent, 0.5, model=tiny_sd, device="cpu")
    np.testing.assert_array_equal(out, again)
    noisy = [unet.denoise_latent(latent, 0.5, model=tiny_sd, device="cpu", seed=s, added_noise=0.5)
             for s in (1, 1, 2)]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.array_equal(noisy[0], noisy[2])


def test_components_load_once(tiny_sd: Path) -> None:
    first = unet.load_components(tiny_sd, "cpu")
    assert unet.load_components(str(tiny_sd), "cpu") is first
    assert first.empty_prompt.shape == (1, 8, 16)


def test_found_through_models_env(tiny_sd: Path, latent: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PILLOW_SDLATENT_MODELS", str(tiny_sd.parent))
    via_env = unet.denoise_latent(latent, 0.5, model="someone/tiny-sd", device="cpu")
    np.testing.assert_array_equal(via_env, unet.denoise_latent(latent, 0.5, model=tiny_sd, device="cpu"))


def test_noise_level_mapping() -> None:
    """Fine steps start near t = 0, coarse ones later; sigma_t tracks step/sqrt(12); clamped."""
    scheduler = unet.make_scheduler(SD_SCHEDULER)
    starts = [unet.start_timestep(scheduler, s, 66) for s in (0.05, 0.15, 0.5, 1.0, 2.0, 50.0)]
    assert starts[0] == starts[1] == 1
    assert starts == sorted(starts) and 1 < starts[2] < starts[3] < starts[4]
    assert starts[-1] <= unet.MAX_STRENGTH * 1000
    abar = float(scheduler.alphas_cumprod[starts[3]])
    sigma = ((1 - abar) / abar) ** 0.5
    assert 0.7 < sigma / unet.quantization_sigma(1.0) < 1.4
    assert unet.start_timestep(scheduler, 1.0, 66, strength=0.04) == 31  # the 2022 setting
    assert unet.plms_timesteps(scheduler, 31) == [31, 16, 16, 1]
    assert unet.plms_timesteps(scheduler, 1) == [1]


def test_refuses_pickles_and_names_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnsafeWeightsError):
        unet.denoise_latent(np.zeros((4, 8, 8), np.float32), 0.5, model=tmp_path / "sd.ckpt")
    monkeypatch.setenv("PILLOW_SDLATENT_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="PILLOW_SDLATENT_MODELS") as info:
        unet.denoise_latent(np.zeros((4, 8, 8), np.float32), 0.5, model="nobody/no-such-sd", device="cpu")
    assert "no-such-sd" in str(info.value) and "cache" in str(info.value)


def test_decode_option_runs_the_unet_before_the_decoder(tiny_sd: Path, photo) -> None:
    """`denoise=` on decode goes through the UNet path end to end (random tiny SD parts)."""
    import io

    from pillow_sdlatent import pipeline

    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", quality=30)
    plain = np.asarray(pipeline.decode_file(buffer.getvalue(), restore=False))
    first = np.asarray(pipeline.decode_file(buffer.getvalue(), denoise=str(tiny_sd), seed=3))
    again = np.asarray(pipeline.decode_file(buffer.getvalue(), denoise=str(tiny_sd), seed=3))
    assert first.shape == plain.shape and np.array_equal(first, again)
    assert not np.array_equal(first, plain)
