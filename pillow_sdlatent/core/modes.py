"""Image modes in the format: what each Pillow mode is stored as, and the decoded colour turned back into it.

Normative (FORMAT.md, Modes and "From latent to pixels"): torch-free, shared by writer and reader.
"""

from __future__ import annotations

import numpy as np
import zstandard
from PIL import Image

from .coders import zstd_decompress_exact
from .container import DamagedFileError, Layout

#: given mode -> (working mode fed to the model, mode stored and decoded to)
MODE_RULES: dict[str, tuple[str, str]] = {
    "RGB": ("RGB", "RGB"),
    "L": ("L", "L"),
    "RGBA": ("RGBA", "RGBA"),
    "LA": ("LA", "LA"),
    "1": ("L", "1"),
    "RGBX": ("RGB", "RGB"),
    "CMYK": ("RGB", "RGB"),
    "YCbCr": ("RGB", "RGB"),
    "LAB": ("RGB", "RGB"),
    "HSV": ("RGB", "RGB"),
    "RGBa": ("RGBA", "RGBA"),
    "La": ("LA", "LA"),
    "PA": ("RGBA", "RGBA"),
}

#: ``ALPH`` method 0: one zstandard frame of the alpha plane (FORMAT.md, ALPH)
ALPHA_ZSTD = 0


def alpha_chunk(image: Image.Image) -> bytes:
    """``ALPH``'s data for an image with an alpha band: method 0, one zstd frame of the plane."""
    plane = np.asarray(image.getchannel("A"), dtype=np.uint8).tobytes()
    return bytes([ALPHA_ZSTD]) + zstandard.ZstdCompressor(level=19).compress(plane)


def working_image(image: Image.Image) -> tuple[Image.Image, str]:
    """The image converted to what the model sees, and the mode it will decode to.

    ``OSError`` naming the mode when it cannot be stored without silent loss.
    """
    if image.mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB"), "RGBA" if has_alpha else "RGB"
    try:
        work_mode, stored_mode = MODE_RULES[image.mode]
    except KeyError:
        raise OSError(
            f"cannot write mode {image.mode} as SDL: its samples have more than 8 bits "
            "and would be lost silently; convert to 'L' or 'RGB' first"
        ) from None
    return (image if image.mode == work_mode else image.convert(work_mode)), stored_mode


def finish_mode(rgb: Image.Image, layout: Layout, alpha: bytes | None, scale: int = 1) -> Image.Image:
    """Turn the decoded colour into the header's mode, restoring alpha (``alpha_plane``'s bytes).

    Alpha is exact at ``scale`` 1 and box-averaged for a 1/``scale`` preview.
    """
    mode = layout.header.mode
    if mode == "RGB":
        return rgb
    grey = rgb.convert("L")
    if mode == "L":
        return grey
    if mode == "1":
        return grey.convert("1", dither=Image.Dither.NONE)
    assert alpha is not None, "alpha modes always come with their plane"
    plane = Image.frombytes("L", (layout.header.width, layout.header.height), alpha)
    if scale > 1:
        plane = plane.reduce(scale)
    base = grey if mode == "LA" else rgb
    return Image.merge(mode, (*base.split(), plane))


def alpha_plane(layout: Layout) -> bytes:
    """The alpha values ``ALPH`` holds, row by row; ``DamagedFileError`` when they do not decode."""
    header = layout.header
    data = layout.alpha or b""
    expected = header.width * header.height
    if data[:1] != bytes([ALPHA_ZSTD]):
        raise DamagedFileError("unknown alpha coding method")
    try:
        return zstd_decompress_exact(data[1:], expected)
    except ValueError as exc:
        raise DamagedFileError(f"damaged alpha plane: {exc}") from None
