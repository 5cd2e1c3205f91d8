"""Rate-distortion benchmark: .sdl against JPEG, WebP, AVIF, JPEG XL and the 2022 "original recipe".

Every codec configuration is swept over a fixed parameter grid (from its
lowest rate to about 0.6 bpp on the Kodak average) so that per-image points
can be averaged per parameter. Writes one CSV row per (configuration, image, point),
BD-rate tables (Markdown) and RD plots. See benchmarks/README.md.

    python benchmarks/rd.py --limit 3                      # quick look
    python benchmarks/rd.py --codecs sdl --models taesd,taesd3,taef1 --images ../shared/data/train --every 40
    python benchmarks/rd.py --codecs jpeg,avif,sdl --models taesd --sdl-config "" --sdl-config "effort=2"
    python benchmarks/rd.py --from-csv docs/rd/rd.csv      # tables and plots only
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bdrate import bd_rate, quality_overlap
from metrics import STLPIPS, ReferenceMetrics, msssim_db

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "kodak"
DEFAULT_MODELS_DIR = REPO.parent / "shared" / "models" / "taesd"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}
TAESD_CHANNELS = {"taesd": 4, "taesdxl": 4, "taesd3": 16, "taef1": 16}
#: an sdl "model" that names none, so that the codec picks the model per rate
AUTO = "auto"

#: parameter grids: each starts at its codec's lowest rate; the classic ones end near 0.6 bpp on the Kodak average
GRIDS: dict[str, list[int]] = {
    "jpeg": [1, 5, 8, 12, 16, 20, 25, 30],  # quality; optimize=True (Huffman tables per image)
    "webp": [0, 3, 6, 10, 15, 20, 30, 40, 50],  # quality; method=6
    "avif": [0, 10, 20, 30, 36, 42, 48, 54],  # quality; speed 6 (Pillow's default)
    "jxl": [0, 10, 20, 30, 40, 50, 60],  # quality; effort 7; quality 0 is libjxl's coarsest (distance 25)
    "orig": [16, 32, 64, 128, 256],  # palette size
    "sdl": [1, 15, 30, 45, 60, 80, 100],  # quality (pillow_sdlatent's 1..100)
}
METRICS = {  # column -> (name, axis label, higher is better)
    "psnr": ("PSNR", "PSNR (dB)", True),
    "msssim_db": ("MS-SSIM", "MS-SSIM (dB, -10 log10(1 - MS-SSIM))", True),
    "stlpips": ("ST-LPIPS", "ST-LPIPS (AlexNet), lower is better", False),
}
#: a BD-rate over less than this share of the shorter curve's quality span is flagged as fragile
NARROW_OVERLAP = 1 / 3
CSV_FIELDS = ["config", "codec", "model", "options", "image", "width", "height", "param", "bytes", "bpp",
              "psnr", "msssim", "msssim_db", "stlpips"]


@dataclass
class Sample:
    """One test image and, per TAESD model, its latent (encoded once per run, shared by all points)."""

    name: str
    image: Image.Image
    rgb: np.ndarray
    latents: dict[str, torch.Tensor] = field(default_factory=dict)


class Codec(Protocol):
    label: str
    codec: str
    model: str
    options: str
    params: list[int]

    def code(self, sample: Sample, param: int) -> tuple[int, np.ndarray]:
        """(file size in bytes, decoded (H, W, 3) uint8) for one parameter value."""


#: options of a --sdl-config that are decode options (``DecodeOptions``), not save options
DECODE_KEYS = ("precision", "restore")


def encode(image: Image.Image, fmt: str, **options: Any) -> tuple[int, np.ndarray]:
    """The file's size and its decoded pixels; DECODE_KEYS among ``options`` are used to decode."""
    decode_options = {key: options.pop(key) for key in DECODE_KEYS if key in options}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        if decode_options:
            decoded.decode_options = decode_options
        return len(data), np.asarray(decoded.convert("RGB"))


