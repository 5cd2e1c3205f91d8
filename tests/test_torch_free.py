"""Install and go: the TAESD family and the restorer run through ONNX Runtime without torch, from
bundled weights; graphs are valid ONNX; caches can be freed, and survive fork."""

from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from pillow_sdlatent import models, pipeline
from pillow_sdlatent.core import container
from pillow_sdlatent.enhance import restore
from pillow_sdlatent.models import WeightsNotFoundError, load_model, onnx_graphs, weights
from tests.conftest import KODAK, REPO, SHARED, psnr

#: decoder digests recorded in files written before the ONNX path existed (torch + diffusers)
RECORDED_DIGESTS = {
    "taesd": "26686146657550e3f367f166501d2f3cacc0de141ef87003bd227f4f9b5fd2cb",
    "taesd3": "6252f365702081bc93716afd50555557d7e2c71e9975285f0547f81b608fc4df",
}
#: run before anything imports the package: ``import torch`` then raises ImportError
BLOCK_TORCH = "import sys\nsys.modules['torch'] = None\nsys.modules['diffusers'] = None\n"


@pytest.fixture(scope="module")
def kodak_crop() -> np.ndarray:
    """A 160x128 crop of a Kodak photo, as the codec pads it (measured on, never fitted)."""
    with Image.open(KODAK / "kodim05.png") as image:
        return pipeline.padded_rgb(image.convert("RGB").crop((200, 150, 360, 278)))


def test_graphs_pass_the_onnx_checker() -> None:
    state = weights._tiny_from_taesd_files(models.get_spec("taesd3"), models.BUNDLED_DIR)
    tensors, _ = restore.read_weights(restore.WEIGHTS_DIR / restore.WEIGHTS["sd1"])
    for graph in (onnx_graphs.taesd_encoder(state), onnx_graphs.taesd_decoder(state), onnx_graphs.restorer(tensors)):
        proto = onnx.load_from_string(graph)
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version == onnx_graphs.OPSET
        assert proto.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "height"


@pytest.mark.parametrize("name", ["taesd", "taesd3"])
def test_onnx_from_safetensors_matches_torch(name: str, kodak_crop: np.ndarray) -> None:
    """Same network both ways: latents within 1e-3, decoded pixels within one level."""
    by_onnx, by_torch = load_model(name), load_model(name, runtime="torch")
    assert (by_onnx.runtime, by_torch.runtime) == ("onnxruntime", "torch")
    latent = by_onnx.encode_image(kodak_crop)
    assert np.abs(latent - by_torch.encode_image(kodak_crop)).max() < 1e-3
    pixels, reference = by_onnx.decode_image(latent), by_torch.decode_image(latent)
    assert np.abs(pixels.astype(int) - reference).max() <= 1 and np.mean(pixels != reference) < 1e-3


@pytest.mark.parametrize("finer", [False, True], ids=["one step", "step per position"])
def test_restorer_through_onnx_matches_torch(finer: bool) -> None:
    latent = (np.rint(np.random.default_rng(1).normal(0, 0.7, (4, 15, 22)) / 0.8) * 0.8).astype(np.float32)
    regions = (container.Region(3, 2, 12, 9, 0.5),) if finer else ()
    steps = restore.restorer_steps(0.8, regions, 15, 22)
    by_onnx = restore.restore_latent(latent, steps, "taesd")
    by_torch = restore._restore_with_torch(latent, restore.step_input(steps), "taesd")
    assert np.abs(by_onnx - by_torch).max() < 1e-4 and np.abs(by_onnx - latent).max() > 0.01


def test_decoder_digest_without_torch_is_the_recorded_one() -> None:
    for name, recorded in RECORDED_DIGESTS.items():
        spec = models.get_spec(name)
        state = weights._tiny_from_taesd_files(spec, models.BUNDLED_DIR)  # numpy, widened from bfloat16
        torch_state = models._tiny_module(spec, state).state_dict()
        assert models.decoder_digest(state, "tiny").hex() == recorded
        assert models.decoder_digest(torch_state, "tiny").hex() == recorded
        assert load_model(name).decoder_digest.hex() == recorded


