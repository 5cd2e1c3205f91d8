"""The 1/8-scale preview behind ``draft()`` and ``thumbnail()``: one pixel per latent cell, no decoder, no torch.

Best effort (FORMAT.md, What is normative): a linear latent -> RGB map fitted on training photos
(``training/fit_preview.py``).
"""

from __future__ import annotations

import json
from typing import IO

import numpy as np
from PIL import Image

from .core import container
from .core.container import DamagedFileError, Layout
from .core.modes import alpha_plane, finish_mode
from .core.read import latent_from_layout
from .weights import WEIGHTS_DIR


def preview_layout(fp: IO[bytes], layout: Layout, *, allow_truncated: bool = False) -> Image.Image:
    """A 1/8-scale image (one pixel a latent cell) straight from the latent: no decoder, no torch.

    A linear latent -> RGB map fitted on training photos (training/fit_preview.py).
    """
    header = layout.header
    latent = latent_from_layout(fp, layout, allow_truncated)
    alpha = alpha_plane(layout) if header.mode in container.ALPHA_MODES else None
    matrix, bias = preview_map(header.model, header.latent_shape[0])
    rgb = preview_features(latent) @ matrix.T + bias
    preview = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if header.coded_size is not None:  # cells of the coded image -> cells of the image, edges aligned
        size = container.latent_size(header.width, header.height)
        (coded_width, coded_height), (cells_wide, cells_high) = header.coded, preview.size
        box = (0, 0, min(cells_wide, size[0] * coded_width / header.width),
               min(cells_high, size[1] * coded_height / header.height))
        preview = preview.resize(size, container.RESAMPLING[header.resampling], box=box)
    return finish_mode(preview, layout, alpha, scale=container.LATENT_FACTOR)


def preview_features(latent: np.ndarray) -> np.ndarray:
    """(C, H, W) latent -> (H, W, 9C): each cell with its 3x3 neighbourhood (edges replicated)."""
    _, height, width = latent.shape
    padded = np.pad(latent, ((0, 0), (1, 1), (1, 1)), mode="edge")
    shifted = [padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return np.concatenate(shifted, axis=0).transpose(1, 2, 0)


def preview_map(model: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted (3, 9C) filter and (3,) bias for a model's latent space."""
    maps = json.loads((WEIGHTS_DIR / "preview_maps.json").read_text())
    if model not in maps:
        raise DamagedFileError(f"no preview map for model {model!r}")
    matrix = np.asarray(maps[model]["matrix"], dtype=np.float32)
    if matrix.shape != (3, 9 * channels):
        raise DamagedFileError(f"preview map for {model!r} does not fit a {channels}-channel latent")
    return matrix, np.asarray(maps[model]["bias"], dtype=np.float32)
