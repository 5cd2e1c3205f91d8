"""Pillow's own expectations of an image plugin, tried as Pillow's, pillow-heif's and pillow-jxl's tests try them.

Small crops of a real photo with the real TAESD weights, so that every scenario decodes for real.
"""

from __future__ import annotations

import io
import multiprocessing
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile, ImageOps, ImageSequence, UnidentifiedImageError

import pillow_sdlatent
from pillow_sdlatent import pipeline
from pillow_sdlatent.options import DecodeOptions
from pillow_sdlatent.SdlImagePlugin import thumbnail_size
from tests.conftest import psnr

ORIENTATION = 0x0112
XMP_ROTATED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
               b"</rdf:RDF></x:xmpmeta>")


@pytest.fixture(scope="module")
def small(photo: Image.Image) -> Image.Image:
    return photo.crop((64, 40, 128, 88))


@pytest.fixture(scope="module")
def files(small: Image.Image, photo: Image.Image, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 64x48 file with EXIF (rotated 90°), ICC and XMP; a 250x10 one; a 96x80 greyscale one at a step
    where the restorer runs."""
    folder = tmp_path_factory.mktemp("sdl")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    paths = {"small": folder / "small.sdl", "thin": folder / "thin.sdl", "grey": folder / "grey.sdl"}
    small.save(paths["small"], exif=exif, icc_profile=icc, xmp=XMP_ROTATED)
    # an unknown save option is ignored, as Pillow's own formats ignore them
    photo.resize((250, 10), Image.Resampling.LANCZOS).save(paths["thin"], coder="zstd", not_an_option=1)
    photo.crop((0, 0, 96, 80)).convert("L").save(paths["grey"], quality=50, scale=1)
    return paths


@pytest.fixture(scope="module")
def decoded(files: dict[str, Path]) -> dict[str, Image.Image]:
    return {name: pipeline.decode_file(path) for name, path in files.items()}


def test_registration_and_basics(files: dict[str, Path]) -> None:
    assert Image.registered_extensions()[".sdl"] == "SDL"
    assert Image.MIME["SDL"] == "image/x-sdl"
    with Image.open(files["small"]) as image:
        assert image.format == "SDL" and image.get_format_mimetype() == "image/x-sdl"
        assert image.size == (64, 48) and image.mode == "RGB"


def test_importing_changes_nothing_else_in_pillow() -> None:
    """Importing the plugin registers the format and leaves every Pillow function as it was."""
    script = (
        "from PIL import Image\n"
        "Image.init()\n"
        "methods = dict(vars(Image.Image))\n"
        "tables = {name: dict(getattr(Image, name)) for name in ('OPEN', 'SAVE', 'SAVE_ALL', 'EXTENSION', 'MIME', "
        "'DECODERS', 'ENCODERS')}\n"
        "import pillow_sdlatent\n"
        "changed = sorted(name for name, value in vars(Image.Image).items() if methods.get(name) is not value)\n"
        "added = sorted(f'{table}:{key}' for table, before in tables.items() for key in getattr(Image, table) "
        "if key not in before)\n"
        "print(changed, added, Image.Image.save.__module__, hasattr(Image.Image.save, '__wrapped__'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == (
        "[] ['DECODERS:SDL', 'EXTENSION:.sdl', 'MIME:SDL', 'OPEN:SDL', 'SAVE:SDL', 'SAVE_ALL:SDL'] PIL.Image False"
    )


def test_paths_file_objects_and_bytes_give_the_same_pixels(files: dict[str, Path],
                                                           decoded: dict[str, Image.Image]) -> None:
    path = files["small"]
    with open(path, "rb") as fp:
        sources = [path, str(path), fp, io.BytesIO(path.read_bytes())]
        for source in sources:
            with Image.open(source) as image:
                assert image.tobytes() == decoded["small"].tobytes()
        assert not fp.closed  # Pillow leaves a caller's file open


def test_with_block_closes_the_file(files: dict[str, Path]) -> None:
    with Image.open(files["small"]) as image:
        fp = image.fp
        assert fp is not None and not fp.closed
    assert fp.closed
    with Image.open(files["small"]) as image:
        fp = image.fp
        image.load()
    assert fp is not None and fp.closed


def test_save_to_a_non_seekable_stream(small: Image.Image) -> None:
    class WriteOnly(io.RawIOBase):
        def __init__(self) -> None:
            self.written = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:  # type: ignore[override]
            self.written += data
            return len(data)

    stream, seekable = WriteOnly(), io.BytesIO()
    small.save(stream, format="SDL", quality=40)
    small.save(seekable, format="SDL", quality=40)
    assert stream.seekable() is False and bytes(stream.written) == seekable.getvalue()


def test_copy_and_reduce(files: dict[str, Path], decoded: dict[str, Image.Image]) -> None:
    with Image.open(files["small"]) as image:
        copied = image.copy()
        copied.putpixel((0, 0), (1, 2, 3))
        assert image.tobytes() == decoded["small"].tobytes()  # the copy is its own image
    assert copied.tobytes()[3:] == decoded["small"].tobytes()[3:]
    with Image.open(files["grey"]) as image:
        reduced = image.reduce(3)
    assert reduced.size == (32, 27) and reduced.tobytes() == decoded["grey"].reduce(3).tobytes()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_behaves_like_the_original(files: dict[str, Path], decoded: dict[str, Image.Image],
                                          protocol: int) -> None:
    original = Image.open(files["small"])
    restored = pickle.loads(pickle.dumps(original, protocol))
    assert isinstance(restored, type(original))
    assert (restored.format, restored.size, restored.mode) == ("SDL", (64, 48), "RGB")
    assert restored.info == original.info and restored.getexif()[ORIENTATION] == 6
    assert restored.decode_options == original.decode_options
    assert restored.tobytes() == decoded["small"].tobytes()
    assert restored.draft("RGB", (8, 6)) is None  # already loaded, as the original is now
    for image in (original, restored):
        image.thumbnail((16, 16))
    assert restored.size == original.size == (16, 12) and restored.tobytes() == original.tobytes()
    original.close()


def test_pickle_of_a_preview(files: dict[str, Path]) -> None:
    with Image.open(files["small"]) as image:
        image.draft("RGB", (8, 6))
        restored = pickle.loads(pickle.dumps(image))
        assert restored.size == image.size == (8, 6) and restored.tobytes() == image.tobytes()


@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(1, 400), st.integers(1, 400))
@settings(max_examples=300, deadline=None)
def test_thumbnail_size_is_pillows(width: int, height: int, box_width: int, box_height: int) -> None:
    plain = Image.new("1", (width, height))
    plain.thumbnail((box_width, box_height), reducing_gap=None)
    expected = None if plain.size == (width, height) else plain.size
    assert thumbnail_size((width, height), (box_width, box_height)) == expected


@pytest.mark.parametrize("box", [(30, 30), (31, 2), (8, 8), (1, 1), (16, 100), (32, 32), (100, 100)])
def test_thumbnail_of_a_thin_image_matches_a_png(files: dict[str, Path], box: tuple[int, int]) -> None:
    png = io.BytesIO()
    Image.new("RGB", (250, 10)).save(png, format="PNG")
    with Image.open(png) as reference, Image.open(files["thin"]) as image:
        reference.thumbnail(box)
        image.thumbnail(box)
        assert image.size == reference.size


def test_thumbnail_from_the_preview_is_close_to_the_full_decode(files: dict[str, Path],
                                                                decoded: dict[str, Image.Image]) -> None:
    with Image.open(files["thin"]) as image:
        image.thumbnail((30, 30))
        assert image.size == (30, 1)
    exact = decoded["thin"].copy()
    exact.thumbnail((30, 30))
    assert psnr(exact, image) > 20


def test_draft_returns_the_originals_area_in_the_reduced_image(files: dict[str, Path]) -> None:
    """As JPEG's draft: ``resize(size, box=box)`` after ``draft`` takes the whole picture."""
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48)).save(jpeg, format="JPEG")
    with Image.open(jpeg) as reference, Image.open(files["small"]) as image:
        assert image.draft("RGB", (8, 6)) == reference.draft("RGB", (8, 6)) == ("RGB", (0, 0, 8, 6))
        assert image.size == reference.size == (8, 6)
        assert image.resize((4, 3), box=(0, 0, 8, 6)).size == (4, 3)
    with Image.open(files["thin"]) as image:
        mode, box = image.draft("RGB", (31, 2)) or (None, None)
        assert (mode, box, image.size) == ("RGB", (0, 0, 250 / 8, 10 / 8), (32, 2))
        assert image.resize((25, 1), box=box).size == (25, 1)


