"""The measuring parts of benchmarks/fidelity.py on real images: OCR accuracy, face crops, byte matching."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import KODAK, REPO

pytest.importorskip("cv2")
pytest.importorskip("pytesseract")
if shutil.which("tesseract") is None:
    pytest.skip("tesseract is not installed (apt-get install tesseract-ocr)", allow_module_level=True)

sys.path.insert(0, str(REPO / "benchmarks"))
import fidelity


def test_character_accuracy_counts_edits_against_the_reference_length() -> None:
    assert fidelity.levenshtein("kitten", "sitting") == 3
    assert fidelity.char_accuracy("sitting", "kitten") == pytest.approx(0.5)
    assert fidelity.char_accuracy("", "") == 1.0
    assert fidelity.char_accuracy("a much longer reading", "ab") == 0.0


@pytest.fixture(scope="module")
def card() -> tuple[np.ndarray, list[fidelity.TextLine]]:
    with Image.open(KODAK / "kodim23.png") as background:
        return fidelity.text_card(background.convert("RGB"), fidelity.font_paths()[0], first_dark=True, seed=1)


def test_ocr_reads_crisp_rendered_text_in_every_size_band(card: tuple[np.ndarray, list[fidelity.TextLine]]) -> None:
    rgb, lines = card
    readings = fidelity.ocr_lines(rgb, lines)
    by_band: dict[str, list[float]] = {}
    for line, reading in zip(lines, readings, strict=True):
        assert line.truth is not None
        by_band.setdefault(fidelity.size_band(line.size_px), []).append(fidelity.char_accuracy(reading, line.truth))
    assert sorted(by_band) == ["10-14", "15-18", "19-28"]
    assert all(np.mean(scores) > 0.9 for scores in by_band.values()), by_band


def test_ocr_of_text_blurred_away_scores_low(card: tuple[np.ndarray, list[fidelity.TextLine]]) -> None:
    """The instrument must see lost letters: a 10 px line scaled to a quarter and back is not readable."""
    rgb, lines = card
    small = [line for line in lines if line.size_px <= 12]
    size = (rgb.shape[1], rgb.shape[0])
    blurred = np.asarray(Image.fromarray(rgb).resize((size[0] // 4, size[1] // 4), Image.Resampling.BOX)
                         .resize(size, Image.Resampling.BILINEAR))
    readings = fidelity.ocr_lines(blurred, small)
    assert max(fidelity.char_accuracy(r, line.truth or "") for r, line in zip(readings, small, strict=True)) < 0.5


def test_face_crop_scores_itself_perfectly_and_a_coarse_jpeg_worse() -> None:
    with Image.open(KODAK / "kodim18.png") as opened:
        rgb = np.asarray(opened.convert("RGB"))
    boxes = fidelity.face_boxes(rgb)
    assert len(boxes) == 1
    face = fidelity.crop(rgb, boxes[0])
    assert min(face.shape[:2]) < fidelity.MSSSIM_MIN_SIDE  # a small face: MS-SSIM goes through the scaled-up path
    assert fidelity.psnr(face, face) == float("inf")
    assert fidelity.crop_ms_ssim(face, face) == pytest.approx(1.0)
    coarse = fidelity.crop(fidelity.encode(Image.fromarray(rgb), "JPEG", quality=5)[1], boxes[0])
    assert fidelity.psnr(face, coarse) < 30
    assert fidelity.crop_ms_ssim(face, coarse) < 0.95


def test_matched_codec_stays_within_the_byte_budget_at_its_largest_quality(photo: Image.Image) -> None:
    budget = 1500
    cache: dict[tuple[float, int], tuple[int, np.ndarray]] = {}
    scale, quality, size, decoded = fidelity.match_budget(photo, "JPEG", {}, budget, cache)
    assert size <= budget < cache[(scale, quality + 1)][0]
    assert decoded.shape == np.asarray(photo).shape


def test_budget_under_the_lowest_quality_falls_back_to_a_smaller_scale(photo: Image.Image) -> None:
    cache: dict[tuple[float, int], tuple[int, np.ndarray]] = {}
    scale, _quality, size, decoded = fidelity.match_budget(photo, "JPEG", {}, 900, cache)
    assert cache[(1.0, 0)][0] > 900 >= size
    assert scale < 1
    assert decoded.shape == np.asarray(photo).shape
