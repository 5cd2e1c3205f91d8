"""The `sdl` command: encode and decode many files, inspect headers without decoding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from pillow_sdlatent.cli import main
from tests.conftest import psnr


def test_encode_decode_info(photo: Image.Image, tmp_path: Path, capsys) -> None:
    sources = []
    for index in range(2):
        source = tmp_path / f"in{index}.png"
        photo.rotate(180 * index).save(source)
        sources.append(source)
    assert main(["encode", *map(str, sources), "--out-dir", str(tmp_path / "sdl"), "-q", "60", "--scale", "1"]) == 0
    encoded = sorted((tmp_path / "sdl").glob("*.sdl"))
    assert [p.name for p in encoded] == ["in0.sdl", "in1.sdl"]
    assert main(["decode", *map(str, encoded), "--out-dir", str(tmp_path / "png")]) == 0
    for index, source in enumerate(sources):
        with Image.open(tmp_path / "png" / f"in{index}.png") as decoded, Image.open(source) as original:
            assert psnr(original, decoded) > 22
    capsys.readouterr()
    assert main(["info", str(encoded[0])]) == 0
    out = capsys.readouterr().out
    assert "192x128" in out and "taesd" in out and "4x16x24" in out and "version  1.0" in out
    assert main(["encode", str(sources[0]), "-o", str(tmp_path / "half.sdl"), "-q", "60", "--scale", "0.5"]) == 0
    assert main(["info", str(tmp_path / "half.sdl")]) == 0
    assert "latent          4x8x12  of the image resized to 96x64" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.tmp"))


def test_failures_are_reported_and_do_not_stop_the_batch(photo: Image.Image, tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.png"
    photo.save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["encode", str(bad), str(good)]) == 1
    assert (tmp_path / "good.sdl").exists() and not (tmp_path / "bad.sdl").exists()
    assert "bad.png" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run([sys.executable, "-m", "pillow_sdlatent.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "encode" in result.stdout
