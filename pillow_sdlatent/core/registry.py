"""The models a file may name (FORMAT.md, Models): latent space and channel count per registry name.

Pure data: the reader checks a file's latent shape against it without loading any network.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """What a registry name stands for."""

    name: str
    family: str  # "tiny" (AutoencoderTiny) or "kl" (AutoencoderKL)
    latent_space: str
    channels: int
    hub_id: str
    file_prefix: str = ""  # TAESD file names in the models folder: {prefix}_encoder.safetensors


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("taesd", "tiny", "sd1", 4, "madebyollin/taesd", "taesd"),
        ModelSpec("taesdxl", "tiny", "sdxl", 4, "madebyollin/taesdxl", "taesdxl"),
        ModelSpec("taesd3", "tiny", "sd3", 16, "madebyollin/taesd3", "taesd3"),
        ModelSpec("taef1", "tiny", "flux", 16, "madebyollin/taef1", "taef1"),
        ModelSpec("sd-vae", "kl", "sd1", 4, "stabilityai/sd-vae-ft-mse"),
    )
}
DEFAULT_MODEL = "taesd"


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}") from None
