"""Fidelity benchmark: small text, faces and whole photos, .sdl against AVIF and JPEG XL at the same bytes.

Perceptual scores can stay good while a codec changes what is in the picture (a
mouth, a letter). This measures that directly: OCR character accuracy on text
rendered at 10-28 px over photo backgrounds and on lettering found in the photos,
PSNR/MS-SSIM/ST-LPIPS on face crops and on the whole photos. Every ``.sdl`` point
is coded with the ``bpp=`` save option; AVIF and JPEG XL are then coded at the
largest quality whose file is not larger than that ``.sdl`` file. See
docs/fidelity/README.md.

    python benchmarks/fidelity.py                                  # held-out photos -> docs/fidelity/
    python benchmarks/fidelity.py --sdl-config "" --sdl-config "effort=1" --csv /tmp/new.csv --no-panels
    python benchmarks/fidelity.py --from-csv docs/fidelity/baseline.csv /tmp/new.csv   # before/after tables
    python benchmarks/fidelity.py --qualities 60 75 85 --sdl-config "" --sdl-config "model=taesd"  # quality=, not bpp=
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics import MSSSIM_MIN_SIDE, STLPIPS, ReferenceMetrics, ms_ssim, psnr
from rd import DECODE_KEYS, encode, image_paths, parse_options, sdl_available

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO.parent / "shared" / "data" / "train"
RATES = (0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
PANEL_RATES = (0.1, 0.15, 0.2)
#: held-out photos: sorted training images whose index modulo HELD_OUT_PERIOD is one of HELD_OUT_INDICES
HELD_OUT_PERIOD, HELD_OUT_INDICES = 40, (0, 20)
#: ``--choice-cards``: index % HELD_OUT_PERIOD of the photos they never use (the held-out ones and their neighbours
#: used elsewhere), and the first seed of their sentences (the benchmark's cards use 0, 1, 2, ...)
CHOICE_HELD_OUT, CHOICE_CARD_SEED = (0, 10, 20, 30), 100
#: codecs matched to the .sdl file size, with their Pillow format name
MATCHED = {"avif": "AVIF", "jxl": "JXL"}
QUALITY_RANGE = (0, 100)
FACE_ENLARGE = 1.3
#: a detection is kept when this share of its central half is skin-coloured (YCrCb box of Chai & Ngan 1999);
#: the threshold was set on training photos, where it drops carvings, walls and signs and keeps faces
SKIN_CR, SKIN_CB, MIN_SKIN_SHARE = (133, 173), (77, 127), 0.3
#: when a codec's lowest quality is still over the byte budget, the image is coded at the first of these
#: scales that fits and scaled back up (Lanczos), as one would to reach such rates with it
FALLBACK_SCALES = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
#: rendered text sizes (font size in px), two per band at least
TEXT_SIZES = (10, 12, 14, 16, 18, 20, 24, 28)
BANDS = ((14, "10-14"), (18, "15-18"), (28, "19-28"))
CARD_SIZE = (480, 272)
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "LiberationSans-Regular.ttf",
              "LiberationSerif-Regular.ttf", "FreeSans.ttf", "FreeSerif.ttf")
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
#: OCR reads a line after scaling it so the font size is about this many pixels (tesseract likes 30-40 px text)
OCR_TEXT_PX = 40
#: lettering in a photo counts when tesseract reads a word of this many letters/digits with this confidence
PHOTO_WORD_MIN_CHARS, PHOTO_WORD_MIN_CONFIDENCE = 3, 80
VOCABULARY = ("the and for you with this from open daily store market station river north road street house "
              "coffee garden museum hotel ticket exit only price sale new fresh local park bridge office city "
              "bank service centre school library music water light train platform welcome please keep closed "
              "left right entrance parking free hours monday friday sunday")
CSV_FIELDS = ["set", "kind", "image", "item", "band", "size_px", "config", "codec", "options", "rate", "quality",
              "bytes", "bpp", "psnr", "msssim", "stlpips", "acc_truth", "acc_original", "ocr", "target"]

Box = tuple[int, int, int, int]  # x0, y0, x1, y1


# ----------------------------------------------------------------------------- metric helpers


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def char_accuracy(read: str, reference: str) -> float:
    """1 - edit distance / reference length, floored at 0 (an empty read of an empty reference is 1)."""
    if not reference:
        return 1.0 if not read else 0.0
    return max(0.0, 1 - levenshtein(read, reference) / len(reference))


def is_light_on_dark(grey: np.ndarray) -> bool:
    """Whether the text in a line box is lighter than its ground: the ground is the box's border (the padding),
    the text the pixels that differ from it most."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ground = float(np.median(border))
    low, high = np.percentile(grey, (5, 95))
    return high - ground > ground - low


