"""Faces coded with finer steps: the QREG chunk (FORMAT.md), its dequantization to the bit, its refusals, and
what the ``faces`` save option does to a photo with a face at a fixed rate."""

from __future__ import annotations

import dataclasses
import io
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent import faces, pipeline, rate
from pillow_sdlatent.core import container, quantize, read
from tests.conftest import SHARED, VECTORS, psnr
from tests.fuzzing import PREFIX_LENGTH, Chunk, join, split

#: a training photo with one face, about 80 px wide (BSDS500 122048, 481x321)
FACE_PHOTO = SHARED / "data" / "train" / "BSDS500" / "122048.jpg"
OVERLAPPING = (container.Region(1, 1, 5, 4, 0.5), container.Region(3, 2, 8, 6, 0.25))


def reference_factor(regions: tuple[container.Region, ...], y: int, x: int) -> float:
    """FORMAT.md: the smallest factor of the regions holding (y, x), else 1."""
    return min([r.factor for r in regions if r.x0 <= x < r.x1 and r.y0 <= y < r.y1], default=1.0)


def reference_klt(quantizer: quantize.KltQuantizer, symbols: np.ndarray) -> np.ndarray:
    """FORMAT.md's klt pseudo-code, one position at a time in Python floats (binary64, no fused operations)."""
    matrix, mean, (channels, height, width) = quantizer.transform.matrix, quantizer.transform.mean, symbols.shape
    out = np.empty(symbols.shape, dtype=np.float32)
    for y in range(height):
        for x in range(width):
            f = reference_factor(quantizer.regions, y, x)
            values = [float(symbols[k, y, x]) * quantizer.steps[k] for k in range(channels)]
            values = [v * f for v in values] if f != 1 else values
            for c in range(channels):
                acc = 0.0
                for k in range(channels):
                    acc = acc + float(matrix[k, c]) * values[k]
                out[c, y, x] = np.float32(acc + float(mean[c]))
    return out


def vector_layout(name: str) -> tuple[bytes, container.Layout, np.ndarray]:
    data = (VECTORS / f"{name}.sdl").read_bytes()
    fp = io.BytesIO(data)
    layout = container.read_layout(fp)
    return data, layout, read.read_symbols(layout, container.read_payload(fp, layout))


def test_klt_vector_follows_the_format_to_the_bit() -> None:
    data, layout, symbols = vector_layout("taesd3_klt_ctx3_qreg")
    assert layout.regions == OVERLAPPING
    quantizer = dataclasses.replace(read.file_quantizer(layout.header), regions=layout.regions)
    expected = reference_klt(quantizer, symbols)
    np.testing.assert_array_equal(pillow_sdlatent.read_latent(data), expected)
    plain = read.file_quantizer(layout.header).dequantize(symbols)
    outside = np.array([[reference_factor(OVERLAPPING, y, x) == 1 for x in range(8)] for y in range(6)])
    np.testing.assert_array_equal(expected[:, outside], plain[:, outside])
    assert not np.array_equal(expected[:, ~outside], plain[:, ~outside])


def test_uniform_vector_follows_the_format_to_the_bit() -> None:
    data, layout, symbols = vector_layout("taesd_ctx2_qreg")
    steps = np.asarray(read.file_quantizer(layout.header).steps, dtype=np.float32)
    factors = np.array([[reference_factor(layout.regions, y, x) for x in range(8)] for y in range(6)], np.float32)
    expected = (symbols.astype(np.float32) * steps[:, None, None]) * factors  # two float32 products
    np.testing.assert_array_equal(pillow_sdlatent.read_latent(data), expected)
    assert factors.min() == np.float32(0.25) and (factors == 1).sum() == 48 - (12 + 20 - 4)


def test_regions_round_trip_through_the_container() -> None:
    shape = (4, 6, 8)
    data = container.regions_to_bytes(OVERLAPPING, shape)
    assert len(data) == 2 + 20 * 2
    assert container.regions_from_bytes(data, shape) == OVERLAPPING


