"""The ONNX Runtime path: the package's networks as ONNX graphs (``onnx_graphs``), run by ORT on the CPU.

Why: it needs neither torch nor diffusers, and on this project's 2-core AVX2 CPU
ORT's convolutions ran TAESD at 768x512 in 0.92 s (encode) and 1.02 s (decode),
against 1.19 s and 1.26 s for torch with channels-last (``python benchmarks/speed.py``,
variant ``onnxruntime``). Graphs are written in memory from the loaded weights
(no file, no download, a fraction of a second), on first use.
"""

from __future__ import annotations

import functools
import platform
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

#: /proc/cpuinfo flags of x86 CPUs whose 8-bit dot products (VPDPBUSD) add into int32 without saturating
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


@functools.cache
def int8_exact() -> bool:
    """Whether ONNX Runtime's int8 convolutions compute exactly on this CPU.

    On x86 without VNNI they multiply with VPMADDUBSW, whose pairwise int16 sums of uint8 x int8
    products saturate with full 8-bit weights (ONNX Runtime's documented caveat), so only CPUs with
    VNNI count; they are found in /proc/cpuinfo, so other systems on x86 count as unknown (no).
    ARM's 8-bit dot products accumulate in int32 and have no such problem.
    """
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return not VNNI_FLAGS.isdisjoint(flags)


def available() -> bool:
    """Whether onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxNetwork:
    """A network (float32 inputs and output) run by ONNX Runtime; its graph is written and its session opened on
    first call.

    Batch, height and width are dynamic, so one session serves every image and
    tile size. Session runs are thread-safe; the session is built once behind a lock.
    """

    def __init__(self, graph: Callable[[], bytes]) -> None:
        self._graph = graph
        self._session: Any = None
        self._lock = threading.Lock()

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        """The graph's one output for named float32 inputs (``input=`` for the TAESD halves)."""
        session = self._session or self._build()
        feed = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in inputs.items()}
        return session.run(None, feed)[0]

    def _build(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
                self._session = onnxruntime.InferenceSession(self._graph(), options,
                                                             providers=["CPUExecutionProvider"])
            return self._session