def test_thumbnail_without_reducing_gap_is_an_exact_resize(files: dict[str, Path],
                                                           decoded: dict[str, Image.Image]) -> None:
    with Image.open(files["small"]) as image:
        image.thumbnail((8, 8), reducing_gap=None)
        expected = decoded["small"].resize((8, 6), Image.Resampling.BICUBIC)
        assert image.size == (8, 6) and image.tobytes() == expected.tobytes()


def test_incremental_parser(files: dict[str, Path], decoded: dict[str, Image.Image]) -> None:
    """``ImageFile.Parser`` (fed a file piece by piece, as a web upload is) decodes once the file is complete."""
    data = files["small"].read_bytes()
    parser = ImageFile.Parser()
    for start in range(0, len(data), 100):
        parser.feed(data[start : start + 100])
    assert parser.close().tobytes() == decoded["small"].tobytes()
    truncated = ImageFile.Parser()
    truncated.feed(data[:-60])
    with pytest.raises(OSError, match="incomplete"):
        truncated.close()


def test_frames(files: dict[str, Path]) -> None:
    with Image.open(files["small"]) as image:
        assert (image.n_frames, image.is_animated, image.tell()) == (1, False, 0)
        image.seek(0)
        with pytest.raises(EOFError):
            image.seek(1)
        assert image.tell() == 0
        assert len(list(ImageSequence.Iterator(image))) == 1


