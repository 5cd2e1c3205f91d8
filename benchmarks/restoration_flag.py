"""What the no-restoration flag (SHDR bit 0) changes: each file decoded as this reader does and as a
reader that ignores the flag (the restorer runs wherever the file's step lets it).

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python benchmarks/restoration_flag.py [--cards 4] [--kodak]

- text cards (as ``fidelity.py`` makes them) over training photos outside every held-out split, with
  other sentences than the benchmark's: OCR character accuracy against the original's reading;
- with ``--kodak``, the Kodak photos the detail check flags: PSNR and ST-LPIPS.

Prints the tables and writes docs/fidelity/restoration/flag_check.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path

import fidelity
import numpy as np
from metrics import STLPIPS, psnr
from PIL import Image

from pillow_sdlatent import pipeline, rate
from pillow_sdlatent.core import container
from pillow_sdlatent.options import DecodeOptions

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent.parent / "shared" / "data" / "train"
KODAK = HERE.parent.parent / "shared" / "data" / "kodak"
OUT = HERE.parent / "docs" / "fidelity" / "restoration" / "flag_check.md"


def coded(image: Image.Image, bpp: float) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="SDL", bpp=bpp)
    return buffer.getvalue()


def both_decodes(data: bytes) -> tuple[np.ndarray, np.ndarray, bool]:
    """The file decoded as this reader does, as a reader that ignores the flag, and whether it is set."""
    with io.BytesIO(data) as fp:
        layout = container.read_layout(fp)
        flagged = bool(layout.header.flags & container.FLAG_NO_RESTORATION)
        ignoring = dataclasses.replace(layout, header=dataclasses.replace(layout.header, flags=0))
        unflagged = pipeline.decode_layout(fp, ignoring, DecodeOptions())
    return np.asarray(pipeline.decode_file(data).convert("RGB")), np.asarray(unflagged.convert("RGB")), flagged


def card_rows(cards: int, rates: list[float]) -> list[str]:
    subjects = [(card.rgb, card.lines) for card in fidelity.choice_cards(TRAIN, cards)]
    rows = ["| bpp | flagged | band | restorer run / skipped (as read now) |", "| ---: | ---: | --- | ---: |"]
    for bpp in rates:
        scores: dict[str, tuple[list[float], list[float]]] = {}
        flagged = 0
        for rgb, lines in subjects:
            now, ignoring, flag = both_decodes(coded(Image.fromarray(rgb), bpp))
            flagged += flag
            for decoded, column in ((ignoring, 0), (now, 1)):
                for line, read in zip(lines, fidelity.ocr_lines(decoded, lines), strict=True):
                    band = scores.setdefault(fidelity.size_band(line.size_px), ([], []))
                    band[column].append(fidelity.char_accuracy(read, line.original_ocr))
        for band, (run, skipped) in sorted(scores.items()):
            rows.append(f"| {bpp} | {flagged}/{len(subjects)} | {band} px | "
                        f"{np.mean(run):.2f} / {np.mean(skipped):.2f} |")
    return rows


def kodak_rows(rates: list[float]) -> list[str]:
    metric = STLPIPS()
    rows = ["| photo | bpp | bytes | PSNR dB: restorer run / as read now | ST-LPIPS: run / now |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for path in sorted(KODAK.glob("kodim*.png")):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        if not rate.holds_fine_detail(image):
            continue
        reference = np.asarray(image)
        for bpp in rates:
            data = coded(image, bpp)
            now, ignoring, _ = both_decodes(data)
            rows.append(f"| {path.stem} | {bpp} | {len(data)} | {psnr(reference, ignoring):.2f} / "
                        f"{psnr(reference, now):.2f} | {metric(reference, ignoring):.4f} / "
                        f"{metric(reference, now):.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=4)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.07, 0.1, 0.15])
    parser.add_argument("--kodak", action="store_true", help="also the Kodak photos the detail check flags")
    args = parser.parse_args()
    parts = ["## Text cards over training photos: OCR character accuracy", "", *card_rows(args.cards, args.rates)]
    if args.kodak:
        parts += ["", "## Kodak photos the detail check flags", "", *kodak_rows(args.rates)]
    text = "\n".join(parts)
    print(text)
    OUT.write_text(f"`{__doc__.splitlines()[2].strip()}`\n\n{text}\n")


if __name__ == "__main__":
    main()
