"""Convert many images, on one machine or a Ray cluster, resumably and with a report of every input.

The work on one batch of files (``Converter``) is the same for both engines. Ray Data runs one
``Converter`` per actor, so each worker loads its model once and encodes several images per device
batch; the local engine runs one in this process. A rerun skips outputs that exist and verify, outputs
are renamed into place only when complete, and a file that cannot be converted becomes a ``failed``
row of the report instead of stopping the run.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
from PIL import Image

from ._atomic import atomic_write

Target = Literal["sdl", "png", "latent"]
Engine = Literal["ray", "local"]

#: the output file's suffix per target
SUFFIXES: dict[str, str] = {"sdl": ".sdl", "png": ".png", "latent": ".npy"}
#: an input with one of these suffixes is a manifest: one path per line, relative to the manifest's folder
MANIFEST_SUFFIXES = (".txt", ".lst")
REPORT_COLUMNS = ("source", "target", "outcome", "error", "bytes", "bpp", "seconds", "cpu_seconds")
#: at most this many files per worker call unless asked otherwise (a GPU batch; fewer when files are few)
DEFAULT_BATCH_SIZE = 16
#: environment variables that choose models and devices, passed on to Ray workers on other machines
FORWARDED_ENV_PREFIXES = ("PILLOW_SDLATENT_", "HF_HUB_OFFLINE", "HF_HOME")

Row = dict[str, Any]
Batch = dict[str, np.ndarray]


@dataclass
class Summary:
    """The tally of a run; every input's row is in the report file."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    report: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, batch: Batch) -> None:
        for outcome, source, error, size in zip(batch["outcome"], batch["source"], batch["error"], batch["bytes"],
                                                strict=True):
            setattr(self, str(outcome), getattr(self, str(outcome)) + 1)
            self.bytes += int(size)
            if outcome == "failed":
                self.failures.append((str(source), str(error)))


def source_suffixes(to: Target) -> frozenset[str]:
    """The suffixes a folder search picks up: images Pillow can open for ``sdl``, ``.sdl`` files for ``png``."""
    readable = {ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN}
    if to == "png":
        return frozenset({".sdl"})
    return frozenset(readable - {".sdl"} if to == "sdl" else readable)


def plan(inputs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
         to: Target) -> list[tuple[str, str]]:
    """(source, output) pairs: a folder is searched recursively and mirrored below ``out_dir``.

    Loose files, given directly or listed in a manifest (``.txt``/``.lst``), are mirrored below
    their common folder, so that ``a/x.jpg`` and ``b/x.jpg`` do not meet in one output.
    """
    suffix, wanted = SUFFIXES[to], source_suffixes(to)
    out = Path(out_dir)
    pairs: list[tuple[str, str]] = []
    loose: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            sources = sorted(p for p in path.rglob("*") if p.suffix.lower() in wanted and p.is_file())
            pairs.extend((str(p), str(out / p.relative_to(path).with_suffix(suffix))) for p in sources)
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            loose.extend(read_manifest(path))
        else:
            loose.append(path.absolute())
    if loose:
        root = Path(os.path.commonpath([p.parent for p in loose]))
        pairs.extend((str(p), str(out / p.relative_to(root).with_suffix(suffix))) for p in loose)
    return pairs