@dataclass
class PillowCodec:
    """A format Pillow (or a plugin) saves, swept over ``quality``."""

    codec: str
    format: str
    params: list[int]
    save_options: dict[str, Any]
    model: str = ""
    options: str = ""

    @property
    def label(self) -> str:
        if not self.model:
            return self.codec
        return f"{self.codec}/{self.model}" + (f"[{self.options}]" if self.options else "")

    def code(self, sample: Sample, param: int) -> tuple[int, np.ndarray]:
        return encode(sample.image, self.format, quality=param, **self.save_options)


class _TinyModel:
    """A diffusers AutoencoderTiny behind ``pillow_sdlatent.models.LatentModel``'s encode/decode interface."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module.encode(pixels).latents

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module.decode(latent).sample.clamp(-1, 1)


class Autoencoders:
    """TAESD models loaded once each: through ``pillow_sdlatent.models`` when it imports, else diffusers.

    Sharing the plugin's loader means the sdl and original-recipe codecs use
    the very same weights, device and precision (and the process holds one copy).
    Either way ``encode``/``decode`` take and return CPU float32 tensors.
    """

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.models: dict[str, Any] = {}

    def model(self, name: str) -> Any:
        if name not in self.models:
            try:
                from pillow_sdlatent.models import load_model
            except ImportError:
                self.models[name] = _TinyModel(self._load_with_diffusers(name))
            else:
                # no arguments: the same cache key as the plugin's own load, so the weights load once
                self.models[name] = load_model(name)
        return self.models[name]

    def _load_with_diffusers(self, name: str) -> torch.nn.Module:
        from diffusers import AutoencoderTiny
        from safetensors.torch import load_file

        module = AutoencoderTiny(latent_channels=TAESD_CHANNELS[name])
        encoder = load_file(self.models_dir / f"{name}_encoder.safetensors")
        state = {f"encoder.layers.{k}": v.float() for k, v in encoder.items()}
        for key, value in load_file(self.models_dir / f"{name}_decoder.safetensors").items():
            index, rest = key.split(".", 1)
            state[f"decoder.layers.{int(index) - 1}.{rest}"] = value.float()
        module.load_state_dict(state)
        return module.eval().requires_grad_(False)

    def latent(self, name: str, sample: Sample) -> torch.Tensor:
        """(1, C, ceil(H/8), ceil(W/8)) latent of the image, edges replicated to a multiple of 8."""
        if name not in sample.latents:
            height, width = sample.rgb.shape[:2]
            padded = np.pad(sample.rgb, ((0, -height % 8), (0, -width % 8), (0, 0)), mode="edge")
            pixels = torch.tensor(padded, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
            sample.latents[name] = self.model(name).encode(pixels)
        return sample.latents[name]

    def decode(self, name: str, latent: torch.Tensor, sample: Sample) -> np.ndarray:
        pixels = self.model(name).decode(latent)[0]
        rgb = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        height, width = sample.rgb.shape[:2]
        return np.ascontiguousarray(rgb[:height, :width])


def nearest(pixels: np.ndarray, palette: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Index of the nearest palette entry (squared Euclidean) for each (N, C) pixel, in chunks to bound memory."""
    pal = palette.astype(np.float32)
    pal_norm = (pal**2).sum(1)
    out = np.empty(len(pixels), dtype=np.int64)
    for start in range(0, len(pixels), chunk):
        block = pixels[start:start + chunk].astype(np.float32)
        out[start:start + chunk] = np.argmin(pal_norm[None] - 2 * block @ pal.T, axis=1)
    return out


def build_palette(pixels: np.ndarray, colors: int, iterations: int = 10) -> np.ndarray:
    """(K, 4) uint8 palette: Pillow's fast-octree RGBA quantizer refined by Lloyd k-means.

    Pillow's median cut refuses 4 channels and its octree ignores ``kmeans=``,
    so the refinement is done here; K may come out smaller for flat latents.
    """
    side = pixels.reshape(1, -1, 4)
    seed = Image.fromarray(side, "RGBA").quantize(colors, method=Image.Quantize.FASTOCTREE)
    used = int(np.asarray(seed).max()) + 1
    centers = np.array(seed.getpalette("RGBA")[: 4 * used], dtype=np.float64).reshape(-1, 4)
    data = pixels.reshape(-1, 4).astype(np.float64)
    for _ in range(iterations):
        assign = nearest(data, centers)
        counts = np.bincount(assign, minlength=len(centers))
        sums = np.zeros_like(centers)
        np.add.at(sums, assign, data)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return np.clip(np.rint(centers), 0, 255).astype(np.uint8)


