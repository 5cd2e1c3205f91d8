"""The long fuzz run for hostile and broken ``.sdl`` input (issue #4).

    python benchmarks/fuzz.py --inputs 100000 --workers 2

Seeds are tiny valid files of every mode, in every entropy coder, encoded once
with the real TAESD weights (set PILLOW_SDLATENT_MODELS). Every seed is first
cut at every length, then ``--inputs`` structure-aware mutants follow
(tests/fuzzing.py; the same ``--seed`` gives the same inputs). Each input runs
in a worker process through ``Image.open`` -> ``load()``, ``Image.open`` ->
``verify()`` and, for a quarter of them each, ``load()`` with
LOAD_TRUNCATED_IMAGES and ``thumbnail()`` (the latent preview path). A worker that crashes or exceeds ``--timeout`` is
reported and replaced; an input whose Python-heap peak or RSS growth is out of
proportion (tests/fuzzing.py: TRACED_LIMIT, RSS_LIMIT) counts as a failure.
Prints outcome counts by kind, writes ``<out>/summary.json`` and saves every
failing input (with its traceback) under ``<out>/failures/`` for
reproduction: ``Image.open(path).load()``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzzing import ACTIONS, FuzzPool, is_failure, make_seeds, mutate, truncations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="mutants to run (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="run seed: the same seed gives the same inputs")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds one input may take")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop starting new inputs after this")
    parser.add_argument("--no-truncations", action="store_true", help="skip cutting every seed at every length")
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    seeds = make_seeds()
    print(f"{len(seeds)} seeds ({sum(map(len, seeds.values()))} bytes) in {time.monotonic() - started:.1f} s")
    failures_dir = args.out / "failures"
    failures_dir.mkdir(parents=True, exist_ok=True)

    def cases():
        if not args.no_truncations:
            yield from truncations(seeds, sorted(seeds))
        for index in range(args.inputs):
            if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
                return
            yield mutate(args.seed, index, seeds)

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    failures: list[dict[str, Any]] = []
    peaks = {"traced": 0, "rss": 0}
    done = 0
    with FuzzPool(workers=args.workers, timeout=args.timeout, warmup=list(seeds.values())) as pool:
        print(f"{args.workers} workers ready after {time.monotonic() - started:.1f} s")
        for case, result in pool.map(cases()):
            done += 1
            for action, kind in result["outcomes"].items():
                counts[action][kind] += 1
            peaks["traced"] = max(peaks["traced"], result["traced_peak"])
            peaks["rss"] = max(peaks["rss"], result["rss_growth"])
            bad = {action: kind for action, kind in result["outcomes"].items() if is_failure(kind)}
            if bad:
                name = hashlib.sha1(case.data).hexdigest()[:12]
                (failures_dir / f"{name}.sdl").write_bytes(case.data)
                details = "\n".join(f"{action}: {text}" for action, text in result["details"].items())
                (failures_dir / f"{name}.txt").write_text(f"{case.label}\n{bad}\n\n{details}\n")
                failures.append({"file": f"{name}.sdl", "label": case.label, "outcomes": bad})
                print(f"FAILURE {bad} {case.label} -> {failures_dir / name}.sdl", flush=True)
            if done % 5000 == 0:
                print(f"{done} inputs, {time.monotonic() - started:.0f} s, {len(failures)} failures", flush=True)
    seconds = time.monotonic() - started

    summary = {
        "command": " ".join(["python", "benchmarks/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
        "inputs": done,
        "mutants": args.inputs,
        "seconds": round(seconds, 1),
        "workers": args.workers,
        "outcomes": {action: dict(counts[action].most_common()) for action in (*ACTIONS, "memory", "worker")
                     if counts[action]},
        "max_traced_peak_mb": round(peaks["traced"] / 2**20, 2),
        "max_rss_growth_mb": round(peaks["rss"] / 2**20, 2),
        "failures": failures,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{done} inputs in {seconds:.0f} s ({done / seconds:.0f}/s), {len(failures)} failing")
    for action, kinds in summary["outcomes"].items():
        print(f"  {action}:")
        for kind, count in kinds.items():
            print(f"    {count:8d}  {kind}")
    print(f"  peak Python heap per input {summary['max_traced_peak_mb']} MB, "
          f"peak RSS growth {summary['max_rss_growth_mb']} MB")
    print(f"summary: {args.out / 'summary.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
