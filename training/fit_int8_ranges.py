"""Fit the activation ranges of the int8 TAESD decoder (``onnx_graphs.taesd_decoder_int8``).

The codec's own float32 decoder graph runs with every activation the int8 graph rounds to uint8 as an
extra output (``onnx_graphs.taesd_decoder_taps``), over the latents of 16 training photos outside the
held-out split of ``benchmarks/decoder_variants.py`` (its ``calibration_paths``; NOT Kodak), each
centre-cropped to 384x256 and saved at the default quality, as the decoder gets them on decode. Each
activation's range is its min and max over all of them (MinMax calibration), as the recipe
``int8-float-first-last`` of docs/speed/variants.md does. Writes pillow_sdlatent/weights/int8_ranges.json with
the decoder digest of the weights the ranges belong to (the codec decodes in int8 only with those).
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

from pillow_sdlatent.models import load_model, onnx_graphs

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "pillow_sdlatent" / "weights" / "int8_ranges.json"
sys.path.insert(0, str(REPO / "benchmarks"))
from decoder_variants import CALIBRATION_PHOTOS, CALIBRATION_SIZE, calibration_paths, codec_latent, load_rgb  # noqa: E402


def fit(model_name: str, photos: list[Path]) -> dict[str, object]:
    """The ranges (min, max) per tapped activation of ``model_name``'s decoder over the photos' latents."""
    model = load_model(model_name, device="cpu", runtime="onnxruntime")
    graph, taps = onnx_graphs.taesd_decoder_taps(model._state)
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    low = dict.fromkeys(taps, np.inf)
    high = dict.fromkeys(taps, -np.inf)
    for path in photos:
        if path.name.lower().startswith("kodim"):
            raise SystemExit(f"refusing a Kodak photo: {path}")
        latent, _ = codec_latent(load_rgb(path, CALIBRATION_SIZE), {"model": model_name})
        outputs = session.run(list(taps.values()), {"input": latent[None]})
        for name, values in zip(taps, outputs, strict=True):
            low[name] = min(low[name], float(values.min()))
            high[name] = max(high[name], float(values.max()))
    return {"decoder_digest": model.decoder_digest.hex(),
            "calibration": f"MinMax over {len(photos)} training photos, {CALIBRATION_SIZE[0]}x{CALIBRATION_SIZE[1]}, "
                           "default quality",
            "ranges": {name: [low[name], high[name]] for name in taps}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    fitted = {"taesd": fit("taesd", calibration_paths(CALIBRATION_PHOTOS))}
    text = json.dumps(fitted, indent=1)
    args.out.write_text(re.sub(r"\[\s+([^][]*?)\s+\]", lambda pair: f"[{' '.join(pair.group(1).split())}]", text)
                        + "\n")  # one range a line
    print(f"wrote {args.out}: {len(fitted['taesd']['ranges'])} ranges for taesd")


if __name__ == "__main__":
    main()
