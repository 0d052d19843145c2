"""Live progress of a run: rows, tokens and errors committed so far, and what the job is doing
before its first row (its phase); a rich progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Literal

Mode = Literal["plain", "bar", "off"]


def choose_mode(progress: bool | None, stream: Any = None) -> Mode:
    """`--progress`: plain lines; `--no-progress`: nothing; default: a bar on a terminal, plain
    lines elsewhere (logs, CI, Ray Jobs)."""
    if progress is False:
        return "off"
    if progress is True:
        return "plain"
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "plain"


class Progress:
    """Counts rows and tokens; shows them every `interval` s (plain) or live (bar).

    `enabled` (True/False) is the plain-line switch kept for callers; `mode` overrides it.
    Until the first row arrives the line shows the latest phase (`set_phase`).
    """

    def __init__(self, total: int, enabled: bool = True, interval: float = 5.0,
                 stream: Any = None, label: str = "gemma-batch", mode: Mode | None = None):
        self.total, self.interval = total, interval
        self.mode: Mode = mode or ("plain" if enabled else "off")
        self.enabled = self.mode != "off"
        self.stream = stream or sys.stderr
        self.label = label
        self.rows = self.tokens = self.errors = 0
        self.phase: str | None = None
        self.phases: list[str] = []  # every phase shown, in order
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None

    def add(self, rows: int, tokens: int, errors: int) -> None:
        with self._lock:
            self.rows += rows
            self.tokens += tokens
            self.errors += errors
        self._refresh_bar()

    def set_phase(self, phase: str) -> None:
        """What the job is doing while no row is done yet; printed at once in plain mode."""
        with self._lock:
            if phase == self.phase or self.rows:
                return
            self.phase = phase
            self.phases.append(phase)
        if self.mode == "plain":
            print(self.line(), file=self.stream, flush=True)
        self._refresh_bar()

    def line(self) -> str:
        with self._lock:
            el = time.perf_counter() - self.t0
            if self.phase and not self.rows:
                return f"{self.label}: {self.phase} | 0/{self.total} rows | {el:.0f}s"
            pct = 100.0 * self.rows / self.total if self.total else 100.0
            tps = self.tokens / el if el > 0 else 0.0
            return (f"{self.label}: {self.rows}/{self.total} rows ({pct:.0f}%) | "
                    f"{tps:.1f} tokens/s | {self.errors} errors | {el:.0f}s")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=self.stream, flush=True)

    def start(self) -> None:
        if self.mode == "plain":
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        elif self.mode == "bar":
            self._start_bar()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self.mode == "plain":
            print(self.line(), file=self.stream, flush=True)
        elif self._bar is not None:
            self._refresh_bar()
            self._bar.stop()
            self._bar = None

    # The terminal bar (rich).

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rows"), TaskProgressColumn(),
            TextColumn("| {task.fields[tps]:.1f} tokens/s | {task.fields[errors]} errors |"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(file=self.stream), refresh_per_second=4, transient=False)
        self._task = self._bar.add_task(self._describe(), total=max(self.total, 1), tps=0.0,
                                        errors=0)
        self._bar.start()

    def _describe(self) -> str:
        return f"{self.label}: {self.phase}" if self.phase and not self.rows else self.label

    def _refresh_bar(self) -> None:
        bar = self._bar
        if bar is None:
            return
        with self._lock:
            el = time.perf_counter() - self.t0
            done = self.rows if self.total else 1
            bar.update(self._task, completed=done, description=self._describe(),
                       tps=self.tokens / el if el > 0 else 0.0, errors=self.errors)
