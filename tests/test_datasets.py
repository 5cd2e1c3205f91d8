"""Training on latents: ``.sdl`` files feed a model through ``LatentDataset`` without any decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pillow_sdlatent import encode_images, read_latent
from pillow_sdlatent.datasets import LatentDataset, collate_latents
from tests.conftest import SHARED


@pytest.fixture(scope="module")
def sdl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 128x96 crops of two training photos as ``.sdl`` files, one in a subfolder."""
    folder = tmp_path_factory.mktemp("latents")
    photos = sorted((SHARED / "data" / "train" / "BSDS500").rglob("*.jpg"))[:2]
    crops = []
    for photo in photos:
        with Image.open(photo) as image:
            crops += [image.convert("RGB").crop((x, 40, x + 128, 136)) for x in (0, 200)]
    for index, data in enumerate(encode_images(crops, {"quality": 60, "scale": 1})):
        target = folder / ("sub" if index == 3 else "") / f"crop{index}.sdl"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
    return folder


def test_items_are_the_files_latents_with_model_and_size(sdl_folder: Path) -> None:
    dataset = LatentDataset(sdl_folder)
    assert [path.name for path in dataset.files] == ["crop0.sdl", "crop1.sdl", "crop2.sdl", "crop3.sdl"]
    item = dataset[3]
    assert item["model"] == "taesd" and item["size"] == (128, 96)
    assert item["latent"].dtype == torch.float32 and tuple(item["latent"].shape) == (4, 12, 16)
    assert np.array_equal(item["latent"].numpy(), read_latent(sdl_folder / "sub" / "crop3.sdl"))


def test_a_batch_of_latents_trains_a_small_model(sdl_folder: Path) -> None:
    """A few optimiser steps of a toy noise predictor on batches from ``.sdl`` files lower its loss."""
    loader = DataLoader(LatentDataset(sdl_folder), batch_size=4, collate_fn=collate_latents)
    (batch,) = list(loader)
    latents = batch["latent"]
    assert tuple(latents.shape) == (4, 4, 12, 16) and batch["size"].tolist() == [[128, 96]] * 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(32, 4, 3, padding=1))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    noise = torch.randn(latents.shape)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(latents + noise), noise)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


def test_collate_refuses_latents_of_different_shapes(sdl_folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "wide.sdl"
    other.write_bytes(encode_images([Image.new("RGB", (64, 32), "gray")], {"quality": 60, "scale": 1})[0])
    dataset = LatentDataset([sdl_folder / "crop0.sdl", other])
    with pytest.raises(ValueError, match="different shapes"):
        collate_latents([dataset[0], dataset[1]])
