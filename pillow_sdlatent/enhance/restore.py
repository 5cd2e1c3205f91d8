"""Decoder-side restoration: undo part of the quantization noise that the VAE decoder never saw in training.

Coarse quantization leaves noise in the latent, and it shows as blotches and colour shifts.
- Restoring decoders: the model's own decoder fine-tuned on its quantized latents against the photos
  (``training/train_decoder.py``) decodes in its place (``restoring_decoder``), chosen by the file's coded
  scale and step (``DECODERS``, ``DECODER_STEPS``); those for files coded smaller were judged on their
  output scaled back up. ``taesd3`` has them at every step, ``taesd`` up to step 0.7.
- SD 1.x latents at coarser steps: a small network, conditioned on the file's quantization step, predicts
  a residual towards the clean latent before the decoder runs (``training/train_restorer.py``). It runs
  on the CPU in float32, so its output does not depend on the decode device.

Both were trained on photos outside the test sets; their weights ship inside the package, so restoring
needs no download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import quantize
from ..models import LoadOnce, onnx_graphs

if TYPE_CHECKING:
    import torch

    from ..core.container import Region
    from ..models import LatentModel

from ..weights import WEIGHTS_DIR

#: latent space -> weights file; taesd and sd-vae share SD 1.x's latent space
WEIGHTS = {"sd1": "restorer_taesd.safetensors"}
#: steps (latent units) where the restorer is on by default. Chosen on training photos outside the test
#: sets (not Kodak): below about 0.45 it still gains PSNR (+0.03 dB at 0.15, +0.2 dB at 0.4) but smooths
#: away noise that ST-LPIPS reads as texture. It was trained up to step 2.0 and still helps beyond: on 8
#: training photos (every 40th from the 11th) PSNR +1.06 dB at step 3.0 (7 of 8 better), but -0.29 dB at
#: 4.0 (the coarsest quality) and worse above, so it stays off there (rate control may go to 16). Where a
#: restoring decoder serves the file (taesd, up to 0.7: ``DECODER_STEPS``) that one runs instead.
HELPFUL_STEPS = (0.45, 3.0)
ARCH_VERSION = "1"
#: the torch half (``restore_net``), imported only when asked for: decoding needs no torch
_TORCH_NAMES = ("ResBlock", "RestorerNet", "save_weights", "load_net")


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from . import restore_net

        return getattr(restore_net, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """A weights file's float32 tensors and network sizes; ``ValueError`` for another architecture version."""
    tensors, meta = onnx_graphs.read_safetensors(path)
    if meta.get("arch") != ARCH_VERSION:
        raise ValueError(f"{path.name}: restorer architecture {meta.get('arch')!r}, this build expects "
                         f"{ARCH_VERSION!r}")
    config = json.loads(meta.get("config", "{}"))
    if set(config) - {"channels", "width", "inner", "depth"} or not all(
            isinstance(v, int) and 1 <= v <= 1024 for v in config.values()):
        raise ValueError(f"{path.name}: bad restorer config {config!r}")
    return tensors, config


#: (kind, weights path) -> the torch module ("net") or (OnnxNetwork, latent channels) ("session")
_loaded = LoadOnce()


def clear_cache() -> list[Any]:
    """Forget the loaded restorers (``models.clear_cache`` calls this); returns them.

    A fresh ``LoadOnce`` also brings fresh locks: a forked child may inherit the old ones held.
    """
    global _loaded
    dropped, _loaded = list(_loaded.items.values()), LoadOnce()
    return dropped


def _weights_for(model_name: str) -> Path | None:
    """The latent restorer's weights file for ``model_name``, if it ships. Asked on every decode, so the
    file's existence is checked once (until ``clear_cache``)."""
    from ..core.registry import get_spec

    file = WEIGHTS.get(get_spec(model_name).latent_space)
    if file is None:
        return None
    path = WEIGHTS_DIR / file
    return path if _loaded.get(("present", file), path.is_file) else None