def floyd_steinberg(image: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) palette indices with Floyd-Steinberg error diffusion in all C channels.

    Pillow's own dither only looks at three channels, so a 4-channel latent needs this.
    """
    height, width, _ = image.shape
    work = image.astype(np.float32)
    pal = palette.astype(np.float32)
    out = np.empty((height, width), dtype=np.int64)
    for y in range(height):
        for x in range(width):
            old = np.clip(work[y, x], 0, 255)
            k = int(np.argmin(((pal - old) ** 2).sum(1)))
            out[y, x] = k
            err = old - pal[k]
            if x + 1 < width:
                work[y, x + 1] += err * (7 / 16)
            if y + 1 < height:
                if x > 0:
                    work[y + 1, x - 1] += err * (3 / 16)
                work[y + 1, x] += err * (5 / 16)
                if x + 1 < width:
                    work[y + 1, x + 1] += err * (1 / 16)
    return out


@dataclass
class OrigRecipe:
    """Matthias Bühlmann's 2022 SD-compression recipe on a 4-channel TAESD, swept over palette size.

    Latent -> uint8 with AutoencoderTiny.scale_latents (z / 6 + 0.5, clamped) ->
    palette of K 4-channel colours -> indices by nearest colour or by FS dither ->
    zlib level 9. Size = 4K palette bytes + compressed indices (no header).
    """

    autoencoders: Autoencoders
    model: str
    dither: bool
    params: list[int]
    options: str = ""

    @property
    def codec(self) -> str:
        return "orig-fs" if self.dither else "orig-nodither"

    @property
    def label(self) -> str:
        return f"{self.codec}/{self.model}"

    def code(self, sample: Sample, param: int) -> tuple[int, np.ndarray]:
        module = self.autoencoders.model(self.model).module  # scale_latents is parameter-free arithmetic
        latent = self.autoencoders.latent(self.model, sample)
        u8 = (module.scale_latents(latent) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        palette = build_palette(u8, param)
        if self.dither:
            indices = floyd_steinberg(u8, palette)
        else:
            indices = nearest(u8.reshape(-1, u8.shape[2]), palette).reshape(u8.shape[:2])
        size = palette.size + len(zlib.compress(indices.astype(np.uint8).tobytes(), 9))
        restored = torch.from_numpy(palette[indices]).permute(2, 0, 1)[None].float() / 255
        return size, self.autoencoders.decode(self.model, module.unscale_latents(restored), sample)


def parse_options(text: str) -> dict[str, Any]:
    """``"a=1 b=x,c=true"`` -> {"a": 1, "b": "x", "c": True}: ints, floats, booleans, else strings."""
    options: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bad sdl option {item!r}; expected key=value")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        options[key] = value
    return options


def sdl_available() -> str | None:
    """None when ``pillow_sdlatent`` can save SDL, else why not."""
    try:
        import pillow_sdlatent  # noqa: F401 - registers the format
    except Exception as exc:  # any import failure means "not ready yet"
        return f"import pillow_sdlatent failed: {type(exc).__name__}: {exc}"
    if "SDL" not in Image.SAVE:
        return "pillow_sdlatent imported but registered no SDL save handler"
    return None


def build_codecs(args: argparse.Namespace, autoencoders: Autoencoders) -> list[Codec]:
    wanted = args.codecs.split(",")
    unknown = set(wanted) - set(GRIDS)
    if unknown:
        raise SystemExit(f"unknown codecs {sorted(unknown)}; choose from {sorted(GRIDS)}")
    grids = dict(GRIDS)
    for item in args.grid:
        name, _, values = item.partition("=")
        if name not in GRIDS or not values:
            raise SystemExit(f"bad --grid {item!r}; expected CODEC=P1,P2 with CODEC from {sorted(GRIDS)}")
        grids[name] = [int(v) for v in values.split(",")]
    models = list(TAESD_CHANNELS) if args.models == "all" else args.models.split(",")
    if set(models) - {*TAESD_CHANNELS, AUTO}:
        raise SystemExit(f"unknown models {sorted(set(models) - {*TAESD_CHANNELS, AUTO})}; "
                         f"choose from {sorted(TAESD_CHANNELS)} or {AUTO!r}")
    fixed = {"jpeg": ("JPEG", {"optimize": True}), "webp": ("WEBP", {"method": 6}),
             "avif": ("AVIF", {"max_threads": args.threads}), "jxl": ("JXL", {"num_threads": args.threads})}
    codecs: list[Codec] = []
    for name in wanted:
        if name in fixed:
            fmt, options = fixed[name]
            codecs.append(PillowCodec(name, fmt, grids[name], options))
        elif name == "orig":
            four = [m for m in models if TAESD_CHANNELS.get(m) == 4]
            if len(four) < len(models):
                print("orig recipe: 16-channel models have no 4-channel palette form; running it on "
                      f"{four or 'no model'} only", file=sys.stderr)
            codecs += [OrigRecipe(autoencoders, m, dither, grids["orig"]) for m in four for dither in (True, False)]
        elif name == "sdl":
            reason = sdl_available()
            if reason:
                print(f"sdl codecs SKIPPED: {reason}", file=sys.stderr)
                continue
            shared = parse_options(" ".join(args.sdl_option))
            for config in args.sdl_config or [""]:
                options = {**shared, **parse_options(config)}
                text = " ".join(f"{k}={v}" for k, v in options.items())
                codecs += [PillowCodec("sdl", "SDL", grids["sdl"], {**options, **({} if m == AUTO else {"model": m})},
                                       m, text) for m in models]
    return codecs


def image_paths(folder: Path, limit: int | None, every: int = 1, offset: int = 0) -> list[Path]:
    """Images under ``folder`` and its subfolders, sorted by path; every ``every``-th from index ``offset``, then
    the first ``limit``."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = found[offset::every][:limit]
    if not paths:
        raise SystemExit(f"no images in {folder}")
    return paths


