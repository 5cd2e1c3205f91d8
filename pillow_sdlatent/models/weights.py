"""Weights: where they are searched, how they load, and the decoder digest that names them.

Weights are searched in this order, and an error names every place looked at:

1. an explicit ``weights=`` argument (a folder or a ``.safetensors`` file);
2. the folder named by the environment variable ``PILLOW_SDLATENT_MODELS``;
3. the copies inside the package (``weights/``: ``taesd`` and ``taesd3``);
4. the Hugging Face cache, then the hub (``HF_HUB_OFFLINE=1`` skips the hub; needs ``huggingface_hub``).

Only safetensors are ever read: pickled checkpoints can run code when loaded.
On the CPU the TAESD family runs in ONNX Runtime from graphs written straight
from the weights (``onnx_graphs``), so torch is imported only for the torch
runtime: a GPU, ``sd-vae``, ``runtime="torch"``, or no onnxruntime.
"""


from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.registry import ModelSpec
from ..weights import WEIGHTS_DIR
from . import onnx_graphs
from .runtime import import_torch

if TYPE_CHECKING:
    import torch


MODELS_ENV = "PILLOW_SDLATENT_MODELS"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
BUNDLED_DIR = WEIGHTS_DIR

#: the AutoencoderTiny weights file in a diffusers folder or hub repository
TINY_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

#: a float32 state dict in diffusers' key names, as numpy arrays
StateDict = dict[str, np.ndarray]



def _as_numpy(values: Any) -> np.ndarray:
    """A float32 numpy array of a numpy array or a (CPU or device) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.ascontiguousarray(values, dtype=np.float32)


class WeightsNotFoundError(OSError):
    """No usable weights were found anywhere on the search path."""


class UnsafeWeightsError(ValueError):
    """A weights path names a pickle-based format, which is never loaded."""


def decoder_digest(state_dict: Mapping[str, Any], family: str) -> bytes:
    """SHA-256 of the decoder weights rounded to bfloat16 (FORMAT.md, Decoder digest).

    ``state_dict`` holds numpy arrays or torch tensors (diffusers key names); both give one digest.
    """
    prefixes = ("decoder.",) if family == "tiny" else ("decoder.", "post_quant_conv.")
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if k.startswith(prefixes)):
        values = _as_numpy(state_dict[key])
        digest.update(key.encode() + b"\0")
        digest.update(b"".join(int(n).to_bytes(4, "big") for n in values.shape) + b"\0")
        digest.update(onnx_graphs.bfloat16_bits(values).astype("<i2").tobytes())
    return digest.digest()


def _build_module(spec: ModelSpec, weights: str | os.PathLike | None,
                  models_dir: str) -> StateDict | torch.nn.Module:
    """TAESD weights as a ``StateDict``, the KL VAE as a diffusers module; the search order is the module's."""
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if weights:
        candidates.append(("weights= argument", Path(weights)))
    if models_dir:
        candidates.append((f"${MODELS_ENV}", Path(models_dir)))
    if spec.family == "tiny":
        candidates.append(("bundled with the package", BUNDLED_DIR))
    for origin, path in candidates:
        _refuse_pickle(path)
        network = _from_local(spec, path)
        if network is not None:
            return network
        tried.append(f"{origin}: {path} ({_expected_files(spec)})")
    network, hub_note = _from_hub(spec)
    if network is not None:
        return network
    tried.append(f"Hugging Face {hub_note}: {spec.hub_id}")
    if not models_dir:
        tried.append(f"${MODELS_ENV}: not set")
    raise WeightsNotFoundError(
        f"no weights for model {spec.name!r}. Looked in:\n  - " + "\n  - ".join(tried)
        + f"\nSet {MODELS_ENV} to a folder holding {_expected_files(spec)}, pass weights=, "
        "or allow Hugging Face hub access."
    )


def _expected_files(spec: ModelSpec) -> str:
    if spec.family == "tiny":
        return f"{spec.file_prefix}_encoder.safetensors + {spec.file_prefix}_decoder.safetensors, or a diffusers folder"
    return "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) or a .safetensors file"


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeightsError(
            f"refusing to load {path}: {path.suffix} files are pickles that can run code; "
            "convert them to .safetensors"
        )