def test_save_all_writes_the_first_frame(small: Image.Image) -> None:
    single = io.BytesIO()
    small.save(single, format="SDL", save_all=True)
    plain = io.BytesIO()
    small.save(plain, format="SDL")
    assert single.getvalue() == plain.getvalue()
    gif = io.BytesIO()
    red, blue = Image.new("RGB", (32, 24), (220, 30, 30)), Image.new("RGB", (32, 24), (30, 30, 220))
    red.save(gif, format="GIF", save_all=True, append_images=[blue])
    with Image.open(gif) as animation:
        animation.seek(1)
        first = io.BytesIO()
        with pytest.warns(UserWarning, match="first of 2"):
            animation.save(first, format="SDL", save_all=True)
        assert animation.tell() == 1
    with pytest.warns(UserWarning, match="first of 3"):
        red.save(io.BytesIO(), format="SDL", save_all=True, append_images=[blue, blue])
    with Image.open(first) as image:
        assert image.n_frames == 1 and psnr(red, image) > 25


def test_exif_orientation_icc_and_xmp(files: dict[str, Path], decoded: dict[str, Image.Image]) -> None:
    with Image.open(files["small"]) as image:
        assert image.getexif()[ORIENTATION] == 6
        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        assert "sRGB" in ImageCms.getProfileDescription(profile)
        assert image.info["xmp"] == XMP_ROTATED
        upright = ImageOps.exif_transpose(image)
    assert upright.size == (48, 64)
    assert upright.tobytes() == decoded["small"].transpose(Image.Transpose.ROTATE_270).tobytes()
    assert ORIENTATION not in upright.getexif() and b"Orientation" not in upright.info["xmp"]