def load_samples(paths: list[Path]) -> Iterator[Sample]:
    """Images one at a time, so a sample's cached latents are freed with it."""
    for path in paths:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        yield Sample(path.name, image, np.asarray(image))


def run(args: argparse.Namespace, csv_path: Path) -> list[dict[str, Any]]:
    """Encode, decode and score every point, writing CSV rows as they come (a long run keeps its progress)."""
    from tqdm import tqdm

    autoencoders = Autoencoders(args.models_dir)
    codecs = build_codecs(args, autoencoders)
    if not codecs:
        raise SystemExit("nothing to run")
    paths = image_paths(args.images, args.limit, args.every, args.offset)
    stlpips = STLPIPS()
    rows: list[dict[str, Any]] = []
    with open(csv_path, "w", newline="") as handle, tqdm(
        total=len(paths) * sum(len(c.params) for c in codecs), unit="pt", file=sys.stderr
    ) as bar:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        for sample in load_samples(paths):
            reference = ReferenceMetrics(stlpips, sample.rgb)
            height, width = sample.rgb.shape[:2]
            for codec in codecs:
                for param in codec.params:
                    bar.set_postfix_str(f"{sample.name} {codec.label} {param}")
                    size, decoded = codec.code(sample, param)
                    row = {"config": codec.label, "codec": codec.codec, "model": codec.model, "options": codec.options,
                           "image": sample.name, "width": width, "height": height, "param": param,
                           "bytes": size, "bpp": size * 8 / (width * height), **reference(decoded)}
                    writer.writerow(row)
                    handle.flush()
                    rows.append(row)
                    bar.update()
    return rows


