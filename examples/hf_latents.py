"""A Hugging Face ``datasets`` dataset of latents built from ``.sdl`` files.

The dataset stores each file's bytes (a few KB per image) with its model and size, read from the
header; ``with_transform`` turns the bytes into (C, H, W) float32 latents when rows are read, so
neither the dataset on disk nor the training loop ever holds decoded pixels or runs a decoder.

    sdl convert photos/ -o sdl/ --to sdl          # once: photos to .sdl (Ray, or --engine local)
    python examples/hf_latents.py sdl/ [--save latents-dataset/]

Needs ``pip install datasets`` (and torch for the DataLoader part).
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from pillow_sdlatent import read_latent


def rows(folder: Path) -> Iterator[dict[str, Any]]:
    """One row per ``.sdl`` file: its bytes, and what its header says (no latent decoding yet)."""
    for path in sorted(folder.rglob("*.sdl")):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data), formats=["SDL"]) as image:
            yield {"sdl": data, "path": str(path.relative_to(folder)), "model": image.info["sdl"]["model"],
                   "width": image.width, "height": image.height}


def with_latents(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Rows as training reads them: the latent tensor in place of the file's bytes."""
    batch["latent"] = [torch.from_numpy(read_latent(data)) for data in batch.pop("sdl")]
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of .sdl files (searched recursively)")
    parser.add_argument("--save", type=Path, help="also save the dataset here (save_to_disk)")
    args = parser.parse_args()

    features = datasets.Features({"sdl": datasets.Value("binary"), "path": datasets.Value("string"),
                                  "model": datasets.Value("string"), "width": datasets.Value("int32"),
                                  "height": datasets.Value("int32")})
    dataset = datasets.Dataset.from_generator(rows, gen_kwargs={"folder": args.folder}, features=features)
    print(dataset)
    sizes = [len(data) for data in dataset["sdl"]]
    print(f"{len(sizes)} files, {np.mean(sizes):.0f} bytes per image on average")
    if args.save:
        dataset.save_to_disk(args.save)
        print(f"saved to {args.save}")

    first = dataset.with_transform(with_latents)[0]
    latent = first["latent"]
    print(f"row 0: {first['path']} {first['width']}x{first['height']} {first['model']}: latent "
          f"{tuple(latent.shape)} {latent.dtype}, mean {latent.mean():.3f}, std {latent.std():.3f}; "
          f"as float16 it would take {latent.numel() * 2} bytes, the .sdl file takes {sizes[0]}")
    size = (first["width"], first["height"])
    same_shape = dataset.filter(lambda row: (row["width"], row["height"]) == size).with_transform(with_latents)
    loader = torch.utils.data.DataLoader(
        same_shape, batch_size=4, collate_fn=lambda items: torch.stack([item["latent"] for item in items]))
    batch = next(iter(loader))
    print(f"a DataLoader batch of the {len(same_shape)} rows of that size: {tuple(batch.shape)} {batch.dtype}")


if __name__ == "__main__":
    main()