@pytest.mark.parametrize("region, message", [
    (container.Region(0, 0, 9, 6, 0.5), "not within"),
    (container.Region(3, 0, 3, 6, 0.5), "not within"),
    (container.Region(0, 0, 8, 6, 1.5), "float32 in"),
    (container.Region(0, 0, 8, 6, 0.0), "float32 in"),
    (container.Region(0, 0, 8, 6, 0.3), "float32 in"),  # 0.3 is not a float32
    (container.Region(0, 0, 8, 6, float("nan")), "float32 in"),
])
def test_a_writer_refuses_regions_a_reader_would(region: container.Region, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        container.regions_to_bytes((region,), (4, 6, 8))


def with_qreg(data: bytes, qreg: bytes, before: bytes = container.PAYLOAD) -> bytes:
    """``data`` with a QREG chunk of ``qreg`` (correct CRC) inserted before its ``before`` chunk."""
    chunks, trailer = split(data)
    chunks.insert(next(i for i, chunk in enumerate(chunks) if chunk.type == before), Chunk(container.REGIONS, qreg))
    return join(data[:PREFIX_LENGTH], chunks, trailer)


@pytest.mark.parametrize("qreg, before, message", [
    (struct.pack(">HIIIIf", 1, 0, 0, 9, 6, 0.5), container.PAYLOAD, "not within"),
    (struct.pack(">HIIIIf", 2, 0, 0, 8, 6, 0.5), container.PAYLOAD, "region count"),
    (struct.pack(">H", 0), container.PAYLOAD, "0 regions"),
    (struct.pack(">HIIIIf", 1, 0, 0, 8, 6, 2.0), container.PAYLOAD, "float32 in"),
    (struct.pack(">HIIIIf", 1, 0, 0, 8, 6, 0.5), container.END, "after the payload"),
])
def test_a_damaged_qreg_is_an_os_error(qreg: bytes, before: bytes, message: str) -> None:
    plain = (VECTORS / "taesd_ctx2_rgb.sdl").read_bytes()
    with pytest.raises(OSError, match=message):
        Image.open(io.BytesIO(with_qreg(plain, qreg, before)))


def test_a_second_qreg_is_refused() -> None:
    data = (VECTORS / "taesd_ctx2_qreg.sdl").read_bytes()
    with pytest.raises(OSError, match="duplicate"):
        Image.open(io.BytesIO(with_qreg(data, struct.pack(">HIIIIf", 1, 0, 0, 8, 6, 0.5))))


def test_the_faces_option_is_checked(photo: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="faces must be"):
        photo.save(io.BytesIO(), format="SDL", faces="yes")
    monkeypatch.setattr(faces, "available", lambda: False)
    with pytest.raises(ValueError, match="needs OpenCV"):
        photo.save(io.BytesIO(), format="SDL", faces=True)
    assert b"QREG" not in pipeline.encode_image(photo)  # without OpenCV the default finds no faces


@pytest.fixture(scope="module")
def face_photo() -> Image.Image:
    pytest.importorskip("cv2")
    with Image.open(FACE_PHOTO) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def face_files(face_photo: Image.Image) -> dict[bool, bytes]:
    return {wanted: pipeline.encode_image(face_photo, {"bpp": 0.15, "faces": wanted}) for wanted in (False, True)}


def test_a_face_is_found_and_recorded(face_photo: Image.Image, face_files: dict[bool, bytes]) -> None:
    (box,) = faces.face_boxes(face_photo)
    assert 70 < box[2] - box[0] < 130  # the one face, about 100 px wide
    layout = container.read_layout(io.BytesIO(face_files[True]))
    (region,) = layout.regions
    assert region.factor == faces.FACE_STEP_FACTOR
    coded_width = layout.header.coded[0]
    assert region.x0 * 8 <= box[0] * coded_width / face_photo.width < box[2] * coded_width / face_photo.width <= \
        region.x1 * 8
    assert container.read_layout(io.BytesIO(face_files[False])).regions == ()
    assert pipeline.encode_image(face_photo, {"bpp": 0.15}) == face_files[True]  # the default with OpenCV


def test_the_face_keeps_more_of_itself_at_the_same_rate(face_photo: Image.Image,
                                                         face_files: dict[bool, bytes]) -> None:
    """The same bytes (both in rate control's window); the face crop gains more than 1 dB, the whole photo loses
    less than 0.2 dB."""
    without, with_faces = (np.asarray(pipeline.decode_file(face_files[wanted])) for wanted in (False, True))
    target = int(0.15 * face_photo.width * face_photo.height / 8)
    assert all((1 - rate.RATE_TOLERANCE) * target <= len(data) <= target for data in face_files.values())
    x0, y0, x1, y1 = faces.face_boxes(face_photo)[0]
    original = np.asarray(face_photo)
    face_gain = psnr(original[y0:y1, x0:x1], with_faces[y0:y1, x0:x1]) - psnr(original[y0:y1, x0:x1],
                                                                              without[y0:y1, x0:x1])
    whole_loss = psnr(original, without) - psnr(original, with_faces)
    assert face_gain > 1.0 and whole_loss < 0.2, (face_gain, whole_loss)


def test_faces_are_found_alike_from_many_threads(face_photo: Image.Image) -> None:
    """One shared cascade, detections one at a time: threads find what a serial run finds."""
    crops = [face_photo.crop((100 + 8 * i, 40 + 4 * i, 400 + 8 * i, 280 + 4 * i)) for i in (0, 1, 5) * 2]
    serial = [faces.face_boxes(crop) for crop in crops]
    assert all(len(boxes) == 1 for boxes in serial)
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(faces.face_boxes, crops)) == serial


