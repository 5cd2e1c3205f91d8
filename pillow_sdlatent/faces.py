"""Faces in an image, so that the encoder codes them with finer steps than the rest (FORMAT.md, QREG).

At low rates an autoencoder redraws a small face with other eyes and mouths; the same bytes spent a little
more on the face and a little less elsewhere keep more of the person. Finding faces needs OpenCV
(``pip install 'pillow_sdlatent[faces]'``); a reader never does, since the file records the regions.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from typing import Any

import numpy as np
from PIL import Image

from .core.container import LATENT_FACTOR, MAX_REGIONS, Region, latent_size
from .once import LoadOnce

#: the step factor inside a face. Chosen on 14 training photos with faces outside every held-out split, at
#: 0.15 bpp (benchmarks/face_steps.py, docs/fidelity/faces): 0.5 gave the face crops +1.13 dB for -0.21 dB on
#: the whole photo; 0.35 only +0.44 dB more, for -0.25 dB more.
FACE_STEP_FACTOR = 0.5
#: latent positions added around a face box on each side: the decoder's receptive field reaches past the box
MARGIN = 1
#: detection runs on the image scaled down to at most this side (seconds on a 24-megapixel photo otherwise)
DETECT_MAX_SIDE = 2048
#: OpenCV's Haar frontal-face cascade and its settings, on the histogram-equalised grey image. On 200 training
#: photos, the ``default`` cascade (4 neighbours) found 21 of 25 faces with 58 other boxes, ``alt2`` (3) 25 with 17.
CASCADE, MIN_NEIGHBOURS, MIN_FACE = "haarcascade_frontalface_alt2.xml", 3, 20


def available() -> bool:
    """Whether OpenCV is installed, without importing it."""
    return importlib.util.find_spec("cv2") is not None


_cascades = LoadOnce()
#: one detection at a time: OpenCV does not promise that a cascade is safe to run from several threads at once
_detecting = threading.Lock()


def _cascade() -> Any:
    import cv2

    return _cascades.get((CASCADE,), lambda: cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE))


def face_boxes(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) pixel boxes of the frontal faces OpenCV finds in ``image``."""
    grey = image.convert("L")
    shrink = max(1.0, max(grey.size) / DETECT_MAX_SIDE)
    if shrink > 1:
        grey = grey.resize((round(grey.width / shrink), round(grey.height / shrink)), Image.Resampling.BOX)
    import cv2

    cascade, equalised = _cascade(), cv2.equalizeHist(np.asarray(grey))
    with _detecting:
        found = cascade.detectMultiScale(equalised, scaleFactor=1.1, minNeighbors=MIN_NEIGHBOURS,
                                         minSize=(MIN_FACE, MIN_FACE))
    return [(math.floor(x * shrink), math.floor(y * shrink), math.ceil((x + w) * shrink), math.ceil((y + h) * shrink))
            for x, y, w, h in found][:MAX_REGIONS]


def face_regions(boxes: list[tuple[int, int, int, int]], size: tuple[int, int],
                 coded: tuple[int, int]) -> tuple[Region, ...]:
    """The latent rectangles (with MARGIN) that cover pixel ``boxes`` of an image of ``size`` coded at ``coded``."""
    sx, sy = coded[0] / size[0] / LATENT_FACTOR, coded[1] / size[1] / LATENT_FACTOR
    width, height = latent_size(*coded)
    factor = float(np.float32(FACE_STEP_FACTOR))  # as QREG stores it
    return tuple(Region(max(0, math.floor(x0 * sx) - MARGIN), max(0, math.floor(y0 * sy) - MARGIN),
                        min(width, math.ceil(x1 * sx) + MARGIN), min(height, math.ceil(y1 * sy) + MARGIN),
                        factor) for x0, y0, x1, y1 in boxes)
