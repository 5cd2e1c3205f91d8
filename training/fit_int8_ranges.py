"""Fit the activation ranges of the int8 TAESD decoder (``onnx_graphs.taesd_decoder_int8``).

The codec's own float32 decoder graph runs with every activation the int8 graph rounds to uint8 as an
extra output (``onnx_graphs.taesd_decoder_taps``), over the latents of 16 training photos outside the
held-out split of ``benchmarks/decoder_variants.py`` (its ``calibration_paths``; NOT Kodak), each
centre-cropped to 384x256 and saved at the default quality, as the decoder gets them on decode. Each
activation's range is its min and max over all of them (MinMax calibration), as the recipe
``int8-float-first-last`` of docs/speed/variants.md does. Writes pillow_sdlatent/weights/int8_ranges.json with
the decoder digest of the weights the ranges belong to (the codec decodes in int8 only with those); the
same for taesd's restoring decoders (``enhance.restore``), over the latents of the files they serve.
Deterministic; about a minute on 2 CPU cores:

    PILLOW_SDLATENT_MODELS=../shared/models/taesd python training/fit_int8_ranges.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime

from pillow_sdlatent.enhance import restore
from pillow_sdlatent.models import LatentModel, load_model, onnx_graphs

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "pillow_sdlatent" / "weights" / "int8_ranges.json"
#: the qualities taesd's restoring decoders are calibrated at: the files they serve, coded at 0.625 to 0.875
#: of the image's size at steps 0.40 to 0.66, up to where the latent restorer takes over (0.7; the default
#: quality codes taesd3, so it is not one)
RESTORING_QUALITIES = (25, 30, 45, 60)
sys.path.insert(0, str(REPO / "benchmarks"))
from decoder_variants import CALIBRATION_PHOTOS, CALIBRATION_SIZE, calibration_paths, codec_latent, load_rgb  # noqa: E402


def calibration_latents(model_name: str, photos: list[Path], qualities: tuple[int | None, ...],
                        cleaned: bool) -> list[np.ndarray]:
    """The latents a decoder gets for the photos saved at ``qualities`` (None: the default), ``cleaned`` by
    the latent restorer where it runs (not for a restoring decoder, which serves files in its place)."""
    latents = []
    for path in photos:
        if path.name.lower().startswith("kodim"):
            raise SystemExit(f"refusing a Kodak photo: {path}")
        rgb = load_rgb(path, CALIBRATION_SIZE)
        for quality in qualities:
            options = {"model": model_name} if quality is None else {"model": model_name, "quality": quality}
            latents.append(codec_latent(rgb, options, cleaned=cleaned)[0])
    return latents


def fit(model: LatentModel, latents: list[np.ndarray], calibration: str) -> dict[str, object]:
    """The ranges (min, max) per tapped activation of ``model``'s decoder over ``latents``."""
    graph, taps = onnx_graphs.taesd_decoder_taps(model._state)
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    low = dict.fromkeys(taps, np.inf)
    high = dict.fromkeys(taps, -np.inf)
    for latent in latents:
        outputs = session.run(list(taps.values()), {"input": latent[None]})
        for name, values in zip(taps, outputs, strict=True):
            low[name] = min(low[name], float(values.min()))
            high[name] = max(high[name], float(values.max()))
    return {"decoder_digest": model.decoder_digest.hex(),
            "calibration": f"MinMax over {calibration}",
            "ranges": {name: [low[name], high[name]] for name in taps}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    photos = calibration_paths(CALIBRATION_PHOTOS)
    model = load_model("taesd", device="cpu", runtime="onnxruntime")
    described = f"{len(photos)} training photos, {CALIBRATION_SIZE[0]}x{CALIBRATION_SIZE[1]}"
    fitted = {"taesd": fit(model, calibration_latents("taesd", photos, (None,), cleaned=True),
                           f"{described}, default quality")}
    served = calibration_latents("taesd", photos, RESTORING_QUALITIES, cleaned=False)
    for file in sorted({file for _, file in restore.DECODERS["taesd"]}):
        fitted[file] = fit(restore.decoding_with(model, file), served,
                           f"{described}, qualities {', '.join(map(str, RESTORING_QUALITIES))}")
    text = json.dumps(fitted, indent=1)
    args.out.write_text(re.sub(r"\[\s+([^][]*?)\s+\]", lambda pair: f"[{' '.join(pair.group(1).split())}]", text)
                        + "\n")  # one range a line
    print(f"wrote {args.out}: {len(fitted['taesd']['ranges'])} ranges for each of {', '.join(fitted)}")


if __name__ == "__main__":
    main()