def _from_local(spec: ModelSpec, path: Path) -> StateDict | torch.nn.Module | None:
    """Load from a folder or file, or None when it holds nothing for this model."""
    if spec.family == "tiny":
        if path.is_file():
            return _tiny_from_single_file(spec, path)
        pair = [path / f"{spec.file_prefix}_{part}.safetensors" for part in ("encoder", "decoder")]
        if all(file.is_file() for file in pair):
            return _tiny_from_taesd_files(spec, path)
        for folder in (path / spec.name, path):
            if (folder / "config.json").is_file() and (folder / TINY_WEIGHTS_FILE).is_file():
                return _tiny_from_single_file(spec, folder / TINY_WEIGHTS_FILE)
        return None
    if path.is_file() and path.suffix == ".safetensors":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_single_file(str(path))
    for folder in (path / spec.name, path):
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return _from_diffusers(spec, str(folder))
    return None


def _tiny_from_taesd_files(spec: ModelSpec, folder: Path) -> StateDict:
    """The original taesd.py key layout (encoder ``k``, decoder ``i.x`` after its clamp layer), as diffusers keys."""
    encoder, _ = onnx_graphs.read_safetensors(folder / f"{spec.file_prefix}_encoder.safetensors")
    state = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    decoder, _ = onnx_graphs.read_safetensors(folder / f"{spec.file_prefix}_decoder.safetensors")
    for key, value in decoder.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < 1:
            raise OSError(f"{folder}: {key!r} is not a taesd.py decoder key")
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return _checked_tiny_state(spec, state, folder)


def _tiny_from_single_file(spec: ModelSpec, path: Path) -> StateDict:
    """A diffusers-layout AutoencoderTiny state dict in one .safetensors file (as on the hub)."""
    if path.suffix != ".safetensors":
        raise OSError(f"{path}: expected a .safetensors file")
    state, _ = onnx_graphs.read_safetensors(path)
    return _checked_tiny_state(spec, state, path)


def _checked_tiny_state(spec: ModelSpec, state: StateDict, origin: Path) -> StateDict:
    """``state`` when it is exactly the model's AutoencoderTiny, else an ``OSError`` that says what differs."""
    expected = onnx_graphs.taesd_keys("encoder", state) | onnx_graphs.taesd_keys("decoder", state)
    problems = [f"missing {key}" for key in sorted(expected - set(state))]
    problems += [f"unexpected {key}" for key in sorted(set(state) - expected)]
    if not problems:
        latent_in = state["decoder.layers.0.weight"].shape[1]
        latent_out = state["encoder.layers.14.weight"].shape[0]
        if (latent_in, latent_out) != (spec.channels, spec.channels):
            problems.append(f"{latent_out} latent channels, not {spec.channels}")
        if any(value.ndim not in (1, 4) for value in state.values()):
            problems.append("a tensor that is neither a bias nor a convolution kernel")
    if problems:
        raise OSError(f"{origin} does not hold {spec.name!r} weights in diffusers' AutoencoderTiny layout: "
                      + ", ".join(problems[:3]))
    return state


def _numpy_state(module: torch.nn.Module) -> StateDict:
    return {key: _as_numpy(value) for key, value in module.state_dict().items()}


def _tiny_module(spec: ModelSpec, state: StateDict) -> torch.nn.Module:
    """diffusers' AutoencoderTiny holding ``state`` (float32)."""
    torch = import_torch(f"{spec.name}'s torch module")
    from diffusers import AutoencoderTiny

    module = AutoencoderTiny(latent_channels=spec.channels)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    return module


def _from_diffusers(spec: ModelSpec, location: str, **kwargs: object) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch = import_torch(f"model {spec.name!r}")
    return AutoencoderKL.from_pretrained(location, use_safetensors=True, torch_dtype=torch.float32, **kwargs)


def _from_hub(spec: ModelSpec) -> tuple[StateDict | torch.nn.Module | None, str]:
    """Try the local Hugging Face cache, then the hub unless HF_HUB_OFFLINE is set.

    Only "not there" (no such repository or file, no connection) moves on to the next
    place; any other failure, such as a broken cache, is raised with its cause.
    """
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        return None, "not searched (huggingface_hub is not installed)"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    for local_only in [True] if offline else [True, False]:
        try:
            if spec.family == "tiny":  # LocalEntryNotFoundError is an EntryNotFoundError
                path = huggingface_hub.hf_hub_download(spec.hub_id, TINY_WEIGHTS_FILE, local_files_only=local_only)
            else:
                return _from_diffusers(spec, spec.hub_id, local_files_only=local_only), ""
        except (OSError, EntryNotFoundError, RepositoryNotFoundError):
            continue
        except Exception as exc:
            raise RuntimeError(f"loading {spec.hub_id} from the Hugging Face cache or hub failed: {exc}") from exc
        return _tiny_from_single_file(spec, Path(path)), ""
    return None, "cache (HF_HUB_OFFLINE set, hub skipped)" if offline else "cache and hub (unreachable or missing)"
