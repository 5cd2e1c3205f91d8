"""Large images in overlapping tiles with blended seams, so that memory stays bounded at any size."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Images above this many pixels are coded in overlapping tiles so memory stays bounded.
TILED_ABOVE_PIXELS = 1024 * 1024
TILE_PIXELS = 512
OVERLAP_PIXELS = 64


def to_pixels(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 levels."""
    return np.clip(np.rint((pixels + 1) * 127.5), 0, 255).astype(np.uint8)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``length``; the last tile is flush with the end, so all are full size."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _ramp(length: int, start: int, total: int, overlap: int) -> np.ndarray:
    """Blend weights along one axis: rising over the overlap, flat at the image's own borders."""
    index = np.arange(length, dtype=np.float32) + 0.5
    rise = np.minimum(1.0, index / overlap) if start > 0 else np.ones(length, np.float32)
    fall = np.minimum(1.0, (length - index) / overlap) if start + length < total else np.ones(length, np.float32)
    return np.minimum(rise, fall).astype(np.float32)


def blend_tiles(source: np.ndarray, scale: float, run: Callable[[list[np.ndarray]], list[np.ndarray]],
                 out_channels: int, batch: int) -> np.ndarray:
    """Run ``run`` on overlapping tiles of ``source`` (H, W, C) and blend its (h, w, C') outputs.

    ``scale`` maps source to output coordinates (1/8 to encode, 8 to decode).
    Inputs of at most ``TILED_ABOVE_PIXELS`` image pixels go through in one piece.
    """
    height, width = source.shape[:2]
    pixel_scale = 1 if scale < 1 else 8  # source units per image pixel, inverted
    if height * width * pixel_scale**2 <= TILED_ABOVE_PIXELS:
        (whole,) = run([source])
        return whole
    tile, overlap = TILE_PIXELS // pixel_scale, OVERLAP_PIXELS // pixel_scale
    out_h, out_w = round(height * scale), round(width * scale)
    total = np.zeros((out_h, out_w, out_channels), np.float32)
    weight = np.zeros((out_h, out_w, 1), np.float32)
    boxes = [(y, x) for y in _tile_starts(height, tile, overlap) for x in _tile_starts(width, tile, overlap)]
    for first in range(0, len(boxes), batch):
        chunk = boxes[first : first + batch]
        outputs = run([source[y : y + tile, x : x + tile] for y, x in chunk])
        for (y, x), out in zip(chunk, outputs, strict=True):
            oy, ox = round(y * scale), round(x * scale)
            th, tw = out.shape[:2]
            ramp_y = _ramp(th, oy, out_h, round(overlap * scale))
            ramp_x = _ramp(tw, ox, out_w, round(overlap * scale))
            w2d = np.outer(ramp_y, ramp_x)[..., None]
            weight[oy : oy + th, ox : ox + tw] += w2d
            total[oy : oy + th, ox : ox + tw] += out * w2d
    return total / weight
