"""What a job is doing before its first row: the generator actors report their phase (loading
the model, compiling programs) as entries under one job-unique prefix of Ray's key-value store
(held by the GCS, which every worker reaches); the driver polls that prefix for its progress line.
No process of its own: on a small machine an extra actor's worker start delays the generators'.
Reporting is best effort and never fails a job."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the driver reads the board
NAMESPACE = "gemma-batch-phases"


def _kv() -> Any:
    # Ray's internal key-value store (the GCS's; Ray Serve and runtime envs keep their own
    # bookkeeping there). Imported here so a job without Ray never loads it.
    from ray.experimental import internal_kv

    return internal_kv


class PhaseBoard:
    """Driver side: polls the job's prefix into `on_phase`, in report order; `close` removes it.

    A key is `<name>/<ns clock>-<actor>-<seq>`: sorted keys are the reports in the order they
    were made (an actor's own in sequence), whatever order the listing returns them in."""

    def __init__(self, on_phase: Callable[[str], None]):
        self.name = f"job-{uuid.uuid4().hex[:10]}"
        self._on_phase = on_phase
        self._seen: set[bytes] = set()
        self._by_actor: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def flush(self) -> None:
        """Shows the reports not shown yet, in order (the poller calls it; the driver also
        does right before its first row, so no phase reported before it is lost)."""
        with self._lock:
            try:
                kv = _kv()
                keys = sorted(set(kv._internal_kv_list(self.name + "/", namespace=NAMESPACE))
                              - self._seen)
                new = [(k, kv._internal_kv_get(k, namespace=NAMESPACE)) for k in keys]
            except Exception as e:  # noqa: BLE001 - progress is best effort
                log.debug("phase board read failed: %s", e)
                return
            for key, value in new:  # each in turn: a short phase is still shown (and logged)
                self._seen.add(key)
                if value is None:
                    continue
                who, phase = key.decode().rsplit("-", 2)[1], value.decode()
                self._by_actor[who] = phase
                same = sum(1 for p in self._by_actor.values() if p == phase)
                self._on_phase(f"{phase} ({same} actors)" if same > 1 else phase)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            _kv()._internal_kv_del(self.name + "/", del_by_prefix=True, namespace=NAMESPACE)
        except Exception as e:  # noqa: BLE001 - already gone with its cluster
            log.debug("phase board cleanup failed: %s", e)


class PhaseReporter:
    """Actor side: adds this process's phase to the board named `name` (None: reports nothing)."""

    def __init__(self, name: str | None):
        self._name = name
        self._who = f"{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._seq = 0
        self._lock = threading.Lock()

    def __call__(self, phase: str) -> None:
        """Adds `phase`; the board has it when this returns (one call to the GCS)."""
        if not self._name:
            return
        try:
            with self._lock:  # reports of one actor keep their order (the watcher's thread too)
                self._seq += 1
                key = f"{self._name}/{time.time_ns():020d}-{self._who}-{self._seq:06d}"
                _kv()._internal_kv_put(key, phase, namespace=NAMESPACE)
        except Exception as e:  # noqa: BLE001 - the cluster may be going; the job goes on
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
                self(f"first batch: {now} of about {max(planned, now)} programs compiled")

        def loop() -> None:
            while not stop.wait(0.25):
                tick()

        t = threading.Thread(target=loop, daemon=True)
        t.start()

        def stopper() -> None:
            stop.set()
            t.join(timeout=1)
            # Always: the board has every phase before the batch's rows reach the driver
            # (which reads the board before showing its first row).
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
