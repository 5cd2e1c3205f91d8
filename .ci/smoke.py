"""What a user of the light install does, checked: no torch anywhere, then open, load, thumbnail, save.

    python .ci/smoke.py examples/photo.jpg
"""

from __future__ import annotations

import importlib.util
import io
import sys
import time

import numpy as np
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent.core.coders import ctx2


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def main(path: str) -> None:
    if importlib.util.find_spec("torch") is not None:
        sys.exit("torch is installed: this check is for the light install")
    with Image.open(path) as source:
        photo = source.convert("RGB")
    start = time.perf_counter()
    buffer = io.BytesIO()
    photo.save(buffer, "SDL")
    encoded = time.perf_counter()
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert image.format == "SDL" and image.size == photo.size
        image.load()
        decoded = time.perf_counter()
        quality = psnr(photo, image)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        image.thumbnail((96, 96))
        assert max(image.size) == 96, image.size
    latent = pillow_sdlatent.read_latent(buffer.getvalue())
    assert "torch" not in sys.modules, "the light install imported torch"
    assert quality > 22, f"PSNR {quality:.2f} dB"
    print(f"light install: {len(buffer.getvalue())} bytes, {quality:.2f} dB, latent {latent.shape}, "
          f"save {encoded - start:.2f} s, load {decoded - encoded:.2f} s, ctx2 decoder in "
          f"{'C' if ctx2.native else 'numpy (no C compiler)'}, torch never imported")


if __name__ == "__main__":
    main(sys.argv[1])