def read_manifest(path: Path) -> list[Path]:
    """The absolute paths listed in a manifest; blank lines and ``#`` comments are ignored."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [(path.parent / line).absolute() for line in lines if line and not line.startswith("#")]


class Converter:
    """Converts one batch of files; one instance per worker (a Ray actor), so its model loads once.

    ``options`` are ``encode_images``'s save options for the ``sdl`` and ``latent`` targets and
    ``decode_files``'s keyword arguments for ``png``.
    """

    def __init__(self, to: Target, options: dict[str, Any] | None = None) -> None:
        self.to = _checked_target(to)
        self.options = dict(options or {})
        self.warm = to == "png"  # a decoder is chosen by each file's header, so it loads with the first batch

    def __call__(self, batch: Batch) -> Batch:
        rows: list[Row] = []
        pending: list[tuple[str, str, int, Any, np.ndarray]] = []
        for source, target in zip(map(str, batch["source"]), map(str, batch["target"]), strict=True):
            started = _clock()
            if self.verified(Path(target)):
                size = os.path.getsize(target)
                rows.append(_row(source, target, "skipped", "", size, _pixels(source), _clock() - started))
                continue
            try:
                payload, pixels = self.load(Path(source))
            except Exception as exc:
                rows.append(_row(source, target, "failed", _describe(exc), 0, 0, _clock() - started))
                continue
            pending.append((source, target, pixels, payload, _clock() - started))
        if pending and not self.warm:  # the encoder loads (and bad options fail) outside the files' times
            self.run([Image.new("RGB", (64, 64))])
            self.warm = True
        started = _clock()
        outputs = _isolated(self.run, [payload for *_, payload, _ in pending])
        share = (_clock() - started) / max(len(pending), 1)
        for (source, target, pixels, _, load_time), output in zip(pending, outputs, strict=True):
            started = _clock()
            if not isinstance(output, Exception):
                try:
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(target, output)
                except Exception as exc:
                    output = exc
            seconds = load_time + share + _clock() - started
            if isinstance(output, Exception):
                rows.append(_row(source, target, "failed", _describe(output), 0, pixels, seconds))
            else:
                rows.append(_row(source, target, "done", "", len(output), pixels, seconds))
        return _columns(rows)

    def verified(self, target: Path) -> bool:
        """Whether ``target`` exists and is whole: every CRC of an ``.sdl``/PNG, the array length of a ``.npy``."""
        if not target.is_file():
            return False
        try:
            if self.to == "latent":
                np.load(target, mmap_mode="r", allow_pickle=False)
            else:
                with Image.open(target, formats=[self.to.upper()]) as image:
                    image.verify()
        except Exception:
            return False
        return True

    def load(self, source: Path) -> tuple[Any, int]:
        """What ``run`` takes for one file (a loaded image, or an ``.sdl`` file's bytes), and its pixel count."""
        if self.to == "png" or (self.to == "latent" and source.suffix.lower() == ".sdl"):
            data = source.read_bytes()
            with Image.open(io.BytesIO(data), formats=["SDL"]) as image:
                return data, image.width * image.height
        with Image.open(source) as image:
            image.load()
        return image, image.width * image.height

    def run(self, payloads: Sequence[Any]) -> list[bytes]:
        """The output files' bytes for a batch of loaded inputs; same-sized images share device batches."""
        from . import decode_files, encode_images, read_latent

        if self.to == "sdl":
            return encode_images(payloads, self.options)
        if self.to == "png":
            return [_png_bytes(image) for image in decode_files(payloads, **self.options)]
        encoded = iter(encode_images([p for p in payloads if isinstance(p, Image.Image)], self.options))
        files = [next(encoded) if isinstance(p, Image.Image) else p for p in payloads]
        return [_npy_bytes(read_latent(data)) for data in files]


def _checked_target(to: str) -> Target:
    if to not in SUFFIXES:
        raise ValueError(f"to must be one of {', '.join(SUFFIXES)}, not {to!r}")
    return to  # type: ignore[return-value]


def _isolated(work: Callable[[list[Any]], list[bytes]], items: list[Any]) -> list[bytes | Exception]:
    """``work`` on all items at once; if that fails, on each alone, so that a bad item spoils only itself."""
    if not items:
        return []
    try:
        return list(work(items))
    except Exception as exc:
        if len(items) == 1:
            return [exc]
    return [_isolated(work, [item])[0] for item in items]


def _columns(rows: list[Row]) -> Batch:
    """Rows as report columns, the batch format Ray Data passes between stages."""
    return {column: np.array([row[column] for row in rows]) for column in REPORT_COLUMNS}


def _clock() -> np.ndarray:
    """Wall and CPU seconds (this process, all threads): the CPU time is what a busy shared machine distorts least."""
    return np.array([time.perf_counter(), time.process_time()])


def _row(source: str, target: str, outcome: str, error: str, size: int, pixels: int, seconds: np.ndarray) -> Row:
    """A report row; ``seconds`` holds the wall and CPU time spent on this file."""
    bpp = size * 8 / pixels if pixels and size else math.nan
    return {"source": source, "target": target, "outcome": outcome, "error": error, "bytes": size,
            "bpp": bpp, "seconds": float(seconds[0]), "cpu_seconds": float(seconds[1])}


def _pixels(source: str) -> int:
    """The source's pixel count from its header (0 if it no longer opens), for a skipped file's bpp."""
    try:
        with Image.open(source) as image:
            return image.width * image.height
    except Exception:
        return 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(latent: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, latent, allow_pickle=False)
    return buffer.getvalue()


def convert(inputs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *, to: Target = "sdl",
            engine: Engine = "ray", workers: int | None = None, batch_size: int | None = None,
            options: dict[str, Any] | None = None, report: str | os.PathLike[str] | None = None,
            address: str | None = None, gpus_per_worker: float = 1.0, progress: bool = True) -> Summary:
    """Convert every input to ``to`` below ``out_dir`` and write a report row per input.

    ``inputs``: folders (searched recursively, mirrored), files and manifests (see ``plan``).
    ``to``: ``sdl`` (encode images), ``png`` (decode ``.sdl`` files) or ``latent`` (a ``.npy`` with
    ``read_latent``'s (C, H, W) float32 array, from ``.sdl`` files or by encoding images).
    ``engine``: ``ray`` (``workers`` actors on the cluster at ``address``, a new local one if none is
    running) or ``local`` (this process). On a cluster with GPUs each actor takes ``gpus_per_worker``
    of one (0.25: four actors share a GPU, which keeps it busy while each entropy-codes on its CPU)
    and ``workers`` defaults to as many as the GPUs hold; without GPUs, to one per CPU.
    ``report``: a ``.csv`` path, or ``.parquet`` (needs pyarrow); default ``out_dir/convert-report.csv``.
    ``progress``: a tqdm bar for the local engine (Ray Data shows its own).
    """
    if engine not in ("ray", "local"):
        raise ValueError(f"engine must be 'ray' or 'local', not {engine!r}")
    if engine == "local" and workers not in (None, 1):
        raise ValueError("the local engine runs one worker; use engine='ray' for more")
    _checked_target(to)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs, clashes = _without_clashes(plan(inputs, out, to))
    summary = Summary(report=Path(report) if report else out / "convert-report.csv")
    started = time.perf_counter()
    with ReportWriter(summary.report) as writer:
        if clashes:
            writer.write(clashes)
            summary.add(clashes)
        if jobs:
            batches = (_run_on_ray(jobs, to, options, workers, batch_size, address, gpus_per_worker)
                       if engine == "ray"
                       else _run_here(jobs, to, options, batch_size or DEFAULT_BATCH_SIZE, progress))
            for batch in batches:
                writer.write(batch)
                summary.add(batch)
    summary.seconds = time.perf_counter() - started
    return summary


def _without_clashes(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], Batch]:
    """The pairs whose output no earlier pair writes, and failed rows for the others (``x.png`` and ``x.jpg``)."""
    first_source: dict[str, str] = {}
    jobs, clashes = [], []
    for source, target in pairs:
        if target in first_source:
            clashes.append(_row(source, target, "failed", f"same output as {first_source[target]}", 0, 0,
                                np.zeros(2)))
        else:
            first_source[target] = source
            jobs.append((source, target))
    return jobs, _columns(clashes) if clashes else {}


