"""Where the time of opening and saving an ``.sdl`` photo goes, stage by stage, beside AVIF, JPEG XL and WebP.

Run through ``python benchmarks/speed.py --stages`` (see its docstring). For a 768x512 Kodak photo saved
at the default quality it times each stage of ``load()`` by calling the codec's own functions (header
parse, entropy decode, dequantize, restorer, decoder network, resampling and mode), the whole ``load()``
warm, a fresh ``python -c`` process that opens and loads the file (median of 3, with a second,
instrumented run that splits imports, model loading and decoding), ``thumbnail((96, 64))`` and
``save()``; the whole-file rows again for the photo saved at ``HIGHER_RATES`` (``bpp=``); then AVIF,
JPEG XL and WebP (Pillow, pillow-jxl-plugin) encode and decode of the same photo at the quality whose
file is closest in size to the default one. In-process times are the best of ``repeats``;
every row records the 1-minute load average when it was measured.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from speed import KODAK

PHOTO = KODAK / "kodim23.png"
THUMBNAIL = (96, 64)
#: qualities searched for each classic codec's file closest in size to the .sdl file
QUALITIES = range(0, 101)
FRESH_RUNS = 3
#: rates at which the whole-file rows are repeated: where the default model is taesd3
HIGHER_RATES = (0.2, 0.35)
#: the fresh-process command, as a user would type it
FRESH_LOAD = "from PIL import Image; import pillow_sdlatent; Image.open({path!r}).load()"
#: the same, timed inside: imports, loading the file's model (weights, ONNX graph, session), then open+load
FRESH_SPLIT = """
import json, time
start = time.perf_counter()
from PIL import Image
import pillow_sdlatent
from pillow_sdlatent import models
import onnxruntime
imported = time.perf_counter()
models.load_model(Image.open({path!r}).info["sdl"]["model"])
loaded = time.perf_counter()
Image.open({path!r}).load()
done = time.perf_counter()
print(json.dumps({{"imports": imported - start, "model": loaded - imported, "open+load": done - loaded}}))
"""


def best_of(run: Callable[[], Any], repeats: int) -> float:
    """Best seconds of ``repeats`` calls after one warm-up call (the least disturbed by other load)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _row(stage: str, side: str, seconds: float, statistic: str, size: int | None = None) -> dict[str, Any]:
    print(f"  {stage}: {seconds * 1e3:.1f} ms ({statistic})", file=sys.stderr)  # a cut-short run still says something
    return {"stage": stage, "side": side, "value": seconds * 1e3, "unit": "ms", "statistic": statistic,
            "bytes": size, "load1": os.getloadavg()[0]}


def sdl_stages(photo: Image.Image, repeats: int) -> tuple[list[dict[str, Any]], bytes]:
    """The .sdl file's stages, each through the codec's own function, and the file."""
    import pillow_sdlatent  # noqa: F401 - registers the format
    from pillow_sdlatent import pipeline
    from pillow_sdlatent.core import container, modes, read
    from pillow_sdlatent.enhance import restore
    from pillow_sdlatent.options import DecodeOptions

    data = sdl_bytes(photo, {})
    best = f"best of {repeats}"

    def opened() -> Image.Image:
        return Image.open(io.BytesIO(data))

    layout = opened().layout
    payload = container.read_payload(io.BytesIO(data), layout)
    symbols = read.read_symbols(layout, payload)
    latent = read.dequantize(layout, symbols)
    decoder = pipeline.decoder_for(layout, DecodeOptions(precision="float32"))
    cleaned = pipeline.clean_latent(latent, layout, decoder, DecodeOptions())
    rgb = decoder.decode_image(cleaned)
    step = max(read.file_quantizer(layout.header).steps)
    restorer_step = max(step, restore.HELPFUL_STEPS[0])
    model = layout.header.model
    rows = [
        _row(f"header parse (Image.open; {model}, {layout.header.quantizer}, coded {layout.header.coded[0]}x"
             f"{layout.header.coded[1]})", "decode", best_of(opened, repeats), best, len(data)),
        _row(f"entropy decode ({layout.header.coder}{_native_label(layout)})", "decode",
             best_of(lambda: read.read_symbols(layout, payload), repeats), best),
    ]
    if _has_native(layout):
        rows += [
            _row(f"entropy decode ({layout.header.coder}, C, one thread)", "decode",
                 _ctx2_seconds(layout, payload, repeats, threads=1), best),
            _row(f"entropy decode ({layout.header.coder}, numpy loop: an install without a C compiler)", "decode",
                 _ctx2_seconds(layout, payload, repeats, native=False), best),
        ]
    rows += [
        _row("dequantize", "decode", best_of(lambda: read.dequantize(layout, symbols), repeats), best),
    ]
    if restore.has_restorer(model):
        rows += [
            _row(f"restorer at this file's step {step:.2f} (runs from {restore.HELPFUL_STEPS[0]})", "decode",
                 best_of(lambda: pipeline.clean_latent(latent, layout, decoder, DecodeOptions()), repeats), best),
            _row(f"restorer network alone (step {restorer_step:.2f})", "decode",
                 best_of(lambda: restore.restore_latent(latent, restorer_step, model), repeats), best),
        ]
    rows.append(_row(f"decoder network ({decoder.runtime}, float32)", "decode",
                     best_of(lambda: decoder.decode_image(cleaned), repeats), best))
    int8 = _int8_decoder(decoder)
    if int8 is not None:
        rows.append(_row(f"decoder network ({decoder.runtime}, int8; the default where the CPU computes it exactly)",
                         "decode",
                         best_of(lambda: int8.decode_image(cleaned), repeats), best))
    rows += [
        _row("resampling and mode (full_size, finish_mode)", "decode",
             best_of(lambda: modes.finish_mode(pipeline.full_size(rgb, layout.header), layout, None), repeats), best),
        *whole_file_rows(photo, data, {}, repeats),
    ]
    if _default_precision(data) != "float32":
        def load_float32() -> None:
            with Image.open(io.BytesIO(data)) as image:
                image.decode_options = {"precision": "float32"}
                image.load()

        rows.append(_row("whole load(), warm, precision='float32'", "decode", best_of(load_float32, repeats), best,
                         len(data)))
    return rows, data


