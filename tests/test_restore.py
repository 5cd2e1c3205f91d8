"""The shipped latent restorer: size, loading, determinism, and a real PSNR gain on held-out photos."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillow_sdlatent.core import container, quantize
from pillow_sdlatent.enhance import restore
from pillow_sdlatent.models import load_model
from tests.conftest import SHARED, psnr

#: held out from training (training/train_restorer.py keeps every 20th photo for validation)
HELD_OUT = ("McMaster/1.png", "Urban100/img_033.png")
COARSE_STEP = 1.0


def test_weights_ship_small_and_load() -> None:
    path = restore.WEIGHTS_DIR / restore.WEIGHTS["sd1"]
    assert path.is_file() and path.stat().st_size < 1_000_000
    assert sum(v.numel() for v in restore.load_net(path).parameters()) < 250_000
    assert restore.has_restorer("taesd") and restore.has_restorer("sd-vae")
    assert not restore.has_restorer("taesd3") and not restore.has_restorer("taef1")
    assert restore.has_restorer("taesd", 1.0) and not restore.has_restorer("taesd", 0.2)
    with pytest.raises(ValueError, match="unknown model"):
        restore.has_restorer("nonsense")


def test_weights_file_records_the_network_size(tmp_path: Path) -> None:
    """Training may try other sizes; the file says which, so loading needs no code change."""
    net = restore.RestorerNet(width=8, inner=16, depth=1)
    restore.save_weights(net, tmp_path / "small.safetensors")
    loaded = restore.load_net(tmp_path / "small.safetensors")
    assert loaded.config == {"channels": 4, "width": 8, "inner": 16, "depth": 1} and len(loaded.mid) == 1
    latent, step = torch.zeros(1, 4, 6, 6), torch.full((1, 1, 1, 1), 0.5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(latent, step), net(latent, step), atol=1e-2, rtol=1e-2)

    from safetensors.torch import save_file

    bad = {"arch": restore.ARCH_VERSION, "config": '{"width": 1e9}'}
    save_file({}, str(tmp_path / "bad.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match="bad restorer config"):
        restore.load_net(tmp_path / "bad.safetensors")


def test_shape_dtype_deterministic() -> None:
    rng = np.random.default_rng(0)
    latent = (np.rint(rng.normal(0, 0.7, (4, 13, 17)) / 0.5) * 0.5).astype(np.float32)
    out = restore.restore_latent(latent, 0.5, "taesd")
    assert out.shape == latent.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.array_equal(out, latent)
    assert np.abs(out - latent).max() < 2.0  # a correction, not a new latent
    with ThreadPoolExecutor(4) as pool:  # first use from several threads: one load, same answer
        for again in pool.map(lambda _: restore.restore_latent(latent, 0.5, "taesd"), range(4)):
            np.testing.assert_array_equal(out, again)


def test_bad_arguments() -> None:
    latent = np.zeros((4, 8, 8), np.float32)
    for step in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="step"):
            restore.restore_latent(latent, step, "taesd")
    with pytest.raises(ValueError, match="latent"):
        restore.restore_latent(np.zeros((16, 8, 8), np.float32), 0.5, "taesd")
    with pytest.raises(ValueError, match="no restorer"):
        restore.restore_latent(np.zeros((16, 8, 8), np.float32), 0.5, "taesd3")
    with pytest.raises(ValueError, match="step plane of shape"):
        restore.restore_latent(latent, np.full((8, 7), 0.5), "taesd")
    for plane in (np.zeros((8, 8)), np.full((8, 8), np.nan)):
        with pytest.raises(ValueError, match="step"):
            restore.restore_latent(latent, plane, "taesd")


def test_each_position_is_restored_at_its_own_step() -> None:
    """A plane of one value is that step; inside a region with a finer step (QREG) the restored latent is the
    one restored at that step, outside it the one at the base step, apart from a seam of a few cells."""
    rng = np.random.default_rng(2)
    latent = (np.rint(rng.normal(0, 0.7, (4, 40, 40)) / 0.5) * 0.5).astype(np.float32)
    at_base, at_half = (restore.restore_latent(latent, step, "taesd") for step in (1.0, 0.5))
    assert restore.restorer_steps(1.0, (), 40, 40) == 1.0
    np.testing.assert_allclose(restore.restore_latent(latent, np.full((40, 40), 1.0), "taesd"), at_base, atol=1e-6)
    steps = restore.restorer_steps(1.0, (container.Region(10, 10, 30, 30, 0.5),), 40, 40)
    assert steps.dtype == np.float32 and steps[20, 20] == 0.5 and steps[5, 5] == 1.0
    mixed = restore.restore_latent(latent, steps, "taesd")
    assert np.abs(mixed[:, 16:24, 16:24] - at_half[:, 16:24, 16:24]).max() < 0.02
    assert np.abs(mixed[:, :4, :4] - at_base[:, :4, :4]).max() < 0.02
    assert np.abs(at_half - at_base).max() > 0.2  # the two steps restore differently


@pytest.mark.parametrize("name", HELD_OUT)
def test_restored_decodes_closer_to_the_photo(name: str) -> None:
    """At a coarse step the restored latent decodes to a clearly higher PSNR (measured: +1.3, +1.5 dB)."""
    with Image.open(SHARED / "data" / "train" / name) as image:
        rgb = np.asarray(image.convert("RGB").crop((0, 0, 256, 256)))
    model = load_model("taesd")
    latent = model.encode(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1)[0].numpy()
    quantizer = quantize.UniformQuantizer.with_step(COARSE_STEP, 4)
    plain = quantizer.dequantize(quantizer.quantize(latent))
    restored = restore.restore_latent(plain, quantizer.steps[0], "taesd")

    def decoded(z: np.ndarray) -> np.ndarray:
        return ((model.decode(torch.from_numpy(z)[None])[0] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0).numpy()

    gain = psnr(rgb, decoded(restored)) - psnr(rgb, decoded(plain))
    assert gain > 0.8, f"restorer gained only {gain:.2f} dB on {name}"


def test_restorer_is_on_by_default_where_it_helps(photo) -> None:
    """At a coarse step the decode path restores the latent unless told not to."""
    import io

    from pillow_sdlatent import pipeline
    from tests.conftest import psnr

    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", quality=40, scale=1)  # step ~1.1, inside the restorer's helpful range
    restored = pipeline.decode_file(buffer.getvalue())
    plain = pipeline.decode_file(buffer.getvalue(), restore=False)
    gain = psnr(photo, restored) - psnr(photo, plain)
    print(f"\nrestorer at quality 40: {gain:+.2f} dB")
    assert gain > 0.3
    coarse = io.BytesIO()
    photo.save(coarse, format="SDL", quality=16, scale=1)  # step ~2.5: beyond the training range, still helped
    gain = psnr(photo, pipeline.decode_file(coarse.getvalue())) - psnr(
        photo, pipeline.decode_file(coarse.getvalue(), restore=False))
    print(f"restorer at quality 16: {gain:+.2f} dB")
    assert gain > 0.3
    fine = io.BytesIO()
    photo.save(fine, format="SDL", quality=90, model="taesd")  # step below the helpful range: restorer stays off
    plain = pipeline.decode_file(fine.getvalue(), restore=False)
    assert pipeline.decode_file(fine.getvalue()).tobytes() == plain.tobytes()


# The restoring decoder: taesd3's decoder fine-tuned on its quantized latents (training/train_decoder.py).


def _held_out_crop(name: str) -> Image.Image:
    with Image.open(SHARED / "data" / "train" / name) as image:
        return image.convert("RGB").crop((0, 0, 256, 256))


@pytest.mark.parametrize(("model_name", "scale", "trained_at"),
                         [("taesd3", 1.0, None), ("taesd3", 0.625, "0.625"), ("taesd3", 0.875, "0.75"),
                          ("taesd", 0.625, "0.625"), ("taesd", 1.0, "0.75")])
def test_restoring_decoder_ships_and_records_its_origin(model_name: str, scale: float, trained_at: str | None) -> None:
    """Float16 weights of the decoder's own shape, fine-tuned from the model's shipped decoder, with the scale
    whose decodes it was trained on scaled back up (none: at the coded size)."""
    from pillow_sdlatent.models import onnx_graphs

    path = restore.WEIGHTS_DIR / restore.decoder_file(model_name, scale)
    assert path.stat().st_size < 2_600_000
    tensors, meta = onnx_graphs.read_safetensors(path)
    model = load_model(model_name)
    assert meta["base_digest"] == model.decoder_digest.hex()
    assert set(tensors) == {key for key in model._state if key.startswith("decoder.")}
    assert meta.get("scale") == trained_at


@pytest.mark.parametrize("name", HELD_OUT)
def test_taesd3_files_decode_closer_to_the_photo(name: str) -> None:
    """A taesd3 file decodes with the restoring decoder unless told not to, and that one is closer to the photo
    (measured at quality 75, whole: +0.54, +0.58 dB); ``restore=False`` gives the original decoder's picture
    exactly."""
    import io

    from pillow_sdlatent import pipeline
    from pillow_sdlatent.core.read import read_latent

    crop = _held_out_crop(name)
    buffer = io.BytesIO()
    crop.save(buffer, format="SDL", model="taesd3", quality=75, scale=1)
    restored = pipeline.decode_file(buffer.getvalue())
    plain = pipeline.decode_file(buffer.getvalue(), restore=False)
    assert load_model("taesd3").decode_image(read_latent(buffer.getvalue())).tobytes() == plain.tobytes()
    gain = psnr(crop, restored) - psnr(crop, plain)
    print(f"\nrestoring decoder on {name}: {gain:+.2f} dB")
    assert gain > 0.4, f"restoring decoder gained only {gain:.2f} dB on {name}"


@pytest.mark.parametrize(("model_name", "quality", "coded", "least_gain"),
                         [("taesd3", 70, (301, 201), 0.3), ("taesd3", 87, (361, 241), 0.4),
                          ("taesd", 30, (301, 201), 0.3), ("taesd", 60, (421, 281), 0.3)])
def test_files_coded_smaller_decode_closer_to_the_photo(model_name: str, quality: int, coded: tuple[int, int],
                                                        least_gain: float, held_out_photo: Image.Image) -> None:
    """A held-out photo coded smaller than its size, at a step a restoring decoder serves, decodes with the one
    trained at that scale, closer to the photo once scaled back up. Measured: taesd3 at 0.625 (quality 70)
    +0.42 dB, ST-LPIPS 0.077 -> 0.057; at 0.75 (quality 87) +0.62 dB, and at 0.875 (quality 92) +0.74 dB; taesd
    at 0.625 (quality 30, where the latent restorer ran before) +0.44 dB, at 0.875 (quality 60) +0.33 dB."""
    import io

    from pillow_sdlatent import pipeline
    from pillow_sdlatent.core.read import file_quantizer

    buffer = io.BytesIO()
    held_out_photo.save(buffer, format="SDL", quality=quality)
    header = pipeline.read_checked_layout(io.BytesIO(buffer.getvalue())).header
    assert header.model == model_name and header.coded_size == coded
    assert restore.serving_decoder(model_name, max(file_quantizer(header).steps), pipeline.coded_scale(header))
    gain = psnr(held_out_photo, pipeline.decode_file(buffer.getvalue())) - psnr(
        held_out_photo, pipeline.decode_file(buffer.getvalue(), restore=False))
    print(f"\n{model_name} restoring decoder at quality {quality}: {gain:+.2f} dB")
    assert gain > least_gain, f"{model_name}'s restoring decoder gained only {gain:.2f} dB at quality {quality}"


def test_restoring_decoder_is_built_once_and_only_in_its_range() -> None:
    model = load_model("taesd3")
    with ThreadPoolExecutor(4) as pool:
        twins = list(pool.map(lambda _: restore.restoring_decoder(model, 0.5, 1.0), range(4)))
    assert all(twin is twins[0] for twin in twins) and twins[0] is not model
    assert twins[0].decoder_digest != model.decoder_digest and twins[0].spec is model.spec
    scaled = restore.restoring_decoder(model, 0.5, 0.625)
    assert scaled is restore.restoring_decoder(model, 0.5, 0.5)
    assert scaled.decoder_digest not in (model.decoder_digest, twins[0].decoder_digest)
    assert restore.restoring_decoder(model, restore.DECODER_STEPS["taesd3"][1] * 1.01, 1.0) is model
    assert restore.restoring_decoder(model, restore.DECODER_STEPS["taesd3"][0] * 0.99, 1.0) is model
    assert restore.restoring_decoder(model, 0.5, 0.45) is model
    three_quarters = restore.restoring_decoder(model, 0.5, 0.75)
    assert three_quarters is restore.restoring_decoder(model, 0.5, 0.875)
    assert len({model.decoder_digest, twins[0].decoder_digest, scaled.decoder_digest,
                three_quarters.decoder_digest}) == 4
    taesd = load_model("taesd")
    top = restore.DECODER_STEPS["taesd"][1]
    assert restore.restoring_decoder(taesd, top, 1.0) is taesd  # from there the latent restorer's
    assert not restore.restores_latent("taesd", 0.5, 0.75)  # one or the other, never both
    assert restore.restores_latent("taesd", 0.5, 0.45) and restore.restores_latent("taesd", top, 0.75)
    assert restore.restoring_decoder(taesd, 0.3, 0.45) is taesd
    taesd_twins = {restore.restoring_decoder(taesd, 0.3, scale).decoder_digest for scale in (0.5, 0.75, 1.0)}
    assert len(taesd_twins) == 2 and taesd.decoder_digest not in taesd_twins


def test_restoring_decoder_is_skipped_for_other_decoder_weights() -> None:
    """Fine-tuned from the shipped decoder: a model loaded with other decoder weights decodes as it is."""
    import copy

    from pillow_sdlatent.once import LoadOnce

    other = copy.copy(load_model("taesd3"))
    other.decoder_digest, other._twins = bytes(32), LoadOnce()
    assert restore.restoring_decoder(other, 0.5, 1.0) is other


def test_restoring_decoder_on_torch_matches_onnx_runtime() -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(0, 1, (1, 16, 12, 12)).astype(np.float32)
    onnx = restore.restoring_decoder(load_model("taesd3"), 0.5, 1.0).decode(latent)
    torch_twin = restore.restoring_decoder(load_model("taesd3", runtime="torch"), 0.5, 1.0)
    assert torch_twin.runtime == "torch"
    np.testing.assert_allclose(torch_twin.decode(latent), onnx, atol=2e-3)
