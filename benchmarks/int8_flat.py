"""Flat colours through the int8 decoder: a photo's average hides what a flat area shows, a constant
rounding error that becomes a colour shift of the whole area.

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/int8_flat.py

Each 64x48 patch of one colour is saved at the default quality and decoded in float32, in int8
(``precision="int8"``) and in int8 with every activation rounded (the 1/8-resolution stage too, as the
int8 graph was before ``onnx_graphs.INT8_FIRST_ROUNDED_LAYER``); prints PSNR against the patch.
"""

from __future__ import annotations

import io

import numpy as np
from metrics import psnr
from PIL import Image

from pillow_sdlatent import models, pipeline
from pillow_sdlatent.models import onnx_graphs

COLOURS = ((220, 30, 30), (30, 30, 220), (30, 200, 40), (128, 128, 128), (245, 245, 240), (20, 20, 20))
SIZE = (64, 48)


def decoded_psnr(patch: Image.Image, data: bytes, precision: str, first_rounded_layer: int) -> float:
    if first_rounded_layer != onnx_graphs.INT8_FIRST_ROUNDED_LAYER:
        onnx_graphs.INT8_FIRST_ROUNDED_LAYER = first_rounded_layer
        models.clear_cache()  # the int8 graph is written again
    return psnr(np.asarray(patch), np.asarray(pipeline.decode_file(data, precision=precision).convert("RGB")))


def main() -> None:
    codec = onnx_graphs.INT8_FIRST_ROUNDED_LAYER
    print("| colour | float32 dB | int8 dB (codec) | int8 dB (every activation rounded) |")
    print("| --- | ---: | ---: | ---: |")
    for colour in COLOURS:
        patch = Image.new("RGB", SIZE, colour)
        buffer = io.BytesIO()
        patch.save(buffer, format="SDL")
        data = buffer.getvalue()
        float32, int8, rounded = (decoded_psnr(patch, data, precision, layer)
                                  for precision, layer in (("float32", codec), ("int8", codec), ("int8", 0)))
        print(f"| {colour} | {float32:.2f} | {int8:.2f} ({int8 - float32:+.2f}) "
              f"| {rounded:.2f} ({rounded - float32:+.2f}) |")


if __name__ == "__main__":
    main()
