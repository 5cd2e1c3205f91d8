"""A short fuzz run (issue #4): every mutant is decoded or refused with an allowed exception.

The long run is ``python benchmarks/fuzz.py --inputs 100000 --workers 2``; this
one takes about a minute on two cores, most of it starting the two workers.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest

from tests.fuzzing import FuzzPool, is_failure, make_seeds, mutate, truncations

MUTANTS = 1000


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return make_seeds()


def test_short_fuzz_run(seeds: dict[str, bytes]) -> None:
    cases = itertools.chain(
        truncations(seeds, ["la-8x16"]),
        (mutate(20261122, index, seeds) for index in range(MUTANTS)),
    )
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    failures = []
    with FuzzPool(workers=2, timeout=30.0, warmup=list(seeds.values())) as pool:
        for case, result in pool.map(cases):
            for action, kind in result["outcomes"].items():
                counts[action][kind] += 1
            bad = {action: kind for action, kind in result["outcomes"].items() if is_failure(kind)}
            if bad:
                failures.append((case.label, bad, result["details"]))
    print("\n" + "\n".join(f"{action}: {dict(kinds.most_common())}" for action, kinds in counts.items()))
    assert not failures, failures[:5]
    # the mutants must reach past the header checks, or the run proves little
    assert counts["load"]["decoded"] > 50 and counts["load"]["DamagedFileError"] > 100
    assert counts["load_truncated"]["decoded"] > 25 and counts["thumbnail"]["thumbnail"] > 25
