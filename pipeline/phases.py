"""What a job is doing before its first row: the generator actors report their phase (loading
the model, compiling programs) to a small named Ray actor that the driver polls for its progress
line. Reporting is fire-and-forget and never fails a job."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the driver reads the board


class _Board:
    """Every phase report, in the order they arrived, and each actor's latest."""

    def __init__(self) -> None:
        self._by_actor: dict[str, str] = {}
        self._reports: list[str] = []

    def report(self, who: str, phase: str) -> None:
        self._by_actor[who] = phase
        same = sum(1 for p in self._by_actor.values() if p == phase)
        self._reports.append(f"{phase} ({same} actors)" if same > 1 else phase)

    def since(self, seen: int) -> list[str]:
        """The reports after the first `seen` (words ready to show)."""
        return self._reports[seen:]


class PhaseBoard:
    """Driver side: creates the board actor, polls it into `on_phase`, removes it at `close`."""

    def __init__(self, on_phase: Callable[[str], None]):
        import ray

        self.name = f"gemma-batch-phases-{uuid.uuid4().hex[:10]}"
        # num_cpus=0: it must never take a CPU from the generator actors or the read tasks.
        self._actor = ray.remote(num_cpus=0, max_restarts=0)(_Board).options(
            name=self.name, lifetime=None).remote()
        self._on_phase = on_phase
        self._seen = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def flush(self) -> None:
        """Shows the reports not shown yet, in order (the poller calls it; the driver also
        does right before its first row, so no phase reported before it is lost)."""
        import ray

        with self._lock:
            try:
                new = ray.get(self._actor.since.remote(self._seen), timeout=5)
            except Exception as e:  # noqa: BLE001 - progress is best effort
                log.debug("phase board read failed: %s", e)
                return
            self._seen += len(new)
            for phase in new:  # each in turn: a short phase is still shown (and logged)
                self._on_phase(phase)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self.flush()

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=2)
        try:
            ray.kill(self._actor)
        except Exception as e:  # noqa: BLE001 - already gone with its cluster
            log.debug("phase board kill failed: %s", e)


class PhaseReporter:
    """Actor side: sends this process's phase to the board named `name` (None: reports nothing)."""

    def __init__(self, name: str | None):
        self._name, self._handle = name, None
        self._who = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def __call__(self, phase: str, wait: bool = False) -> None:
        """Sends `phase`; `wait`: until the board has it (and every earlier report of ours)."""
        if not self._name:
            return
        try:
            import ray

            if self._handle is None:
                self._handle = ray.get_actor(self._name)
            ref = self._handle.report.remote(self._who, phase)
            if wait:
                ray.get(ref, timeout=5)
        except Exception as e:  # noqa: BLE001 - the board may be gone; the job goes on
            log.debug("phase report failed: %s", e)
            self._name = None

    def watch_compiles(self, count: Callable[[], int], planned: int) -> Callable[[], None]:
        """Reports "first batch: k of about N programs compiled" while `count()` grows (the
        batch then generates); returns a stopper."""
        stop = threading.Event()

        last = [count()]

        def tick(final: bool = False) -> None:
            now = count()
            if now != last[0] or final:
                last[0] = now
                self(f"first batch: {now} of about {max(planned, now)} programs compiled",
                     wait=final)

        def loop() -> None:
            while not stop.wait(0.25):
                tick()

        t = threading.Thread(target=loop, daemon=True)
        t.start()

        def stopper() -> None:
            stop.set()
            t.join(timeout=1)
            # Always, and waited for: the board has every phase before the batch's rows reach
            # the driver (which reads the board before showing its first row).
            tick(final=True)

        return stopper


def phase_text(kind: str, **kw: Any) -> str:
    """The words shown for each phase (one place, so tests and docs agree)."""
    return {
        "ray_start": "starting Ray",
        "ray_connect": "connecting to Ray",
        "actors": "starting {n} actor" + ("" if kw.get("n") == 1 else "s"),
        "load": "loading the model",
        "compile": "compiling about {n} programs and generating the first batch",
    }[kind].format(**kw)
