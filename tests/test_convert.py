"""Batch conversion: a Ray actor pool or this process, bad files as report rows, reruns that skip."""

from __future__ import annotations

import csv
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pillow_sdlatent import encode_images, read_latent
from pillow_sdlatent.cli import main
from pillow_sdlatent.convert import convert, plan
from tests.conftest import REPO, psnr

OPTIONS = {"quality": 60, "scale": 1}


def bomb_png() -> bytes:
    """A PNG header claiming 60000x60000 pixels: Pillow refuses it as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture()
def photo_tree(photo: Image.Image, tmp_path: Path) -> Path:
    """Three small photos (one in a subfolder, one JPEG), a garbage PNG and a decompression bomb."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    photo.crop((0, 0, 96, 64)).save(root / "a.png")
    photo.crop((96, 0, 192, 64)).save(root / "b.png")
    photo.crop((0, 64, 64, 128)).save(root / "sub" / "c.jpg", quality=95)
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "sub" / "bomb.png").write_bytes(bomb_png())
    (root / "notes.txt.bak").write_text("not an image suffix: never picked up")
    return root


def report_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fp:
        return {Path(row["source"]).name: row for row in csv.DictReader(fp)}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.mark.slow  # a local Ray cluster starts in about a minute on 2 cores
def test_ray_pool_converts_isolates_bad_files_and_resumes(ray_cluster: None, photo_tree: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "sdl"
    summary = convert([photo_tree], out, engine="ray", workers=2, options=OPTIONS)
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, 2)
    rows = report_rows(out / "convert-report.csv")
    assert sorted(rows) == ["a.png", "b.png", "bomb.png", "c.jpg", "garbage.png"]
    assert "DecompressionBombError" in rows["bomb.png"]["error"] and rows["garbage.png"]["outcome"] == "failed"
    for name, target, pixels in (("a.png", out / "a.sdl", 96 * 64), ("c.jpg", out / "sub" / "c.sdl", 64 * 64)):
        assert rows[name]["outcome"] == "done" and int(rows[name]["bytes"]) == target.stat().st_size
        assert float(rows[name]["bpp"]) == pytest.approx(target.stat().st_size * 8 / pixels, abs=1e-4)

    before = {path: path.stat().st_mtime_ns for path in out.rglob("*.sdl")}
    (out / "b.sdl").write_bytes((out / "b.sdl").read_bytes()[:-7])  # a damaged output is done again
    again = convert([photo_tree], out, engine="ray", workers=2, options=OPTIONS)
    assert (again.done, again.skipped, again.failed) == (1, 2, 2)
    assert report_rows(out / "convert-report.csv")["b.png"]["outcome"] == "done"
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in before.items() if path.name != "b.sdl")
    with Image.open(out / "b.sdl") as image:
        image.verify()
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


def test_local_engine_latents_png_and_a_manifest(photo_tree: Path, tmp_path: Path) -> None:
    sdl = tmp_path / "a.sdl"
    with Image.open(photo_tree / "a.png") as image:
        sdl.write_bytes(encode_images([image], OPTIONS)[0])
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# a manifest\nphotos/b.png\n\n{sdl}\nphotos/sub/c.jpg\n")
    summary = convert([manifest], tmp_path / "npy", to="latent", engine="local", options=OPTIONS, progress=False,
                      report=tmp_path / "report.parquet")
    assert (summary.done, summary.failed) == (3, 0)
    assert np.array_equal(np.load(tmp_path / "npy" / "a.npy"), read_latent(sdl))
    with Image.open(photo_tree / "b.png") as image:
        expected = read_latent(encode_images([image], OPTIONS)[0])
    assert np.array_equal(np.load(tmp_path / "npy" / "photos" / "b.npy"), expected)
    assert np.load(tmp_path / "npy" / "photos" / "sub" / "c.npy").shape == (4, 8, 8)
    decoded = convert([sdl], tmp_path / "png", to="png", engine="local", progress=False)
    assert (decoded.done, decoded.failed) == (1, 0)
    with Image.open(photo_tree / "a.png") as original, Image.open(tmp_path / "png" / "a.png") as image:
        assert psnr(original, image) > 22
    pyarrow = pytest.importorskip("pyarrow.parquet")
    table = pyarrow.read_table(tmp_path / "report.parquet").to_pydict()
    assert table["outcome"] == ["done"] * 3 and min(table["bytes"]) > 128


def test_outputs_that_would_collide_fail_instead_of_overwriting(tmp_path: Path) -> None:
    for name in ("x.png", "x.jpg"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    pairs = plan([tmp_path], tmp_path / "out", "sdl")
    assert [Path(target).name for _, target in pairs] == ["x.sdl", "x.sdl"]
    summary = convert([tmp_path], tmp_path / "out", engine="local", options=OPTIONS, progress=False)
    assert (summary.done, summary.failed) == (1, 1) and "same output as" in summary.failures[0][1]


def test_cli_convert_exit_status_and_report(photo_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(photo_tree / "a.png"), str(photo_tree / "garbage.png"), "-o", str(out),
                 "--engine", "local", "-q", "60", "--scale", "1"]) == 1
    assert "1 converted, 0 already done, 1 failed" in capsys.readouterr().err
    assert main(["convert", str(photo_tree / "a.png"), "-o", str(out), "--engine", "local", "--report",
                 str(tmp_path / "r.csv")]) == 0
    assert report_rows(tmp_path / "r.csv")["a.png"]["outcome"] == "skipped"
