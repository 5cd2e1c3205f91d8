"""Nothing lost on failure where the package owns the write: ``pillow_sdlatent.save`` and the CLI leave no
partial ``.sdl`` and never break an existing file.

They encode in memory, then rename into place (``pillow_sdlatent._atomic``).
A plain ``Image.save`` to a path is Pillow's: Pillow opens (truncating) the
target before the save handler runs, as for every format.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from pillow_sdlatent import save
from pillow_sdlatent.cli import main
from pillow_sdlatent.models import WeightsNotFoundError

PRECIOUS = b"an existing file that must survive"


@pytest.fixture(scope="module")
def small(photo: Image.Image) -> Image.Image:
    return photo.crop((0, 0, 24, 16))


def _no_space(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _bad_option(image: Image.Image, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(image, target, quality=1000)


def _unsupported_mode(image: Image.Image, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(Image.new("I;16", (16, 16), 1000), target)


def _missing_weights(image: Image.Image, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PILLOW_SDLATENT_MODELS", str(target.parent / "no-models-here"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save(image, target, model="taesdxl", weights=str(target.parent / "nor-here"))


def _disk_full(image: Image.Image, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _no_space)
    save(image, target)


FAILURES: list[tuple[Callable[..., None], type[Exception]]] = [
    (_bad_option, ValueError), (_unsupported_mode, OSError), (_missing_weights, WeightsNotFoundError),
    (_disk_full, OSError),
]


@pytest.mark.parametrize(("fail", "error"), FAILURES, ids=lambda f: getattr(f, "__name__", ""))
def test_failed_save_to_a_new_path_creates_nothing(small: Image.Image, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   fail: Callable[..., None], error: type[Exception]) -> None:
    with pytest.raises(error):
        fail(small, tmp_path / "new.sdl", monkeypatch)
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("name", ["keep.sdl", "KEEP.SDL"])
@pytest.mark.parametrize(("fail", "error"), FAILURES, ids=lambda f: getattr(f, "__name__", ""))
def test_failed_save_keeps_an_existing_file(small: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            fail: Callable[..., None], error: type[Exception], name: str) -> None:
    target = tmp_path / name
    target.write_bytes(PRECIOUS)
    with pytest.raises(error):
        fail(small, target, monkeypatch)
    assert target.read_bytes() == PRECIOUS
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_failing_file_object(small: Image.Image) -> None:
    """The whole file is encoded before the first write, and a write error reaches the caller."""

    attempts: list[int] = []

    class Full(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            attempts.append(len(data))
            raise OSError(errno.ENOSPC, "No space left on device")

    target = Full()
    with pytest.raises(OSError, match="No space"):
        small.save(target, format="SDL")
    expected = io.BytesIO()
    small.save(expected, format="SDL")
    assert attempts == [len(expected.getvalue())]


def test_successful_save_replaces_in_place(small: Image.Image, tmp_path: Path) -> None:
    """Permissions of an existing file are kept and a symlink is written through, as ``open(path, "wb")`` does."""
    target = tmp_path / "x.sdl"
    target.write_bytes(PRECIOUS)
    target.chmod(0o640)
    link = tmp_path / "link.sdl"
    link.symlink_to(target)
    save(small, link)
    assert link.is_symlink() and (target.stat().st_mode & 0o777) == 0o640
    with Image.open(target) as image:
        assert image.format == "SDL" and image.size == small.size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.sdl", "x.sdl"]


def test_new_file_gets_the_umask_permissions(small: Image.Image, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    save(small, tmp_path / "new.sdl")
    assert (tmp_path / "new.sdl").stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_writes_what_pillow_writes(small: Image.Image, tmp_path: Path) -> None:
    """The atomic save and Pillow's own give the same file, options included."""
    save(small, tmp_path / "atomic.sdl", quality=40, coder="zstd")
    small.save(tmp_path / "pillow.sdl", quality=40, coder="zstd")
    assert (tmp_path / "atomic.sdl").read_bytes() == (tmp_path / "pillow.sdl").read_bytes()


def test_cli_writes_atomically(small: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "in.png"
    small.save(source)
    target = tmp_path / "out.sdl"
    target.write_bytes(PRECIOUS)
    assert main(["encode", str(source), "-o", str(target), "-q", "1000"]) == 1
    assert target.read_bytes() == PRECIOUS
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _no_space)
        assert main(["encode", str(source), "-o", str(target)]) == 1
        assert target.read_bytes() == PRECIOUS
    assert main(["encode", str(source), "-o", str(target)]) == 0
    with Image.open(target) as image:
        assert image.format == "SDL"
    decoded = tmp_path / "decoded.png"
    decoded.write_bytes(PRECIOUS)
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _no_space)
        assert main(["decode", str(target), "-o", str(decoded)]) == 1
    assert decoded.read_bytes() == PRECIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoded.png", "in.png", "out.sdl"]
