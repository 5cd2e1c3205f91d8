"""The ONNX Runtime path: the same TAESD networks, exported once per process and run by ORT on the CPU.

Why: on this project's 2-core AVX2 CPU, ORT's convolutions ran TAESD at 768x512 in
0.92 s (encode) and 1.02 s (decode), against 1.19 s and 1.26 s for torch with
channels-last (``python benchmarks/speed.py``, variant ``onnxruntime``). The export is
made in memory from the already loaded weights (no file, no download, under a
second), so the weight search path and the decoder digest stay exactly as they are.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: torch's exporter keeps global state: two exports at once (two threads, two models) would collide
_EXPORT_LOCK = threading.Lock()


def available() -> bool:
    """Whether onnxruntime, and onnx for torch's exporter, can be imported (the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxNetwork:
    """A (N, C, H, W) float32 -> float32 network run by ONNX Runtime, exported on first call.

    Height, width and batch are dynamic axes, so one session serves every image
    and tile size. Session runs are thread-safe; the export happens once behind a lock.
    """

    def __init__(self, owner: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                 in_channels: int, min_side: int) -> None:
        self._network = _Forward(owner, forward)
        self._example_shape = (1, in_channels, min_side, min_side)
        self._session: Any = None
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        session = self._session or self._build()
        return session.run(None, {"input": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def _build(self) -> Any:
        with self._lock:
            if self._session is None:
                self._session = _session_for(self._network, self._example_shape)
            return self._session


class _Forward(torch.nn.Module):
    """``forward`` as a module the exporter can trace; ``owner`` holds the weights it uses."""

    def __init__(self, owner: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def _session_for(network: torch.nn.Module, example_shape: tuple[int, ...]) -> Any:
    import onnxruntime

    graph = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with _EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(network, (torch.zeros(example_shape),), graph, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": axes, "output": axes})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
