"""Live progress of a run: rows, tokens and errors committed so far, as plain lines."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


class Progress:
    """Counts rows and tokens; prints a plain line every `interval` s when enabled."""

    def __init__(self, total: int, enabled: bool, interval: float = 5.0,
                 stream: Any = None, label: str = "gemma-batch"):
        self.total, self.enabled, self.interval = total, enabled, interval
        self.stream = stream or sys.stderr
        self.label = label
        self.rows = self.tokens = self.errors = 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, rows: int, tokens: int, errors: int) -> None:
        with self._lock:
            self.rows += rows
            self.tokens += tokens
            self.errors += errors

    def line(self) -> str:
        with self._lock:
            el = time.perf_counter() - self.t0
            pct = 100.0 * self.rows / self.total if self.total else 100.0
            tps = self.tokens / el if el > 0 else 0.0
            return (f"{self.label}: {self.rows}/{self.total} rows ({pct:.0f}%) | "
                    f"{tps:.1f} tokens/s | {self.errors} errors | {el:.0f}s")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=self.stream, flush=True)

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self.enabled:
            print(self.line(), file=self.stream, flush=True)