#: model -> its restoring decoders (float16 files, the decoder's tensors in diffusers' names) by the coded
#: scale of the files they serve (the fraction of the image's size; 1: coded whole), lowest first: (from
#: this scale, weights file). taesd3's whole-file one is trained at the coded size; a scaled one with its
#: loss on the decode scaled back up from its scale, which sharpens ahead of the upscaling: worse on whole
#: files, and taesd3's for 0.625 (perceptual weight 0.3) over-sharpens at 0.75 and 0.875, which have their
#: own (trained at 0.75, perceptual weight 1). taesd's for 0.75 (perceptual weight 1) is better than the
#: original on whole files too, so it serves up to 1 (docs/fidelity/restoring_decoder, training/README.md)
DECODERS: dict[str, tuple[tuple[float, str], ...]] = {
    "taesd3": ((0.5, "restorer_taesd3_scaled_decoder.safetensors"),
               (0.7, "restorer_taesd3_scaled075_decoder.safetensors"), (1.0, "restorer_taesd3_decoder.safetensors")),
    "taesd": ((0.5, "restorer_taesd_scaled_decoder.safetensors"), (0.7, "restorer_taesd_decoder.safetensors")),
}
#: model -> a file's largest component step where its restoring decoders run. taesd3: the range they were
#: trained on, from quality 100's step to the coarsest a taesd3 file gets. taesd: trained on 0.1-0.45; they
#: take over from the latent restorer (which then does not run) up to 0.7: on 6 training photos outside
#: every held-out set (``benchmarks/taesd_restoration.py``), at qualities 30-50 (steps 0.46-0.58) PSNR
#: 20.43/20.71/21.00 -> 20.96/20.89/21.14 dB, ST-LPIPS 0.177/0.147/0.141 -> 0.164/0.133/0.134; at steps
#: 0.60-0.62 (3 files at 0.1 bpp) level or better on both; from 0.73 the restorer gains more PSNR (at
#: quality 20, step 0.94: 19.49 against 19.25 dB, ST-LPIPS 0.222 against 0.249). The two together lose
#: ST-LPIPS.
DECODER_STEPS: dict[str, tuple[float, float]] = {"taesd3": (0.1, 2.5), "taesd": (0.1, 0.7)}


def decoder_file(model_name: str, scale: float) -> str | None:
    """The restoring decoder's weights file for ``model_name``'s files coded at ``scale``, or None."""
    return next((file for lowest, file in reversed(DECODERS.get(model_name, ())) if scale >= lowest), None)


def serving_decoder(model_name: str, step: float, scale: float) -> str | None:
    """The restoring decoder's weights file for a file of ``model_name`` coded at ``scale`` of the image's
    size (1: whole) whose largest component step is ``step``, if one serves it (``DECODER_STEPS``)."""
    low, high = DECODER_STEPS.get(model_name, (0.0, 0.0))
    return decoder_file(model_name, scale) if low <= step < high else None


def restoring_decoder(model: LatentModel, step: float, scale: float) -> LatentModel:
    """``model`` decoding with the restoring decoder that serves its files at ``step`` and ``scale``
    (``serving_decoder``), where ``model``'s decoder is the one it was fine-tuned from; else ``model``."""
    file = serving_decoder(model.spec.name, step, scale)
    return model if file is None else decoding_with(model, file)


def decoding_with(model: LatentModel, file: str) -> LatentModel:
    """``model`` decoding with the restoring decoder in ``file`` (a twin built once), where that was fine-tuned
    from ``model``'s decoder; else ``model`` (the file is missing, or other weights were asked for)."""
    tensors, base_digest = _read_decoder(file)
    if base_digest != model.decoder_digest.hex():
        return model
    return model.with_decoder(file, lambda: tensors)


def _read_decoder(file: str) -> tuple[dict[str, np.ndarray], str]:
    """A restoring decoder's tensors and the digest of the decoder it was fine-tuned from (none: no file);
    read once. The file's existence is checked here, with the read, rather than on every decode."""

    def read() -> tuple[dict[str, np.ndarray], str]:
        path = WEIGHTS_DIR / file
        if not path.is_file():
            return {}, ""
        tensors, meta = onnx_graphs.read_safetensors(path)
        return tensors, meta.get("base_digest", "")

    return _loaded.get(("decoder", file), read)


def has_restorer(model_name: str, step: float | None = None) -> bool:
    """Whether ``model_name``'s latent space has a restorer (and, given ``step``, whether it helps there).

    ``ValueError`` for an unknown model name, as everywhere in the package.
    """
    if _weights_for(model_name) is None:
        return False
    return step is None or HELPFUL_STEPS[0] <= step <= HELPFUL_STEPS[1]


#: models whose restoring decoders keep small text: taesd3's read it better (docs/fidelity/restoring_decoder,
#: text at a quality); taesd's redraw it (3 held-out text cards at 0.2 bpp: 19-28 px lines read 0.76
#: against 0.83, 10-14 px 0.18 against 0.29), as the latent restorer does (docs/fidelity/restoration)
DECODERS_KEEP_TEXT = frozenset({"taesd3"})


def redraws_text(model_name: str, step: float, scale: float) -> bool:
    """Whether the restoration that would serve a file of ``model_name`` at ``step``, coded at ``scale``,
    redraws small text, so that a file of an image with small text must turn it off."""
    if serving_decoder(model_name, step, scale) is not None:
        return model_name not in DECODERS_KEEP_TEXT
    return has_restorer(model_name, step)