def _batch(jobs: Sequence[tuple[str, str]]) -> Batch:
    return {"source": np.array([s for s, _ in jobs]), "target": np.array([t for _, t in jobs])}


def _run_here(jobs: list[tuple[str, str]], to: Target, options: dict[str, Any] | None, batch_size: int,
              progress: bool) -> Iterator[Batch]:
    from tqdm import tqdm

    converter = Converter(to, options)
    with tqdm(total=len(jobs), desc=f"convert to {to}", unit="file", disable=not progress) as bar:
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            yield converter(_batch(chunk))
            bar.update(len(chunk))


def _run_on_ray(jobs: list[tuple[str, str]], to: Target, options: dict[str, Any] | None, workers: int | None,
                batch_size: int | None, address: str | None, gpus_per_worker: float) -> Iterator[Batch]:
    """Stream result batches from a pool of ``Converter`` actors, with GPUs where the cluster has them."""
    try:
        import ray
    except ImportError:
        raise ImportError("engine='ray' needs Ray: pip install 'pillow_sdlatent[ray]', or use engine='local'") from None
    if not ray.is_initialized():
        ray.init(address=address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = workers or int(gpus / gpus_per_worker) or max(int(resources.get("CPU", 1)), 1)
    # never so many files per call that some workers would get none
    per_call = min(batch_size or DEFAULT_BATCH_SIZE, max(1, math.ceil(len(jobs) / actors)))
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    dataset = ray.data.from_items([{"source": s, "target": t} for s, t in jobs],
                                  override_num_blocks=min(len(jobs), max(actors * 4, len(jobs) // per_call)))
    results = dataset.map_batches(Converter, fn_constructor_kwargs={"to": to, "options": options},
                                  batch_size=per_call, batch_format="numpy",
                                  compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                                  num_gpus=gpus_per_worker if gpus else 0, runtime_env={"env_vars": env})
    yield from results.iter_batches(batch_size=None, batch_format="numpy")


class ReportWriter:
    """Appends report rows as batches finish: CSV, or Parquet for a ``.parquet`` path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parquet = path.suffix.lower() == ".parquet"
        self._writer: Any = None
        self._file: Any = None

    def __enter__(self) -> ReportWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("source", pa.string()), ("target", pa.string()), ("outcome", pa.string()),
                                ("error", pa.string()), ("bytes", pa.int64()), ("bpp", pa.float64()),
                                ("seconds", pa.float64()), ("cpu_seconds", pa.float64())])
            self._writer = pq.ParquetWriter(self.path, schema)
        else:
            self._file = open(self.path, "w", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)
            self._writer.writerow(REPORT_COLUMNS)
        return self

    def write(self, batch: Batch) -> None:
        if self.parquet:
            import pyarrow as pa

            self._writer.write_table(pa.table({column: batch[column] for column in REPORT_COLUMNS},
                                              schema=self._writer.schema))
        else:
            for values in zip(*(batch[column] for column in REPORT_COLUMNS), strict=True):
                source, target, outcome, error, size, bpp, seconds, cpu_seconds = values
                self._writer.writerow([source, target, outcome, error, int(size), f"{bpp:.4f}", f"{seconds:.3f}",
                                       f"{cpu_seconds:.3f}"])
            self._file.flush()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        (self._writer if self.parquet else self._file).close()
