"""Latents for training: a torch ``Dataset`` over ``.sdl`` files that never runs a decoder.

An ``.sdl`` file of a 512x512 photo is about 5 KB where an fp16 latent cache holds 32 KB per
image (4x64x64) and the float32 latent 64 KB: training on latents can read the ``.sdl`` files
directly. Each item costs one file read, a header parse and the entropy decoding of the latent;
no model weights and no decoder are needed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from . import read_latent


class LatentDataset(Dataset):
    """The latents of ``.sdl`` files: a folder (searched recursively) or a list of paths.

    An item is a dict: ``latent`` (a (C, H, W) float32 tensor; H and W are an eighth of the coded
    size, which is smaller than the image's for a file coded at a lower scale), ``model`` (the
    latent space's model name, e.g. ``taesd``), ``size`` ((width, height) of the image) and ``path``.
    """

    def __init__(self, files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> None:
        if isinstance(files, (str, os.PathLike)) and Path(files).is_dir():
            self.files = sorted(Path(files).rglob("*.sdl"))
        elif isinstance(files, (str, os.PathLike)):
            self.files = [Path(files)]
        else:
            self.files = [Path(file) for file in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        data = path.read_bytes()
        with Image.open(io.BytesIO(data), formats=["SDL"]) as image:
            model, size = image.info["sdl"]["model"], image.size
        return {"latent": torch.from_numpy(read_latent(data)), "model": model, "size": size, "path": str(path)}


def collate_latents(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of ``LatentDataset`` items: latents stacked to (N, C, H, W), sizes as an (N, 2) tensor.

    Latents of different shapes cannot be stacked; images of one size (or a sampler that groups
    equal shapes) give batches of one shape.
    """
    shapes = sorted({tuple(item["latent"].shape) for item in items})
    if len(shapes) > 1:
        raise ValueError(f"latents of different shapes {shapes} cannot be stacked into one batch; "
                         "batch images of one size together (or use batch_size=1)")
    return {"latent": torch.stack([item["latent"] for item in items]),
            "model": [item["model"] for item in items],
            "size": torch.tensor([item["size"] for item in items]),
            "path": [item["path"] for item in items]}
