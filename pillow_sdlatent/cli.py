"""The ``sdl`` command: encode, decode and inspect ``.sdl`` files, many at a time."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ._atomic import atomic_write
from .core import container
from .core.quantize import DEFAULT_QUALITY
from .options import PRECISIONS


def _output_path(source: Path, out_dir: Path | None, suffix: str) -> Path:
    return (out_dir or source.parent) / (source.stem + suffix)


def _run_all(items: Sequence[Path], desc: str, work: Callable[[list[Path]], None], batch: int = 1) -> int:
    """Apply ``work`` to the files ``batch`` at a time, with a progress bar; exit status 1 if any failed."""
    from tqdm import tqdm

    failures = 0
    with tqdm(total=len(items), desc=desc, unit="file", disable=len(items) < 2) as bar:
        for first in range(0, len(items), batch):
            chunk = list(items[first : first + batch])
            failures += _attempt(work, chunk)
            bar.update(len(chunk))
    return 1 if failures else 0


def _attempt(work: Callable[[list[Path]], None], chunk: list[Path]) -> int:
    """Run one batch; if it fails, retry its files one by one so a bad file spoils only itself."""
    try:
        work(chunk)
    except (OSError, SyntaxError, ValueError) as exc:
        if len(chunk) > 1:
            return sum(_attempt(work, [path]) for path in chunk)
        print(f"sdl: {chunk[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


def save_options(args: argparse.Namespace) -> dict[str, object]:
    return {"quality": args.quality, "bpp": args.bpp, "max_bytes": args.max_bytes, "effort": args.effort,
            "model": args.model, "device": args.device, "weights": args.weights, "scale": args.scale,
            "faces": args.faces}


def cmd_encode(args: argparse.Namespace) -> int:
    from .pipeline import encode_images

    options = save_options(args)

    def encode_batch(sources: list[Path]) -> None:
        images = []
        for source in sources:
            with Image.open(source) as image:
                image.load()
                images.append(image)
        for source, data in zip(sources, encode_images(images, options), strict=True):
            atomic_write(Path(args.output) if args.output else _output_path(source, args.out_dir, ".sdl"), data)

    return _run_all(args.inputs, "encode", encode_batch, args.batch)


def cmd_decode(args: argparse.Namespace) -> int:
    from .pipeline import decode_files

    def decode_batch(sources: list[Path]) -> None:
        images = decode_files(sources, model=args.model, device=args.device, weights=args.weights,
                              precision=args.precision)
        for source, image in zip(sources, images, strict=True):
            target = Path(args.output) if args.output else _output_path(source, args.out_dir, f".{args.format}")
            with tempfile.SpooledTemporaryFile() as buffer:
                image.save(buffer, format=Image.registered_extensions().get(f".{args.format}", args.format))
                buffer.seek(0)
                atomic_write(target, buffer.read())

    return _run_all(args.inputs, "decode", decode_batch, args.batch)


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    if args.to == "png":
        options = {"model": args.model, "device": args.device, "weights": args.weights}
    else:
        options = save_options(args)
    summary = convert(args.inputs, args.out, to="latent" if args.to == "npy" else args.to, engine=args.engine,
                      workers=args.workers, batch_size=args.batch, address=args.address, report=args.report,
                      gpus_per_worker=args.gpus_per_worker,
                      options={key: value for key, value in options.items() if value is not None})
    print(f"sdl convert: {summary.done} converted, {summary.skipped} already done, {summary.failed} failed "
          f"in {summary.seconds:.1f} s; report: {summary.report}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_info(args: argparse.Namespace) -> int:
    def info(paths: list[Path]) -> None:
        (path,) = paths
        with open(path, "rb") as fp:
            layout = container.read_layout(fp)
        header = layout.header
        bits = os.path.getsize(path) * 8
        print(f"{path}:")
        print(f"  format version  {layout.version[0]}.{layout.version[1]}")
        print(f"  size            {header.width}x{header.height}  mode {header.mode} (given {header.original_mode})")
        print(f"  model           {header.model}  decoder sha256 {header.decoder_digest.hex()[:16]}…")
        resampled = f"  of the image resized to {header.coded[0]}x{header.coded[1]}" if header.coded_size else ""
        print(f"  latent          {'x'.join(map(str, header.latent_shape))}{resampled}")
        print(f"  quantizer       {header.quantizer} ({len(header.quantizer_params)} bytes of parameters)")
        if layout.regions:
            factors = ", ".join(sorted({f"{region.factor:g}" for region in layout.regions}))
            print(f"  finer regions   {len(layout.regions)} (step x {factors})")
        print(f"  coder           {header.coder}  payload {header.payload_length} bytes")
        print(f"  metadata        {', '.join(sorted(layout.metadata)) or 'none'}{'  + alpha' if layout.alpha else ''}")
        print(f"  bits per pixel  {bits / (header.width * header.height):.4f}")
        if not layout.complete:
            print("  WARNING: file is truncated")

    return _run_all(args.inputs, "info", info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdl", description="Stable Diffusion latent image files (.sdl).")
    commands = parser.add_subparsers(dest="command", required=True)

    def device_options(sub: argparse.ArgumentParser, model_help: str) -> None:
        sub.add_argument("--model", help=f"model name (default: {model_help})")
        sub.add_argument("--device", help="cpu, cuda, mps (default: $PILLOW_SDLATENT_DEVICE or the best available)")
        sub.add_argument("--weights", help="a folder or .safetensors file holding the model's weights")

    def model_options(sub: argparse.ArgumentParser, model_help: str) -> None:
        device_options(sub, model_help)
        sub.add_argument("-o", "--output", help="output file (one input only)")
        sub.add_argument("--out-dir", type=Path, help="write outputs here instead of beside the inputs")
        sub.add_argument("--batch", type=int, default=8, help="images per model batch (default: %(default)s)")

    def rate_options(sub: argparse.ArgumentParser) -> None:
        rate = sub.add_mutually_exclusive_group()
        rate.add_argument("-q", "--quality", type=int, help=f"1..100 (default: {DEFAULT_QUALITY})")
        rate.add_argument("--bpp", type=float, help="target bits per pixel (the file lands within 3%% under)")
        rate.add_argument("--max-bytes", type=int, help="largest file size in bytes")
        sub.add_argument("--effort", type=int, default=0, help="0 (fast) .. 3: time spent refining the latent")
        sub.add_argument("--scale", type=float,
                         help="code the image resized by this factor in (0, 1] (default: chosen per rate)")
        sub.add_argument("--faces", action=argparse.BooleanOptionalAction,
                         help="code the faces OpenCV finds with finer steps (default: where OpenCV is installed)")

    encode = commands.add_parser("encode", help="compress images to .sdl")
    encode.add_argument("inputs", nargs="+", type=Path)
    rate_options(encode)
    model_options(encode, "taesd, or taesd3 at high rates")
    encode.set_defaults(run=cmd_encode)

    decode = commands.add_parser("decode", help="decode .sdl files to another format")
    decode.add_argument("inputs", nargs="+", type=Path)
    decode.add_argument("--format", default="png", help="output extension (default: %(default)s)")
    decode.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="decoder arithmetic: float32, auto (int8, about 2.2x faster, where it is measured "
                             "and exact on this CPU) or int8 (default: %(default)s)")
    model_options(decode, "the file's own")
    decode.set_defaults(run=cmd_decode)

    convert = commands.add_parser(
        "convert", help="convert folders, files or manifests on Ray or locally; resumable, with a report",
        description="Folders are searched recursively and mirrored below OUT; a .txt/.lst input lists paths. "
                    "A rerun skips outputs that exist and verify; a file that fails becomes a report row.")
    convert.add_argument("inputs", nargs="+", type=Path, metavar="SRC")
    convert.add_argument("-o", "--output", dest="out", type=Path, required=True, metavar="OUT",
                         help="output folder")
    convert.add_argument("--to", choices=("sdl", "png", "npy"), default="sdl",
                         help="sdl: encode images; png: decode .sdl files; npy: latents as float32 (C, H, W) "
                              "arrays, from .sdl files or by encoding images (default: %(default)s)")
    convert.add_argument("--engine", choices=("ray", "local"), default="ray",
                         help="ray: a pool of workers on a Ray cluster; local: this process (default: %(default)s)")
    convert.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else one per CPU)")
    convert.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local cluster)")
    convert.add_argument("--gpus-per-worker", type=float, default=1.0,
                         help="share of a GPU per Ray worker on a cluster with GPUs (default: %(default)s)")
    convert.add_argument("--report", type=Path, help="report of every input, .csv or .parquet "
                                                     "(default: OUT/convert-report.csv)")
    convert.add_argument("--batch", type=int, help="files per worker call, at most (default: 16)")
    rate_options(convert)
    device_options(convert, "taesd for sdl and npy, the file's own for png")
    convert.set_defaults(run=cmd_convert)

    info = commands.add_parser("info", help="print headers without decoding")
    info.add_argument("inputs", nargs="+", type=Path)
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "output", None) and len(args.inputs) > 1:
        parser.error("--output takes one input; use --out-dir for several")
    if getattr(args, "out_dir", None):
        args.out_dir.mkdir(parents=True, exist_ok=True)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