def restores_latent(model_name: str, step: float, scale: float) -> bool:
    """Whether the latent restorer runs on a file of ``model_name`` at ``step``, coded at ``scale``: where it
    helps, unless a restoring decoder serves that file (it does better there; ``DECODER_STEPS``)."""
    return has_restorer(model_name, step) and serving_decoder(model_name, step, scale) is None


def restorer_net(model_name: str) -> torch.nn.Module:
    """The restorer for the model's latent space as a torch module, loaded once (thread-safe) and shared.

    Its parameters are frozen; gradients still flow to its input (encoder effort uses that).
    """
    from ..models.runtime import import_torch

    import_torch("the restorer as a torch module (encoder effort, training)")
    from .restore_net import load_net

    path = _path_for(model_name)
    return _loaded.get(("net", str(path)), lambda: load_net(path).eval().requires_grad_(False))


def _path_for(model_name: str) -> Path:
    path = _weights_for(model_name)
    if path is None:
        raise ValueError(f"no restorer for model {model_name!r}")
    return path


def _onnx_restorer(model_name: str) -> tuple[Any, int]:
    """The restorer as an ONNX Runtime network, and the latent channels it takes; built once."""
    from ..models.ort_engine import OnnxNetwork

    path = _path_for(model_name)

    def build() -> tuple[Any, int]:
        tensors, _ = read_weights(path)
        return OnnxNetwork(lambda: onnx_graphs.restorer(tensors)), tensors["tail.weight"].shape[0]

    return _loaded.get(("session", str(path)), build)


def restorer_steps(step: float, regions: tuple[Region, ...], height: int, width: int) -> float | np.ndarray:
    """The restorer's step input for a file of base ``step``: that step, or where its ``QREG`` regions code
    finer, an (H, W) float32 plane of each position's step. The network takes its step as a plane (as FFDNet
    takes its noise level), so a face coded at half the step is restored as such, not over-smoothed at the
    base step: on the 6 training photos with faces where it runs at 0.1 bpp, face crops +0.17 dB, the whole
    photos level or better (docs/fidelity/faces/README.md, "Restored at their own step")."""
    factors = quantize.step_factors(regions, height, width)
    return step if factors is None else (step * factors).astype(np.float32)


def restore_latent(latent: np.ndarray, step: float | np.ndarray, model_name: str) -> np.ndarray:
    """(C, H, W) dequantized latent of a file quantized with ``step`` -> (C, H, W) float32 restored latent.

    ``step``: one step, or an (H, W) plane of each position's step (``restorer_steps``). Float32 on the
    CPU, through ONNX Runtime (torch where onnxruntime is missing), so the result does not depend on the
    decode device. ``ValueError`` when the model has no restorer or a step is not a positive finite number.
    """
    from ..models import ort_engine

    plane = step_input(step)
    if plane.shape[2:] not in ((1, 1), latent.shape[1:]):
        raise ValueError(f"step plane of shape {plane.shape[2:]} for a latent of shape {latent.shape}")
    if not ort_engine.available():
        return _restore_with_torch(latent, plane, model_name)
    network, channels = _onnx_restorer(model_name)
    if latent.ndim != 3 or latent.shape[0] != channels:
        raise ValueError(f"expected a ({channels}, H, W) latent, got shape {latent.shape}")
    return network(latent=latent[None], step=plane)[0]


def step_input(step: float | np.ndarray) -> np.ndarray:
    """``step`` (one step, or an (H, W) plane of them) as the network's (1, 1, 1, 1) or (1, 1, H, W) float32
    input; ``ValueError`` unless every step is a positive finite number."""
    if isinstance(step, np.ndarray) and step.ndim == 2:
        plane = step.astype(np.float32)[None, None]
    elif isinstance(step, (int, float, np.floating)):
        plane = np.full((1, 1, 1, 1), step, np.float32)
    else:
        raise ValueError(f"step must be a positive finite number or an (H, W) plane, not {step!r}")
    if not (np.isfinite(plane).all() and (plane > 0).all()):
        raise ValueError(f"step must be a positive finite number, not {step!r}")
    return plane


def _restore_with_torch(latent: np.ndarray, plane: np.ndarray, model_name: str) -> np.ndarray:
    import torch

    net = restorer_net(model_name)
    if latent.ndim != 3 or latent.shape[0] != net.head.in_channels - 1:
        raise ValueError(f"expected a ({net.head.in_channels - 1}, H, W) latent, got shape {latent.shape}")
    with torch.inference_mode():
        z = torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32))[None]
        return net(z, torch.from_numpy(plane))[0].numpy()