def test_save_and_load_with_torch_impossible(photo: Image.Image, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain install: no torch, no diffusers, no $PILLOW_SDLATENT_MODELS; the bundled weights serve (the int8
    decoder too), and the float32 result is the torch runtime's within a hundredth of a dB."""
    photo.save(tmp_path / "photo.png")
    script = BLOCK_TORCH + """
import io, numpy as np
from PIL import Image
import pillow_sdlatent
photo = Image.open("photo.png")
buffer = io.BytesIO()
photo.save(buffer, format="SDL", quality=60)
image = Image.open(io.BytesIO(buffer.getvalue()))
image.decode_options = {"precision": "float32"}  # as torch computes (int8 is checked in test_int8)
image.load()
int8 = Image.open(io.BytesIO(buffer.getvalue()))
int8.decode_options = {"precision": "int8"}
int8.load()
mse = np.mean((np.asarray(image, float) - np.asarray(photo, float)) ** 2)
print(10 * np.log10(255**2 / mse), image.info["sdl"]["model"], sys.modules.get("torch") is not None)
try:
    pillow_sdlatent.models.load_model("taesd", runtime="torch")
except ImportError as exc:
    print("refused:", exc)
"""
    env = {key: value for key, value in os.environ.items() if key != models.MODELS_ENV}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    first, refusal = result.stdout.splitlines()
    quality, model, torch_loaded = first.split()
    assert model == "taesd" and torch_loaded == "False"
    assert "pip install 'pillow_sdlatent[torch]'" in refusal
    monkeypatch.setenv(models.RUNTIME_ENV, "torch")
    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", quality=60)
    with Image.open(buffer) as image:
        assert float(quality) == pytest.approx(psnr(image, photo), abs=0.01) and float(quality) > 22


def test_bundled_weights_come_after_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.MODELS_ENV, str(tmp_path))  # empty: the bundled copy serves taesd
    assert load_model("taesd").decoder_digest.hex() == RECORDED_DIGESTS["taesd"]
    with pytest.raises(WeightsNotFoundError, match="bundled with the package"):
        load_model("taef1")  # not bundled


def test_hub_failure_other_than_not_found_is_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A broken cache is not "weights not found": its error surfaces, chained."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    monkeypatch.setenv(models.MODELS_ENV, str(tmp_path))

    def broken(*args: object, **kwargs: object) -> str:
        raise ValueError("corrupt cache entry")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(RuntimeError, match="madebyollin/taef1") as info:
        load_model("taef1")
    assert isinstance(info.value.__cause__, ValueError)

    def missing(*args: object, **kwargs: object) -> str:
        raise EntryNotFoundError("no such file")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(WeightsNotFoundError):
        load_model("taef1")


def test_clear_cache_frees_and_reloads(photo: Image.Image) -> None:
    import pillow_sdlatent
    from pillow_sdlatent.core.coders import ctx2

    rgb = pipeline.padded_rgb(photo)
    before = load_model("taesd")
    latent = before.encode_image(rgb)
    restore.restore_latent(latent, 1.0, "taesd")
    ctx2._net("ctx2")
    pillow_sdlatent.clear_cache()
    assert not restore._loaded.items and not ctx2._loaded.items
    after = load_model("taesd")
    assert after is not before
    np.testing.assert_array_equal(after.encode_image(rgb), latent)


def _decode_in_child(data: bytes, queue: multiprocessing.Queue) -> None:
    queue.put(np.asarray(pipeline.decode_file(data)).tobytes())


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_forked_child_decodes_after_the_parent(photo: Image.Image, runtime: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtime thread pools do not survive fork; a child must not hang on the parent's cached models."""
    monkeypatch.setenv(models.RUNTIME_ENV, runtime)
    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", quality=60)
    in_parent = np.asarray(pipeline.decode_file(buffer.getvalue()))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_decode_in_child, args=(buffer.getvalue(), queue))
    child.start()
    try:
        in_child = queue.get(timeout=60)
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
    assert np.array_equal(np.frombuffer(in_child, np.uint8).reshape(in_parent.shape), in_parent)


def test_shared_weights_are_the_bundled_ones() -> None:
    """The package's copies are byte-identical to the TAESD release they came from."""
    for name in ("taesd", "taesd3"):
        for part in ("encoder", "decoder"):
            file = f"{name}_{part}.safetensors"
            assert (models.BUNDLED_DIR / file).read_bytes() == (SHARED / "models" / "taesd" / file).read_bytes()
    notice = (models.BUNDLED_DIR / "NOTICE.md").read_text()
    assert all(f.name in notice for f in models.BUNDLED_DIR.glob("*.*") if f.name != "NOTICE.md")


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd"),
                    reason="a GPU driver is present: torch is asked whether CUDA works")
def test_a_cpu_only_machine_decodes_without_importing_torch(photo: Image.Image, tmp_path: Path) -> None:
    """torch is installed here, but with no GPU driver the default device is the CPU without asking
    torch, so opening a file in a fresh process never pays torch's import."""
    path = tmp_path / "photo.sdl"
    photo.save(path)
    script = ("import sys; from PIL import Image; import pillow_sdlatent\n"
              f"Image.open({str(path)!r}).load()\n"
              "print('torch' in sys.modules)")
    env = {key: value for key, value in os.environ.items() if key not in (models.DEVICE_ENV, models.RUNTIME_ENV)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