def ocr_lines(rgb: np.ndarray, lines: list[TextLine]) -> list[str]:
    """Tesseract's reading of each text line, in one call: the line boxes in grey, dark on light, each scaled so
    its text is ~OCR_TEXT_PX high, stacked with blank rows between them; words go back to lines by position.

    Original and decoded images go through the same steps, so only the codec differs; one call per image
    instead of one per line keeps OCR (the slowest step) affordable.
    """
    import pytesseract

    strips = []
    for line in lines:
        x0, y0, x1, y1 = line.box
        strip = Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1])).convert("L")
        if is_light_on_dark(np.asarray(strip)):
            strip = ImageOps.invert(strip)
        scale = max(1.0, OCR_TEXT_PX / line.size_px)
        strips.append(strip.resize((round(strip.width * scale), round(strip.height * scale)),
                                   Image.Resampling.LANCZOS))
    gap = OCR_TEXT_PX
    sheet = Image.new("L", (max(s.width for s in strips) + 2 * gap, sum(s.height + gap for s in strips) + gap), 255)
    tops = []
    for strip in strips:
        tops.append(gap + sum(s.height + gap for s in strips[:len(tops)]))
        sheet.paste(strip, (gap, tops[-1]))
    data = pytesseract.image_to_data(sheet, config="--psm 6", output_type=pytesseract.Output.DICT)
    words: list[list[tuple[int, str]]] = [[] for _ in lines]
    for text, left, top, height in zip(data["text"], data["left"], data["top"], data["height"], strict=True):
        centre = top + height / 2
        for index, (strip_top, strip) in enumerate(zip(tops, strips, strict=True)):
            if text.strip() and strip_top - gap / 2 <= centre < strip_top + strip.height + gap / 2:
                words[index].append((left, text.strip()))
    return [" ".join(word for _, word in sorted(found)) for found in words]


def size_band(size_px: float) -> str:
    """The size band of a text line (rendered font size, or word box height for lettering in photos)."""
    return next((name for top, name in BANDS if size_px <= top), f"{BANDS[-1][0] + 1}+")


def face_boxes(rgb: np.ndarray) -> list[Box]:
    """OpenCV's Haar frontal faces (alt2 cascade, equalised grey image) with skin in their middle, each box
    enlarged FACE_ENLARGE times about its centre."""
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    height, width = grey.shape
    boxes = []
    for x, y, w, h in cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)):
        middle = ycrcb[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4]
        skin = ((middle[..., 1] >= SKIN_CR[0]) & (middle[..., 1] <= SKIN_CR[1])
                & (middle[..., 2] >= SKIN_CB[0]) & (middle[..., 2] <= SKIN_CB[1]))
        if skin.mean() < MIN_SKIN_SHARE:
            continue
        cx, cy, half = x + w / 2, y + h / 2, FACE_ENLARGE * max(w, h) / 2
        boxes.append((max(0, round(cx - half)), max(0, round(cy - half)),
                      min(width, round(cx + half)), min(height, round(cy + half))))
    return boxes


def crop_ms_ssim(reference: np.ndarray, distorted: np.ndarray) -> float:
    """MS-SSIM of a crop; crops under MSSSIM_MIN_SIDE are first scaled up (both alike, Lanczos) to that side."""
    side = min(reference.shape[:2])
    if side < MSSSIM_MIN_SIDE:
        scale = MSSSIM_MIN_SIDE / side
        size = (round(reference.shape[1] * scale), round(reference.shape[0] * scale))
        reference, distorted = (np.asarray(Image.fromarray(a).resize(size, Image.Resampling.LANCZOS))
                                for a in (reference, distorted))
    return ms_ssim(reference, distorted)