def test_the_command_line_codes_faces_and_shows_them(face_photo: Image.Image, tmp_path: Path, capsys) -> None:
    from pillow_sdlatent.cli import main

    face_photo.save(tmp_path / "face.png")
    for flag in ("--faces", "--no-faces"):
        out = tmp_path / f"{flag.strip('-')}.sdl"
        assert main(["encode", str(tmp_path / "face.png"), "-o", str(out), "-q", "60", flag]) == 0
        capsys.readouterr()
        assert main(["info", str(out)]) == 0
        shown = capsys.readouterr().out
        assert ("finer regions   1 (step x 0.5)" in shown) == (flag == "--faces"), shown


def test_at_a_quality_the_face_takes_its_bytes_from_the_rest(face_photo: Image.Image) -> None:
    """A quality means about the same file with or without faces: the base step grows to pay for them (at the
    default quality, where this photo is coded with taesd3; taesd holds no more of this face at finer steps)."""
    files = {wanted: pipeline.encode_image(face_photo, {"faces": wanted}) for wanted in (False, True)}
    assert abs(len(files[True]) / len(files[False]) - 1) < 0.08, {k: len(v) for k, v in files.items()}
    x0, y0, x1, y1 = faces.face_boxes(face_photo)[0]
    original = np.asarray(face_photo)[y0:y1, x0:x1]
    decoded = {wanted: np.asarray(pipeline.decode_file(data))[y0:y1, x0:x1] for wanted, data in files.items()}
    assert psnr(original, decoded[True]) > psnr(original, decoded[False]) + 0.5


