"""Shared fixtures: real TAESD weights through $PILLOW_SDLATENT_MODELS, Kodak photos, metrics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pillow_sdlatent  # noqa: F401  (registers the format)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
KODAK = SHARED / "data" / "kodak"
#: the format's test vectors (FORMAT.md, "Test vectors")
VECTORS = REPO / "fixtures" / "vectors"

os.environ.setdefault("PILLOW_SDLATENT_MODELS", str(SHARED / "models" / "taesd"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="session")
def kodak_files() -> list[Path]:
    files = sorted(KODAK.glob("kodim*.png"))
    if len(files) != 24:
        pytest.fail(f"expected the 24 Kodak photos in {KODAK}")
    return files


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A 192x128 crop of a real photo: quick to code, real image statistics."""
    with Image.open(KODAK / "kodim23.png") as image:
        return image.convert("RGB").crop((300, 100, 492, 228))


@pytest.fixture(scope="session")
def held_out_photo() -> Image.Image:
    """A whole training photo outside every set anything was fitted or chosen on (BSDS500 61060, 481x321)."""
    with Image.open(SHARED / "data" / "train" / "BSDS500" / "61060.jpg") as image:
        return image.convert("RGB")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skipped cleanly where there is none (CI never has one)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