def crop(rgb: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


# ----------------------------------------------------------------------------- test material


@dataclass
class TextLine:
    box: Box
    size_px: float
    truth: str | None  # the rendered sentence; None for lettering found in a photo
    original_ocr: str = ""


@dataclass
class Subject:
    """One coded image and what is measured on it."""

    name: str
    set: str  # "photo" or "rendered"
    rgb: np.ndarray
    faces: list[Box] = field(default_factory=list)
    lines: list[TextLine] = field(default_factory=list)


def held_out_paths(train: Path) -> list[Path]:
    return [p for i, p in enumerate(image_paths(train, None)) if i % HELD_OUT_PERIOD in HELD_OUT_INDICES]


def font_paths() -> list[Path]:
    """The FONT_FILES installed here, in that order."""
    found = {p.name: p for folder in FONT_DIRS if folder.is_dir() for p in folder.rglob("*.ttf")}
    fonts = [found[name] for name in FONT_FILES if name in found]
    if not fonts:
        raise SystemExit(f"none of {FONT_FILES} under {FONT_DIRS}; apt-get install fonts-dejavu-core")
    return fonts


def sentence(rng: random.Random, font: ImageFont.FreeTypeFont, width: int) -> str:
    """Words and a number drawn at random until the line is as wide as fits (no dictionary sentence to guess)."""
    vocabulary = VOCABULARY.split()
    words = [rng.choice(vocabulary).capitalize()]
    while True:
        candidate = rng.choice(vocabulary) if rng.random() < 0.8 else str(rng.randint(2, 9999))
        if font.getlength(" ".join([*words, candidate])) > width:
            return " ".join(words)
        words.append(candidate)


def cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image scaled to cover ``size`` and centre-cropped to it."""
    scale = max(size[0] / image.width, size[1] / image.height)
    scaled = image.resize((max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale))),
                          Image.Resampling.LANCZOS)
    left, top = (scaled.width - size[0]) // 2, (scaled.height - size[1]) // 2
    return scaled.crop((left, top, left + size[0], top + size[1]))


def text_card(background: Image.Image, font_path: Path, first_dark: bool,
              seed: int) -> tuple[np.ndarray, list[TextLine]]:
    """One line per TEXT_SIZES over a photo, each on a band that lets the photo show through; dark on light and
    light on dark alternate."""
    card = cover(background, CARD_SIZE).convert("RGB")
    rng = random.Random(seed)
    margin, y = 8, 6
    lines = []
    for index, size in enumerate(TEXT_SIZES):
        font = ImageFont.truetype(str(font_path), size)
        text = sentence(rng, font, CARD_SIZE[0] - 2 * margin - 8)
        dark_text = first_dark == (index % 2 == 0)
        left, top, right, bottom = font.getbbox(text)
        pad = max(2, size // 4)
        box = (margin - pad + left, y + top - pad, min(CARD_SIZE[0], margin + right + pad), y + bottom + pad)
        band = card.crop(box)
        tint = Image.new("RGB", band.size, (235, 235, 235) if dark_text else (25, 25, 25))
        card.paste(Image.blend(band, tint, 0.8), box[:2])
        ImageDraw.Draw(card).text((margin, y), text, font=font, fill=(20, 20, 20) if dark_text else (240, 240, 240))
        lines.append(TextLine(box, size, text))
        y = box[3] + 4
    if y > CARD_SIZE[1]:
        raise ValueError(f"text does not fit the {CARD_SIZE} card")
    return np.asarray(card), lines


def photo_lettering(rgb: np.ndarray) -> list[TextLine]:
    """Words tesseract reads confidently in the photo and reads the same again as a single line."""
    import pytesseract

    data = pytesseract.image_to_data(Image.fromarray(rgb), config="--psm 11", output_type=pytesseract.Output.DICT)
    height, width = rgb.shape[:2]
    found, lines = [], []
    for text, confidence, x, y, w, h in zip(data["text"], data["conf"], data["left"], data["top"], data["width"],
                                            data["height"], strict=True):
        if float(confidence) < PHOTO_WORD_MIN_CONFIDENCE or sum(c.isalnum() for c in text) < PHOTO_WORD_MIN_CHARS:
            continue
        pad = max(2, h // 3)
        found.append(text.strip())
        lines.append(TextLine((max(0, x - pad), max(0, y - pad), min(width, x + w + pad), min(height, y + h + pad)),
                              h, None))
    if not lines:
        return []
    for line, reading in zip(lines, ocr_lines(rgb, lines), strict=True):
        line.original_ocr = reading
    return [line for line, text in zip(lines, found, strict=True) if line.original_ocr == text]


def build_subjects(paths: list[Path], max_photos: int, cards: int) -> list[Subject]:
    """Photos with faces or lettering (the first ``max_photos``), then ``cards`` text cards over photo crops."""
    subjects = []
    for path in paths:
        if len([s for s in subjects if s.set == "photo"]) >= max_photos:
            break
        with Image.open(path) as opened:
            rgb = np.asarray(opened.convert("RGB"))
        subject = Subject(path.name, "photo", rgb, face_boxes(rgb), photo_lettering(rgb))
        if subject.faces or subject.lines:
            subjects.append(subject)
            print(f"{path.name}: {len(subject.faces)} faces, {len(subject.lines)} words", file=sys.stderr)
    fonts = font_paths()
    for index in range(cards):
        path = paths[(index * len(paths)) // max(cards, 1)]
        subjects.append(card_subject(f"card{index}", path, fonts[index % len(fonts)], index % 2 == 0, seed=index))
    return subjects


def choice_cards(train: Path, count: int) -> list[Subject]:
    """Text cards for choosing a rule rather than reporting one: over training photos outside every held-out
    split (CHOICE_HELD_OUT), with other sentences (seeds from CHOICE_CARD_SEED) and the fonts in another order."""
    paths = [p for i, p in enumerate(image_paths(train, None)) if i % HELD_OUT_PERIOD not in CHOICE_HELD_OUT]
    fonts = font_paths()
    return [card_subject(f"choice{index}", paths[(index * 7919 + 101) % len(paths)], fonts[(index + 1) % len(fonts)],
                         index % 2 == 1, seed=CHOICE_CARD_SEED + index) for index in range(count)]


def card_subject(name: str, background: Path, font: Path, first_dark: bool, seed: int) -> Subject:
    """A text card over ``background`` with tesseract's reading of each original line."""
    with Image.open(background) as opened:
        rgb, lines = text_card(opened.convert("RGB"), font, first_dark, seed=seed)
    for line, reading in zip(lines, ocr_lines(rgb, lines), strict=True):
        line.original_ocr = reading
    return Subject(f"{name}_{font.stem}_{background.stem}", "rendered", rgb, lines=lines)


# ----------------------------------------------------------------------------- coding


@dataclass
class Coded:
    config: str
    codec: str
    options: str
    quality: int | str
    size: int
    decoded: np.ndarray


def largest_quality_within(code: Callable[[int], tuple[int, np.ndarray]], budget: int) -> int | None:
    """Binary search for the largest quality whose file is at most ``budget`` bytes (None if the lowest is over)."""
    low, high = QUALITY_RANGE
    if code(low)[0] > budget:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if code(middle)[0] <= budget else (low, middle - 1)
    return low


def match_budget(image: Image.Image, fmt: str, options: dict[str, Any], budget: int,
                 cache: dict[tuple[float, int], tuple[int, np.ndarray]]) -> tuple[float, int, int, np.ndarray]:
    """(scale, quality, bytes, decoded at full size): the largest quality within ``budget`` at full size, else at
    the first FALLBACK_SCALES that fits (the smallest scale at its lowest quality if none does)."""

    def coder(scale: float) -> Callable[[int], tuple[int, np.ndarray]]:
        size = image.size if scale == 1 else (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
        scaled = image if scale == 1 else image.resize(size, Image.Resampling.LANCZOS)

        def code(quality: int) -> tuple[int, np.ndarray]:
            if (scale, quality) not in cache:
                cache[(scale, quality)] = encode(scaled, fmt, quality=quality, **options)
            return cache[(scale, quality)]
        return code

    for scale in (1.0, *FALLBACK_SCALES):
        code = coder(scale)
        quality = largest_quality_within(code, budget)
        if quality is not None or scale == FALLBACK_SCALES[-1]:
            quality = QUALITY_RANGE[0] if quality is None else quality
            length, decoded = code(quality)
            if scale != 1:
                decoded = np.asarray(Image.fromarray(decoded).resize(image.size, Image.Resampling.LANCZOS))
            return scale, quality, length, decoded
    raise AssertionError("unreachable")


def sdl_configs(configs: list[str], shared: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(label, save options) per --sdl-config; ``bpp`` is set per rate."""
    result = []
    for config in configs or [""]:
        options = {**parse_options(" ".join(shared)), **parse_options(config)}
        text = " ".join(f"{k}={v}" for k, v in options.items())
        result.append(("sdl" + (f"[{text}]" if text else ""), options))
    return result


def code_subject(subject: Subject, sdl: list[tuple[str, dict[str, Any]]], target: str, rates: list[float],
                 threads: int) -> dict[float, list[Coded]]:
    """Per rate (the ``target`` save option, ``bpp`` or ``quality``): every sdl configuration, then AVIF and
    JPEG XL matched to the first configuration's bytes."""
    image = Image.fromarray(subject.rgb)
    pixels = subject.rgb.shape[0] * subject.rgb.shape[1]
    threads_options = {"avif": {"max_threads": threads}, "jxl": {"num_threads": threads}}
    caches: dict[str, dict[tuple[float, int], tuple[int, np.ndarray]]] = {name: {} for name in MATCHED}
    coded: dict[float, list[Coded]] = {}
    for rate in rates:
        points = []
        for label, options in sdl:
            size, decoded = encode(image, "SDL", **options, **{target: rate})
            text = " ".join(f"{k}={v}" for k, v in options.items())
            points.append(Coded(label, "sdl", text, f"{target}={rate}", size, decoded))
        budget = points[0].size
        for name, fmt in MATCHED.items():
            scale, quality, size, decoded = match_budget(image, fmt, threads_options[name], budget, caches[name])
            points.append(Coded(name, name, "", quality if scale == 1 else f"{quality}@scale{scale}", size, decoded))
        coded[rate] = points
        print(f"  {subject.name} {target_label(rate, target)}: "
              + ", ".join(f"{p.config} {p.size * 8 / pixels:.3f}" for p in points), file=sys.stderr)
    return coded


# ----------------------------------------------------------------------------- scoring


def score(subject: Subject, target: str, rate: float, point: Coded, stlpips: STLPIPS,
          whole: ReferenceMetrics | None) -> list[dict[str, Any]]:
    """CSV rows for one decoded image: the whole photo, each face, each text line."""
    height, width = subject.rgb.shape[:2]
    common = {"set": subject.set, "image": subject.name, "config": point.config, "codec": point.codec,
              "options": point.options, "rate": rate, "quality": point.quality, "bytes": point.size,
              "bpp": point.size * 8 / (width * height), "target": target}
    rows = []
    if whole is not None:
        values = whole(point.decoded)
        rows.append({**common, "kind": "whole", "item": "", **{k: values[k] for k in ("psnr", "msssim", "stlpips")}})
    for index, box in enumerate(subject.faces):
        reference, decoded = crop(subject.rgb, box), crop(point.decoded, box)
        rows.append({**common, "kind": "face", "item": index, "psnr": psnr(reference, decoded),
                     "msssim": crop_ms_ssim(reference, decoded), "stlpips": stlpips(reference, decoded)})
    readings = ocr_lines(point.decoded, subject.lines) if subject.lines else []
    for index, (line, read) in enumerate(zip(subject.lines, readings, strict=True)):
        rows.append({**common, "kind": "text", "item": index, "band": size_band(line.size_px),
                     "size_px": line.size_px, "acc_original": char_accuracy(read, line.original_ocr),
                     "acc_truth": "" if line.truth is None else char_accuracy(read, line.truth), "ocr": read})
    return rows


def original_rows(subject: Subject) -> list[dict[str, Any]]:
    """OCR of the uncoded rendered lines against their truth: the ceiling the codecs are read against."""
    return [{"set": subject.set, "kind": "text", "image": subject.name, "item": index,
             "band": size_band(line.size_px), "size_px": line.size_px, "config": "original", "codec": "original",
             "rate": 0, "bytes": "", "bpp": 24, "acc_original": 1.0,
             "acc_truth": char_accuracy(line.original_ocr, line.truth), "ocr": line.original_ocr}
            for index, line in enumerate(subject.lines) if line.truth is not None]


# ----------------------------------------------------------------------------- panels


def label_font(size: int = 13) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_paths()[0]), size)


def panel(reference: np.ndarray, by_rate: dict[float, list[Coded]], target: str, box: Box, title: str,
          path: Path) -> None:
    """Rows: the panel rates; columns: original, then each coded image, the same crop scaled up by pixel repetition."""
    original = crop(reference, box)
    zoom = max(1, round(160 / max(1, min(original.shape[:2]))))
    tile_w, tile_h = original.shape[1] * zoom, original.shape[0] * zoom
    columns = 1 + len(next(iter(by_rate.values())))
    header, gap = 18, 4
    sheet = Image.new("RGB", (columns * (tile_w + gap), 22 + len(by_rate) * (tile_h + header + gap)), "white")
    draw, font = ImageDraw.Draw(sheet), label_font()
    draw.text((2, 2), title, fill="black", font=font)
    pixels = reference.shape[0] * reference.shape[1]
    for row, (rate, points) in enumerate(by_rate.items()):
        y = 22 + row * (tile_h + header + gap)
        tiles = [("original", original)] + [(f"{p.config} {p.size * 8 / pixels:.3f} bpp", crop(p.decoded, box))
                                            for p in points]
        for column, (caption, tile) in enumerate(tiles):
            x = column * (tile_w + gap)
            caption = f"{target_label(rate, target)} target" if column == 0 else caption
            draw.text((x + 2, y + 2), caption, fill="black", font=font)
            sheet.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.NEAREST), (x, y + header))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def text_panel_box(subject: Subject) -> Box:
    """The region holding the text: the whole card, or the first word found in a photo."""
    if subject.set == "rendered":
        return (0, 0, subject.rgb.shape[1], subject.rgb.shape[0])
    return subject.lines[0].box