def read_csvs(paths: list[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append({**row, "param": int(row["param"]),
                             **{k: float(row[k]) for k in ("bpp", "psnr", "msssim", "msssim_db", "stlpips")}})
    return rows


def average_curves(rows: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, float]]], int]:
    """Per configuration, the points averaged over the images every configuration has.

    PSNR and ST-LPIPS are averaged per image; MS-SSIM is averaged and then put
    in dB (CompressAI's convention). Restricting to common images keeps a
    BD-rate from comparing different test sets when CSVs from several runs merge.
    """
    images_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        images_of[row["config"]].add(row["image"])
    common = set.intersection(*images_of.values())
    dropped = set.union(*images_of.values()) - common
    if dropped:
        print(f"averaging over the {len(common)} images all configurations share ({len(dropped)} left out)",
              file=sys.stderr)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["image"] in common:
            groups[(row["config"], row["param"])].append(row)
    curves: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (config, param), group in groups.items():  # configurations in run order
        if len(group) != len(common):
            print(f"{config} param {param}: {len(group)} of {len(common)} images, point left out", file=sys.stderr)
            continue
        msssim = float(np.mean([r["msssim"] for r in group]))
        curves[config].append({
            "param": param, "bpp": float(np.mean([r["bpp"] for r in group])),
            "psnr": float(np.mean([r["psnr"] for r in group])), "msssim": msssim, "msssim_db": msssim_db(msssim),
            "stlpips": float(np.mean([r["stlpips"] for r in group])),
        })
    for points in curves.values():
        points.sort(key=lambda p: p["bpp"])
    return dict(curves), len(common)


def is_latent(config: str) -> bool:
    return config.startswith(("sdl/", "orig-"))


def span(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) - min(finite)