def test_formats_argument(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with Image.open(files["small"], formats=["SDL"]) as image:
        assert image.format == "SDL"
    with pytest.raises(UnidentifiedImageError):
        Image.open(files["small"], formats=["PNG"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 2 - 1)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(files["small"], formats=["SDL"])


def test_verify_closes_the_file_and_a_reopened_one_loads(files: dict[str, Path],
                                                         decoded: dict[str, Image.Image]) -> None:
    image = Image.open(files["grey"])
    fp = image.fp
    image.verify()
    assert fp is not None and fp.closed
    with Image.open(files["grey"]) as image:
        assert image.tobytes() == decoded["grey"].tobytes()


def test_truncated_file(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truncated = tmp_path / "truncated.sdl"
    truncated.write_bytes(files["grey"].read_bytes()[:-60])
    with Image.open(truncated) as image, pytest.raises(OSError, match="truncated"):
        image.load()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(truncated) as image:
        image.load()
        assert (image.size, image.mode) == ((96, 80), "L")
    with Image.open(truncated) as image:
        image.thumbnail((12, 12))
        assert image.size == (12, 10)


def test_decode_options_are_validated_when_set(files: dict[str, Path], decoded: dict[str, Image.Image]) -> None:
    with Image.open(files["grey"]) as image:
        assert image.decode_options == DecodeOptions()
        for bad in ({"modle": "sd-vae"}, {"restore": "no"}, {"seed": -1}, {"seed": 1.5}, {"model": "nope"},
                    {"device": 0}, {"weights": 3}, {"allow_digest_mismatch": 1}, {"denoise": True}):
            with pytest.raises(ValueError):
                image.decode_options = bad
        image.decode_options = {"restore": False, "weights": Path("/nowhere")}
        assert image.decode_options == DecodeOptions(restore=False, weights="/nowhere")
        with pytest.raises(FrozenInstanceError):
            image.decode_options.restore = True  # type: ignore[misc]
        image.decode_options = DecodeOptions(restore=False)
        image.load()
    assert image.tobytes() == pipeline.decode_file(files["grey"], restore=False).tobytes()
    assert image.tobytes() != decoded["grey"].tobytes()  # the restorer runs by default on this file


def test_decode_file_refuses_an_unknown_option_before_any_work(files: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was read before the options were checked")

    monkeypatch.setattr(pipeline, "latent_from_layout", no_work)
    with pytest.raises(ValueError, match="restor"):
        pipeline.decode_file(files["small"], restor=False)
    with pytest.raises(ValueError, match="seed"):
        pillow_sdlatent.decode_file(files["small"], seed="zero")


def _load_each(paths: list[Path], restore: bool) -> list[bytes]:
    pixels = []
    for path in paths:
        with open(path, "rb") as fp, Image.open(fp) as image:
            image.decode_options = {"restore": restore}
            pixels.append(image.tobytes())
    return pixels


def test_threads_give_the_serial_pixels(files: dict[str, Path]) -> None:
    """Threads load different files, each with its own options, and get what a serial run gets."""
    jobs = [([files["small"], files["grey"]], True), ([files["grey"], files["thin"]], False),
            ([files["thin"], files["small"]], True), ([files["small"]], False)]
    serial = [_load_each(*job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        threaded = list(pool.map(lambda job: _load_each(*job), jobs))
    assert threaded == serial


def _open_and_load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


@pytest.mark.slow
def test_spawned_processes_decode(files: dict[str, Path], decoded: dict[str, Image.Image]) -> None:
    """A 'spawn' pool (the default on macOS and Windows) registers the plugin through its initializer.

    Slow: each fresh process imports torch and loads the decoder.
    """
    names = ["small", "thin"]
    with multiprocessing.get_context("spawn").Pool(2, initializer=pillow_sdlatent.register) as pool:
        images = pool.map(_open_and_load, [files[name] for name in names])
    for name, image in zip(names, images, strict=True):
        assert image.format == "SDL" and image.tobytes() == decoded[name].tobytes()