def write_panels(subject: Subject, coded: dict[float, list[Coded]], target: str, folder: Path) -> list[Path]:
    """Crops at PANEL_RATES (bpp targets) or at the first three qualities."""
    rates = PANEL_RATES if target == "bpp" else list(coded)[:3]
    by_rate = {rate: coded[rate] for rate in rates if rate in coded}
    stem = Path(subject.name).stem
    written = []
    for index, box in enumerate(subject.faces):
        written.append(folder / f"face_{stem}_{index}.png")
        panel(subject.rgb, by_rate, target, box, f"{subject.name} face {index}", written[-1])
    if subject.lines:
        written.append(folder / f"text_{stem}.png")
        panel(subject.rgb, by_rate, target, text_panel_box(subject), f"{subject.name} text", written[-1])
    return written


# ----------------------------------------------------------------------------- tables and plots


def read_csvs(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of several runs; sdl configurations are suffixed with their file's stem when more than one run is read."""
    rows: list[dict[str, Any]] = []
    seen_matched: set[tuple[str, str]] = set()
    for path in paths:
        matched_here = set()
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row["codec"] == "sdl" and len(paths) > 1:
                    row["config"] = f"{row['config']} ({path.stem})"
                elif row["codec"] != "sdl":
                    key = (row["config"], row["image"])
                    if key in seen_matched:
                        continue  # the baselines of the first run that has them
                    matched_here.add(key)
                rows.append(row)
        seen_matched |= matched_here
    return rows


def mean(values: Iterable[Any]) -> float:
    finite = [float(v) for v in values if v not in ("", None) and np.isfinite(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def grouped(rows: list[dict[str, Any]], kind: str, *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["kind"] == kind:
            groups[tuple(str(row[k]) for k in keys)].append(row)
    return groups


def configs_in(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["config"] for r in rows if r["config"] != "original"))


def rates_in(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({str(r["rate"]) for r in rows if float(r["rate"]) > 0}, key=float)


def target_label(rate: float | str, target: str) -> str:
    return f"{rate} bpp" if target == "bpp" else f"{target} {rate}"


def target_in(rows: list[dict[str, Any]]) -> str:
    """The save option the rows' rates set (``bpp`` for CSVs written before quality targets)."""
    targets = {r.get("target") or "bpp" for r in rows if r["codec"] == "sdl"}
    if len(targets) > 1:
        raise SystemExit(f"rows of different targets {sorted(targets)} do not share a table")
    return targets.pop() if targets else "bpp"


def rate_header(rows: list[dict[str, Any]], rates: list[str], columns: tuple[str, ...] = ("config",)) -> list[str]:
    """A table's header and rule: ``columns``, then one column per rate, labelled by the rows' target."""
    target = target_in(rows)
    return ["| " + " | ".join(columns) + " | " + " | ".join(target_label(r, target) for r in rates) + " |",
            "|" + "---|" * len(columns) + "---:|" * len(rates)]


def bpp_table(rows: list[dict[str, Any]]) -> str:
    """Mean file rate per configuration and target, over every coded image (each counted once)."""
    per_image: dict[tuple[str, str, str], float] = {}
    for row in rows:
        if row["config"] != "original":
            per_image[(row["config"], str(row["rate"]), row["image"])] = float(row["bpp"])
    rates = rates_in(rows)
    lines = ["### Mean file rate (bpp)\n", *rate_header(rows, rates)]
    for config in configs_in(rows):
        cells = [mean(v for (c, r, _), v in per_image.items() if c == config and r == rate) for rate in rates]
        lines.append(f"| {config} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict[str, Any]]) -> str:
    """OCR character accuracy per size band: relative to the original's OCR and, for rendered text, to the truth."""
    rates = rates_in(rows)
    groups = grouped(rows, "text", "set", "band", "config", "rate")
    parts = []
    for text_set, title in (("rendered", "Rendered text"), ("photo", "Lettering in the photos")):
        bands = sorted({k[1] for k in groups if k[0] == text_set}, key=lambda b: int(b.split("-")[0].rstrip("+")))
        if not bands:
            continue
        lines_per_band = {b: len({(r["image"], r["item"]) for k, g in groups.items() if k[:2] == (text_set, b)
                                  for r in g}) for b in bands}
        cell = ("vs original OCR / vs rendered truth" if text_set == "rendered" else "vs original OCR")
        parts.append(f"### {title}: OCR character accuracy ({cell})\n")
        parts += rate_header(rows, rates, ("band (lines)", "config"))
        for band in bands:
            if text_set == "rendered":
                ceiling = mean(r["acc_truth"] for r in groups.get((text_set, band, "original", "0"), []))
                parts.append(f"| {band} px ({lines_per_band[band]}) | original vs truth | "
                             + " | ".join(f"{ceiling:.2f}" for _ in rates) + " |")
            for config in configs_in(rows):
                cells = []
                for rate in rates:
                    group = groups.get((text_set, band, config, rate), [])
                    value = f"{mean(r['acc_original'] for r in group):.2f}"
                    if text_set == "rendered":
                        value += f" / {mean(r['acc_truth'] for r in group):.2f}"
                    cells.append(value)
                parts.append(f"| {band} px ({lines_per_band[band]}) | {config} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts) + "\n"


def metric_table(rows: list[dict[str, Any]], kind: str, title: str) -> str:
    """Mean PSNR / MS-SSIM / ST-LPIPS per configuration and target rate."""
    groups = grouped(rows, kind, "config", "rate")
    if not groups:
        return ""
    rates = rates_in(rows)
    count = len({(r["image"], r["item"]) for g in groups.values() for r in g})
    parts = [f"### {title} ({count}): PSNR dB / MS-SSIM / ST-LPIPS (lower is better)\n", *rate_header(rows, rates)]
    for config in configs_in(rows):
        cells = []
        for rate in rates:
            group = groups.get((config, rate), [])
            cells.append(f"{mean(r['psnr'] for r in group):.2f} / {mean(r['msssim'] for r in group):.4f} / "
                         f"{mean(r['stlpips'] for r in group):.3f}")
        parts.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n\n"


def report(rows: list[dict[str, Any]]) -> str:
    images = sorted({(r["set"], r["image"]) for r in rows})
    photos = sum(s == "photo" for s, _ in images)
    return (f"## Fidelity: {photos} photos, {len(images) - photos} rendered text cards\n\n"
            + text_table(rows) + metric_table(rows, "face", "Face crops")
            + metric_table(rows, "whole", "Whole photos") + bpp_table(rows))


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Metric against mean file rate, one line per configuration: text, faces, whole photos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, rates = configs_in(rows), rates_in(rows)

    def curve(kind: str, column: str, config: str, **match: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for rate in rates:
            group = [r for r in rows if r["kind"] == kind and r["config"] == config and str(r["rate"]) == rate
                     and all(str(r[k]) == v for k, v in match.items())]
            if group:
                xs.append(mean(r["bpp"] for r in group))
                ys.append(mean(r[column] for r in group))
        return xs, ys

    def save(figure: Any, path: Path) -> Path:
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path

    def style(config: str) -> dict[str, Any]:
        return {"lw": 2.2 if config.startswith("sdl") else 1.3, "marker": "o", "ms": 3}

    written = []
    bands = [name for _, name in BANDS]
    text_rows = [("rendered", "acc_original", "rendered text vs original OCR"),
                 ("rendered", "acc_truth", "rendered text vs truth"), ("photo", "acc_original", "photo lettering")]
    text_rows = [t for t in text_rows if any(r["kind"] == "text" and r["set"] == t[0] for r in rows)]
    if text_rows:
        figure, axes = plt.subplots(len(text_rows), len(bands), figsize=(4 * len(bands), 3.2 * len(text_rows)),
                                 squeeze=False)
        for (text_set, column, name), row_axes in zip(text_rows, axes, strict=True):
            for band, ax in zip(bands, row_axes, strict=True):
                for config in configs:
                    ax.plot(*curve("text", column, config, set=text_set, band=band), label=config, **style(config))
                ax.set_title(f"{name}, {band} px", fontsize=9)
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
                ax.set_xlabel("bits per pixel")
        axes[0][0].set_ylabel("character accuracy")
        axes[0][0].legend(fontsize=7)
        written.append(save(figure, out / "fidelity_text.png"))
    for kind, name in (("face", "face crops"), ("whole", "whole photos")):
        if not any(r["kind"] == kind for r in rows):
            continue
        figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for (column, label), ax in zip((("psnr", "PSNR (dB)"), ("msssim", "MS-SSIM"),
                                        ("stlpips", "ST-LPIPS, lower is better")), axes, strict=True):
            for config in configs:
                ax.plot(*curve(kind, column, config), label=config, **style(config))
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_xlabel("bits per pixel")
        axes[0].legend(fontsize=7)
        written.append(save(figure, out / f"fidelity_{kind}.png"))
    return written


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace, csv_path: Path) -> list[dict[str, Any]]:
    reason = sdl_available()
    if reason:
        raise SystemExit(reason)
    from PIL import AvifImagePlugin
    from pillow_jxl import JpegXLImagePlugin  # registers JXL

    AvifImagePlugin.DEFAULT_MAX_THREADS = JpegXLImagePlugin.DECODE_THREADS = args.threads
    paths = image_paths(args.images, args.limit) if args.images else held_out_paths(TRAIN)
    if args.choice_cards:
        subjects = build_subjects(paths, args.photos, 0) + choice_cards(TRAIN, args.choice_cards)
    else:
        subjects = build_subjects(paths, args.photos, args.cards)
    sdl = sdl_configs(args.sdl_config, args.sdl_option)
    stlpips = STLPIPS()
    target, rates = ("quality", args.qualities) if args.qualities else ("bpp", args.rates)
    rows: list[dict[str, Any]] = []
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        for subject in subjects:
            started = time.perf_counter()
            whole = ReferenceMetrics(stlpips, subject.rgb) if subject.set == "photo" else None
            coded = code_subject(subject, sdl, target, rates, args.threads)
            subject_rows = original_rows(subject)
            for rate, points in coded.items():
                for point in points:
                    subject_rows += score(subject, target, rate, point, stlpips, whole)
            writer.writerows(subject_rows)
            handle.flush()
            rows += subject_rows
            if args.panels:
                for path in write_panels(subject, coded, target, args.out / "panels"):
                    print(f"wrote {path}", file=sys.stderr)
            print(f"{subject.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of photos (default: the held-out training photos)")
    parser.add_argument("--limit", type=int, help="with --images: only the first N images (sorted by path)")
    parser.add_argument("--photos", type=int, default=8, help="photos with faces or lettering to code (default 8)")
    parser.add_argument("--cards", type=int, default=6, help="rendered text cards over photo crops (default 6)")
    parser.add_argument("--choice-cards", type=int, default=0,
                        help="instead of --cards, this many cards for choosing a rule (other photos and sentences)")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--rates", type=float, nargs="+", default=list(RATES), help=f"target bpp (default {RATES})")
    targets.add_argument("--qualities", type=int, nargs="+",
                         help="code the .sdl points with these qualities instead of bpp targets")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "fidelity", help="tables, plots and panels")
    parser.add_argument("--csv", type=Path, help="where to write the rows (default OUT/fidelity.csv)")
    parser.add_argument("--sdl-config", action="append", default=[], metavar="OPTS",
                        help='one sdl configuration per use, e.g. "model=taesd3" ("" = defaults); bpp (or quality) '
                             f'is set per rate; {", ".join(DECODE_KEYS)} are decode options')
    parser.add_argument("--sdl-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra save option for every sdl configuration")
    parser.add_argument("--no-panels", dest="panels", action="store_false", help="skip the PNG crop panels")
    parser.add_argument("--from-csv", type=Path, nargs="+", help="skip coding; tables and plots from these CSVs")
    parser.add_argument("--threads", type=int, default=1, help="torch and codec threads (default 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("PILLOW_SDLATENT_MODELS", str(REPO.parent / "shared" / "models" / "taesd"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_THREAD_LIMIT", str(args.threads))  # tesseract's own threads
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = read_csvs(args.from_csv) if args.from_csv else run(args, args.csv or args.out / "fidelity.csv")
    text = report(rows)
    print(text)
    (args.out / "fidelity.md").write_text(text)
    for path in plot(rows, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print(f"wall time {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