def _int8_decoder(decoder: Any) -> Any:
    """The model's int8 twin, or None where it has none (no fitted ranges, or not ONNX Runtime)."""
    try:
        return decoder.decoding_in("int8")
    except ValueError:
        return None


def _native_label(layout: Any) -> str:
    from pillow_sdlatent.core.coders import ctx2

    if not _has_native(layout):
        return ""
    return ", C" + (f", {ctx2.NATIVE_THREADS} threads" if ctx2.NATIVE_THREADS > 1 else "")


def _has_native(layout: Any) -> bool:
    from pillow_sdlatent.core.coders import ctx2

    return layout.header.coder in ctx2.NETWORKS and ctx2.native is not None


def _ctx2_seconds(layout: Any, payload: bytes, repeats: int, threads: int | None = None, native: bool = True,
                  ) -> float:
    """The learned coder's entropy decode with the C decoder on ``threads`` threads, or switched off."""
    from pillow_sdlatent.core import read
    from pillow_sdlatent.core.coders import ctx2

    saved = ctx2.native, ctx2.NATIVE_THREADS
    ctx2.native = ctx2.native if native else None
    ctx2.NATIVE_THREADS = threads or ctx2.NATIVE_THREADS
    try:
        return best_of(lambda: read.read_symbols(layout, payload), repeats)
    finally:
        ctx2.native, ctx2.NATIVE_THREADS = saved


