"""Threads: opening, loading and saving at once gives what a serial run gives, and loads each model once."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pillow_sdlatent import models

THREADS = 8


def test_threads_match_a_serial_run(photo: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs: list[tuple[Image.Image, str]] = []
    for index in range(THREADS):
        crop = photo.crop((index * 16, 8 * index, index * 16 + 32, 8 * index + 24))
        jobs.append((crop.convert(("RGB", "L", "RGBA", "LA")[index % 4]), ("taesd", "taesdxl")[index % 2]))
    for index, (image, model) in enumerate(jobs):
        image.save(tmp_path / f"in{index}.sdl", model=model)

    def work(index: int, run: str) -> tuple[bytes, bytes]:
        """Decode one file and encode another: the decoded pixels and the written bytes."""
        with Image.open(tmp_path / f"in{index}.sdl") as image:
            image.load()
            pixels = image.tobytes()
        target = tmp_path / f"out{index}-{run}.sdl"
        jobs[index][0].save(target, model=jobs[index][1])
        return pixels, target.read_bytes()

    serial = [work(index, "serial") for index in range(THREADS)]

    loads: Counter[str] = Counter()
    lock = threading.Lock()
    build = models._build_module

    def counting_build(spec: models.ModelSpec, *args: Any) -> Any:
        with lock:
            loads[spec.name] += 1
        return build(spec, *args)

    monkeypatch.setattr(models, "_models", models.LoadOnce())
    monkeypatch.setattr(models, "_build_module", counting_build)
    start = threading.Barrier(THREADS)

    def threaded(index: int) -> tuple[bytes, bytes]:
        start.wait()
        return work(index, "threaded")

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(threaded, range(THREADS)))
    assert loads == {"taesd": 1, "taesdxl": 1}
    for index in range(THREADS):
        assert concurrent[index][0] == serial[index][0], f"pixels of file {index} differ"
        assert concurrent[index][1] == serial[index][1], f"bytes of file {index} differ"