def test_the_latent_restorer_restores_a_face_at_its_own_step(face_photo: Image.Image,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """At quality 20 (taesd, base step about 1.0, where the latent restorer runs) the face's finer step reaches
    the restorer as a plane: the face crop decodes 0.64 dB closer than restored at the base step everywhere,
    and the whole photo no worse (measured: 17.02 against 16.38 dB, whole 20.49 against 20.45). The encoder's
    latent, not refined for one of the two decodes."""
    from pillow_sdlatent.enhance import effort, restore

    monkeypatch.setattr(effort, "available", lambda: False)
    data = pipeline.encode_image(face_photo, {"quality": 20})
    layout = container.read_layout(io.BytesIO(data))
    step = max(read.file_quantizer(layout.header).steps)
    assert layout.regions and restore.restores_latent(layout.header.model, step, pipeline.coded_scale(layout.header))
    x0, y0, x1, y1 = faces.face_boxes(face_photo)[0]
    original = np.asarray(face_photo)
    own_steps = np.asarray(pipeline.decode_file(data))
    monkeypatch.setattr(restore, "restorer_steps", lambda step, *_: step)
    base_step = np.asarray(pipeline.decode_file(data))
    face_gain = psnr(original[y0:y1, x0:x1], own_steps[y0:y1, x0:x1]) - psnr(original[y0:y1, x0:x1],
                                                                            base_step[y0:y1, x0:x1])
    assert face_gain > 0.4 and psnr(original, own_steps) >= psnr(original, base_step) - 0.01, face_gain


def test_the_face_is_refined_for_its_quantized_version(face_photo: Image.Image, face_files: dict[bool, bytes],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """At effort 0 the face's latent is refined for the decode its file gets (``effort.refine_regions``): in the
    same bytes the face crop decodes closer and the whole photo no worse (measured at 0.15 bpp: face +0.85 dB,
    whole +0.03 dB). Without torch the encoder keeps its latent."""
    from pillow_sdlatent.enhance import effort

    monkeypatch.setattr(effort, "available", lambda: False)
    unrefined = pipeline.encode_image(face_photo, {"bpp": 0.15})
    target = int(0.15 * face_photo.width * face_photo.height / 8)
    assert (1 - rate.RATE_TOLERANCE) * target <= len(unrefined) <= target
    x0, y0, x1, y1 = faces.face_boxes(face_photo)[0]
    original = np.asarray(face_photo)
    refined, plain = (np.asarray(pipeline.decode_file(data)) for data in (face_files[True], unrefined))
    face_gain = psnr(original[y0:y1, x0:x1], refined[y0:y1, x0:x1]) - psnr(original[y0:y1, x0:x1],
                                                                          plain[y0:y1, x0:x1])
    assert face_gain > 0.3 and psnr(original, refined) > psnr(original, plain), face_gain


@pytest.fixture(scope="module")
def face_latent(face_photo: Image.Image) -> tuple[object, np.ndarray, np.ndarray]:
    """``taesd``, the face photo's padded RGB and its latent, for refining."""
    from pillow_sdlatent.models import load_model

    model = load_model("taesd")
    rgb = pipeline.padded_rgb(face_photo)
    return model, rgb, model.encode_image(rgb)


def test_only_the_regions_latents_are_refined(face_latent: tuple[object, np.ndarray, np.ndarray]) -> None:
    """``refine_regions`` moves the positions inside the regions and no other, and brings each region's pixels
    closer to the original, through the latent restorer too (taesd at step 1.0, a face at half of it)."""
    from pillow_sdlatent.enhance import effort, restore

    model, rgb, latent = face_latent
    regions = (container.Region(20, 8, 32, 22, 0.5), container.Region(40, 10, 46, 16, 0.5))
    quantizer = quantize.UniformQuantizer.with_step(1.0, 4)
    quantizer = dataclasses.replace(quantizer, regions=regions)
    assert restore.restores_latent("taesd", 1.0, 1.0)
    refined = effort.refine_regions(model, latent, rgb, quantizer)
    inside = np.zeros(latent.shape[1:], dtype=bool)
    for region in regions:
        inside[region.y0:region.y1, region.x0:region.x1] = True
    assert np.array_equal(refined[:, ~inside], latent[:, ~inside]) and not np.array_equal(refined, latent)

    def decoded(values: np.ndarray) -> np.ndarray:
        stored = quantizer.dequantize(quantizer.quantize(values))
        steps = restore.restorer_steps(1.0, regions, *latent.shape[1:])
        return model.decode_image(restore.restore_latent(stored, steps, "taesd"))

    before, after = decoded(latent), decoded(refined)
    for region in regions:
        pixels = (slice(8 * region.y0, 8 * region.y1), slice(8 * region.x0, 8 * region.x1))
        assert psnr(rgb[pixels], after[pixels]) > psnr(rgb[pixels], before[pixels]) + 0.3


def test_faces_past_the_refinement_budget_keep_the_encoders_latent(
        face_latent: tuple[object, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """Smaller faces first; a face whose window no longer fits ``REGION_BUDGET`` is left as the encoder made it."""
    from pillow_sdlatent.enhance import effort

    model, rgb, latent = face_latent
    small, large = container.Region(40, 10, 44, 14, 0.5), container.Region(10, 8, 22, 20, 0.5)
    quantizer = dataclasses.replace(quantize.UniformQuantizer.with_step(0.5, 4), regions=(large, small))
    monkeypatch.setattr(effort, "REGION_BUDGET", (4 + 2 * effort.REGION_CONTEXT) ** 2)  # the small one's window
    refined = effort.refine_regions(model, latent, rgb, quantizer)
    changed = np.any(refined != latent, axis=0)
    assert changed[small.y0:small.y1, small.x0:small.x1].any() and not changed[large.y0:large.y1,
                                                                               large.x0:large.x1].any()