def sdl_bytes(photo: Image.Image, options: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", **options)
    return buffer.getvalue()


def whole_file_rows(photo: Image.Image, data: bytes, options: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    """Warm ``load()`` (labelled with the decoder precision the default took), thumbnail and ``save()`` of
    ``data``, the photo saved with ``options``; with options, each stage is labelled with them and with the
    model and coded size the encoder chose, and the entropy decode is timed too."""
    from pillow_sdlatent.core import container, read

    label, entropy = "", []
    if options:
        with Image.open(io.BytesIO(data)) as opened:
            sdl = opened.info["sdl"]
        label = (", ".join(f"{k}={v}" for k, v in options.items())
                 + f"; {sdl['model']}, {sdl['coder']}, coded {sdl['coded_size'][0]}x{sdl['coded_size'][1]}")
        label = f"[{label}] "
        layout = container.read_layout(io.BytesIO(data))
        payload = container.read_payload(io.BytesIO(data), layout)
        entropy = [_row(f"{label}entropy decode ({layout.header.coder}{_native_label(layout)})", "decode",
                        best_of(lambda: read.read_symbols(layout, payload), repeats), f"best of {repeats}")]
    best = f"best of {repeats}"

    def thumbnail() -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail(THUMBNAIL)  # when the preview is already the size, Pillow leaves the pixels unloaded
            image.load()

    return [
        *entropy,
        _row(f"{label}whole load(), warm ({_default_precision(data)})", "decode",
             best_of(lambda: Image.open(io.BytesIO(data)).load(), repeats), best, len(data)),
        _row(f"{label}thumbnail({THUMBNAIL[0]}, {THUMBNAIL[1]}), warm", "decode", best_of(thumbnail, repeats), best),
        _row(f"{label}save(), warm", "encode", best_of(lambda: sdl_bytes(photo, options), repeats), best, len(data)),
    ]


def _default_precision(data: bytes) -> str:
    """The decoder arithmetic a plain ``load()`` of ``data`` takes on this CPU (``precision="auto"``)."""
    from pillow_sdlatent import pipeline
    from pillow_sdlatent.options import DecodeOptions

    with Image.open(io.BytesIO(data)) as opened:
        return pipeline.decoder_for(opened.layout, DecodeOptions()).precision


def fresh_process_rows(data: bytes) -> list[dict[str, Any]]:
    """``python -c`` that opens and loads the file, wall time as a user sees it (median of ``FRESH_RUNS``),
    and the instrumented run's split of it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.sdl"
        path.write_bytes(data)
        walls = []
        for _ in range(FRESH_RUNS):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", FRESH_LOAD.format(path=str(path))], check=True)
            walls.append(time.perf_counter() - start)
        splits = [json.loads(subprocess.run([sys.executable, "-c", FRESH_SPLIT.format(path=str(path))], check=True,
                                            capture_output=True, text=True).stdout.splitlines()[-1])
                  for _ in range(FRESH_RUNS)]
    median = f"median of {FRESH_RUNS}"
    rows = [_row("fresh process: python -c open+load", "decode", statistics.median(walls), median, len(data))]
    for part, label in (("imports", "imports (PIL, pillow_sdlatent, onnxruntime)"),
                        ("model", "model load (weights, ONNX graph, session)"), ("open+load", "open+load")):
        rows.append(_row(f"fresh process, of which: {label}", "decode",
                         statistics.median(split[part] for split in splits), median))
    return rows


def classic_rows(photo: Image.Image, target: int, repeats: int) -> list[dict[str, Any]]:
    """AVIF, JPEG XL and WebP encode and decode at the quality whose file is closest to ``target`` bytes."""
    from pillow_jxl import JpegXLImagePlugin  # noqa: F401 - registers JXL

    rows = []
    for name, fmt in (("AVIF", "AVIF"), ("JPEG XL", "JXL"), ("WebP", "WEBP")):
        def encode(quality: int, fmt: str = fmt) -> bytes:
            buffer = io.BytesIO()
            photo.save(buffer, format=fmt, quality=quality)
            return buffer.getvalue()

        quality = _closest_quality(encode, target)
        data = encode(quality)
        label = f"{name} q{quality}"
        rows.append(_row(f"{label} decode (open+load)", "decode",
                         best_of(lambda data=data: Image.open(io.BytesIO(data)).load(), repeats),
                         f"best of {repeats}", len(data)))
        rows.append(_row(f"{label} encode (save)", "encode",
                         best_of(lambda quality=quality, encode=encode: encode(quality), repeats),
                         f"best of {repeats}", len(data)))
    return rows


def _closest_quality(encode: Callable[[int], bytes], target: int) -> int:
    """The quality whose file is closest to ``target`` bytes (sizes grow with quality: bisection)."""
    low, high = QUALITIES[0], QUALITIES[-1]
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if len(encode(middle)) <= target else (low, middle)
    return min((low, high), key=lambda q: abs(len(encode(q)) - target))


def stage_rows(repeats: int) -> list[dict[str, Any]]:
    """Every row of the stage table, with its ratio to AVIF's decode (decode rows) or encode (encode rows)."""
    with Image.open(PHOTO) as opened:
        photo = opened.convert("RGB")
    rows, data = sdl_stages(photo, repeats)
    rows += fresh_process_rows(data)
    for bpp in HIGHER_RATES:
        rows += whole_file_rows(photo, sdl_bytes(photo, {"bpp": bpp}), {"bpp": bpp}, repeats)
    rows += classic_rows(photo, len(data), repeats)
    avif = {row["side"]: row["value"] for row in rows if row["stage"].startswith("AVIF")}
    for row in rows:
        row["ratio_to_avif"] = row["value"] / avif[row["side"]]
    return rows


NOTES = """
Each stage is timed through the codec's own function on the file saved at the default quality (rows
in brackets: the photo saved with those options instead);
`x AVIF` divides by AVIF's decode (decode rows) or encode (encode rows) of the same photo at the
quality whose file is closest in size, measured in the same run. The classic codecs run with
Pillow's defaults (AVIF: libavif speed 6, all cores). `load1` is the 1-minute load average when the
row was measured: on a shared machine every time reads slower, and more so for the longer rows.
"""


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as a Markdown table."""
    lines = ["| stage | side | value | x AVIF | bytes | statistic | load1 |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for row in rows:
        ratio = f"{row['ratio_to_avif']:.1f}" if row.get("ratio_to_avif") is not None else ""
        lines.append(f"| {row['stage']} | {row['side']} | {row['value']:.3g} {row['unit']} | {ratio} | "
                     f"{row['bytes'] or ''} | {row['statistic']} | {row['load1']:.1f} |")
    return lines


def main() -> None:
    """The whole-file rows (entropy decode, warm load, thumbnail, save) of the photo saved with each
    ``--options``, e.g. ``"bpp=0.2"`` against ``"bpp=0.2 coder=ctx1"``; the stage table itself comes
    from ``speed.py --stages``."""
    import argparse

    from rd import parse_options

    import pillow_sdlatent  # noqa: F401 - registers the format

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--options", nargs="+", required=True, metavar="OPTS",
                        help='save options per file, "key=value ..." (as rd.py --sdl-config reads them)')
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with Image.open(PHOTO) as opened:
        photo = opened.convert("RGB")
    rows = []
    for text in args.options:
        options = parse_options(text)
        rows += whole_file_rows(photo, sdl_bytes(photo, options), options, args.repeats)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