def bd_tables(curves: dict[str, list[dict[str, float]]], bd_range: tuple[float, float] | None) -> str:
    """Markdown: per metric, BD-rate of each latent configuration (rows) against every configuration (columns)."""
    tests = [c for c in curves if is_latent(c)]
    window = f", rates {bd_range[0]}-{bd_range[1]} bpp" if bd_range else ""
    parts = ["## BD-rate\n",
             "Rate change of the row codec against the column codec at equal quality (negative: the row needs "
             f"fewer bits), PCHIP in log-rate over the quality range both curves reach{window}; n/a: no overlap; "
             f"*: the shared range is under {NARROW_OVERLAP:.0%} of the shorter curve's quality span, so the "
             "number rests on a sliver of the curves.\n"]
    for metric, (name, label, higher) in METRICS.items():
        parts.append(f"### {label}\n\n| {name}: row vs column | " + " | ".join(curves) + " |")
        parts.append("|---|" + "---:|" * len(curves))
        sign = 1 if higher else -1
        for test in tests:
            cells = []
            test_curve = ([p["bpp"] for p in curves[test]], [sign * p[metric] for p in curves[test]])
            for anchor in curves:
                if anchor == test:
                    cells.append("—")
                    continue
                anchor_curve = ([p["bpp"] for p in curves[anchor]], [sign * p[metric] for p in curves[anchor]])
                value = bd_rate(*anchor_curve, *test_curve, bd_range)
                lo, hi = quality_overlap(*anchor_curve, *test_curve, bd_range)
                narrow = hi - lo < NARROW_OVERLAP * min(span(anchor_curve[1]), span(test_curve[1]))
                cells.append("n/a" if math.isnan(value) else f"{value:+.1f}%" + ("*" if narrow else ""))
            parts.append(f"| {test} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts) + "\n"


def curve_table(curves: dict[str, list[dict[str, float]]], n_images: int) -> str:
    lines = [f"## Average curves ({n_images} images)\n",
             "| config | param | bpp | PSNR | MS-SSIM | MS-SSIM dB | ST-LPIPS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for config, points in curves.items():
        lines += [f"| {config} | {p['param']} | {p['bpp']:.3f} | {p['psnr']:.2f} | {p['msssim']:.4f} | "
                  f"{p['msssim_db']:.2f} | {p['stlpips']:.4f} |" for p in points]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict[str, float]]], out: Path, n_images: int) -> list[Path]:
    """One PNG per metric, bpp 0-0.6; classic codecs thin, original recipe dashed, sdl bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    palette = plt.get_cmap("tab20").colors  # one colour per curve: the default cycle repeats after 10
    for metric, (name, label, higher) in METRICS.items():
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for index, (config, points) in enumerate(curves.items()):
            style = ({"lw": 2.2, "ls": "-"} if config.startswith("sdl/") else
                     {"lw": 1.4, "ls": "--"} if config.startswith("orig-") else {"lw": 1.2, "ls": "-"})
            ax.plot([p["bpp"] for p in points], [p[metric] for p in points], marker="o", ms=3, label=config,
                    color=palette[(2 * index) % 20 + (2 * index) // 20 % 2], **style)
        visible = [p[metric] for ps in curves.values() for p in ps if p["bpp"] <= 0.6 and math.isfinite(p[metric])]
        if visible:
            pad = 0.05 * (max(visible) - min(visible) or 1)
            ax.set_ylim(min(visible) - pad, max(visible) + pad)
        ax.set_xlim(0, 0.6)
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(label)
        ax.set_title(f"{name} vs rate, mean of {n_images} images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if higher else "upper right")
        fig.tight_layout()
        path = out / f"rd_{metric.replace('_db', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of test images (default: Kodak)")
    parser.add_argument("--limit", type=int, help="use only the first N images (sorted by name)")
    parser.add_argument("--every", type=int, default=1, help="use every N-th image (e.g. 40 of the training set)")
    parser.add_argument("--offset", type=int, default=0, help="with --every: start at this index (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "rd", help="folder for rd.md and rd_*.png")
    parser.add_argument("--csv", type=Path, help="where to write the points (default OUT/rd.csv)")
    parser.add_argument("--codecs", default="jpeg,webp,avif,jxl,orig,sdl", help=f"comma list from {sorted(GRIDS)}")
    parser.add_argument("--models", default="taesd",
                        help=f"TAESD models for sdl and orig, comma list from {list(TAESD_CHANNELS)} or 'all'; "
                             f"for sdl also {AUTO!r} (no model named: the codec picks one per rate)")
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("PILLOW_SDLATENT_MODELS") or DEFAULT_MODELS_DIR),
                        help="folder with {model}_encoder/decoder.safetensors")
    parser.add_argument("--sdl-config", action="append", metavar="OPTS",
                        help='one sdl configuration per use, e.g. "effort=2 coder=zstd" ("" = defaults); '
                             f'{", ".join(DECODE_KEYS)} are decode options')
    parser.add_argument("--sdl-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra save option for every sdl configuration")
    parser.add_argument("--grid", action="append", default=[], metavar="CODEC=P1,P2,...",
                        help="replace a codec's parameter grid, e.g. sdl=1,50,100 (defaults: GRIDS in rd.py)")
    parser.add_argument("--bd-range", type=float, nargs=2, metavar=("LO", "HI"), help="BD-rate rate window in bpp")
    parser.add_argument("--from-csv", type=Path, nargs="+", help="skip coding; tables and plots from these CSVs")
    parser.add_argument("--threads", type=int, default=1, help="torch and codec threads (default 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ["PILLOW_SDLATENT_MODELS"] = str(args.models_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        rows = read_csvs(args.from_csv)
    else:
        from PIL import AvifImagePlugin
        from pillow_jxl import JpegXLImagePlugin  # registers JXL

        AvifImagePlugin.DEFAULT_MAX_THREADS = JpegXLImagePlugin.DECODE_THREADS = args.threads
        rows = run(args, args.csv or args.out / "rd.csv")
    curves, n_images = average_curves(rows)
    report = f"# Rate-distortion, {n_images} images\n\n"
    report += bd_tables(curves, args.bd_range) + curve_table(curves, n_images)
    print(report)
    (args.out / "rd.md").write_text(report)
    for path in plot(curves, args.out, n_images):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
