"""Values loaded once and shared across threads: models, sessions and coder networks.

Standard library only, so that the normative core can use it as well as the model and enhancement layers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class LoadOnce:
    """Values built once per key and then shared, even when many threads ask for one at once.

    A lock per key lets two different models load in parallel while a second
    request for the same model waits for the first instead of loading it again.
    """

    def __init__(self) -> None:
        self.items: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self.items:
                return self.items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self.items:
                value = build()
                with self._lock:
                    self.items[key] = value
        return self.items[key]
