"""One writer per output: `with Lease(out, command) as lease:` holds `_LEASE.json` in it.

The file names the holder (host, pid, random token, command), when it was taken, its heartbeat
(Unix seconds; a daemon thread beats every quarter of the takeover time) and the takeover time
(GEMMA_BATCH_LEASE_TIMEOUT_S, default 120 s). A live lease refuses another run (InputError);
a stale one (its run died) is taken over with a warning. Hosts' clocks must roughly agree.

Taking is atomic on local paths (O_CREAT|O_EXCL). Object stores have no portable create-if-absent
in fsspec, so there (and to take over a stale lease) it is last-writer-wins + verify: write ours,
wait a settle delay, re-read, and hold it only if our token is still there. A heartbeat finding
another token marks the lease lost, and `Lease.check()` then fails the run before it publishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Self

from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import InputError, JobError
from pipeline.storage import unreachable_now

if TYPE_CHECKING:
    from pipeline.output import OutputDir

log = logging.getLogger(__name__)

LEASE = "_LEASE.json"
TIMEOUT_ENV = "GEMMA_BATCH_LEASE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0
_HELD: set[str] = set()  # tokens of the leases this process holds
_utc = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def timeout_s() -> float:
    """The takeover time: GEMMA_BATCH_LEASE_TIMEOUT_S seconds, default 120."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip() or str(DEFAULT_TIMEOUT_S)
    try:
        if (value := float(raw)) > 0:
            return value
    except ValueError:
        pass
    raise InputError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds above 0; fix or unset it")


@dataclasses.dataclass
class Holder:
    """Who holds a lease, as written in `_LEASE.json`."""

    token: str
    host: str
    pid: int
    command: str
    taken_at: float  # Unix seconds
    heartbeat: float  # Unix seconds
    timeout_s: float  # the takeover time this holder promised to beat within

    def to_json(self) -> bytes:
        owner = {"host": self.host, "pid": self.pid, "token": self.token, "command": self.command}
        return json.dumps({"owner": owner, "taken_at": self.taken_at, "heartbeat": self.heartbeat,
                           "timeout_s": self.timeout_s}).encode()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Holder:
        o = d["owner"]
        return cls(str(o["token"]), str(o["host"]), int(o["pid"]), str(o.get("command", "?")),
                   float(d["taken_at"]), float(d["heartbeat"]), float(d["timeout_s"]))

    def stale(self) -> bool:  # no heartbeat for longer than the holder's takeover time
        return time.time() - self.heartbeat > self.timeout_s

    def describe(self) -> str:
        return (f"{self.host} pid {self.pid} ({self.command}), since {_utc(self.taken_at)}, "
                f"last heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago")

    def refusal(self, output: str) -> InputError:
        """One line: who writes `output`, and when its lease may be taken over."""
        return InputError(
            f"output {output} is being written by another run: {self.describe()}; wait for it "
            f"to finish, or rerun after {_utc(self.heartbeat + self.timeout_s)} when its lease "
            f"({LEASE}) may be taken over if its heartbeat has stopped "
            f"({self.timeout_s:.0f} s without one)")


def read(d: OutputDir) -> Holder | None:
    """The lease on `d`, or None; an unreadable one is judged by its file's age."""
    path = d._p(LEASE)
    for _ in range(3):  # a local lease is readable a moment after its O_EXCL create
        try:
            return Holder.from_json(json.loads(d.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            time.sleep(0.1)
    try:
        mtime = d.fs.modified(path).timestamp()
    except (OSError, NotImplementedError, AttributeError):
        mtime = time.time()
    return Holder("?", "unknown host", 0, "unreadable lease", mtime, mtime, timeout_s())


def refuse_if_held(d: OutputDir) -> None:
    """Raises InputError when another run holds a live lease on `d` (this process's own leases
    and stale ones pass)."""
    if (h := read(d)) is not None and h.token not in _HELD and not h.stale():
        raise h.refusal(d.given)


def fence(d: OutputDir, token: str | None) -> str | None:
    """For a worker about to write into `d` for the run holding lease `token`: None when that
    run still holds it live, else why not to write (its driver died, or another run took over),
    so a dead run's workers stop adding rows a later run may also write."""
    if token is None:
        return None
    h = read(d)
    if h is None or h.token != token:
        return f"the run's lease {LEASE} on {d.given} is gone or taken over by another run"
    if h.stale():
        return (f"the run's lease {LEASE} on {d.given} went stale (its driver has not "
                f"beaten for {time.time() - h.heartbeat:.0f} s)")
    return None


class Lease:
    """A run's hold on one output's lease; as a context manager, taken for the block (InputError,
    nothing written, when another run holds it live) and released on finish or failure."""

    def __init__(self, d: OutputDir, command: str):
        self.d, now = d, time.time()
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), command, now, now,
                         timeout_s())
        self._stop, self._lost = threading.Event(), False
        self._thread = threading.Thread(target=self._beat, daemon=True, name="gemma-lease")

    def take(self) -> None:
        """Takes the lease (or raises InputError naming the live holder); starts heartbeats."""
        path, self._made = self.d._p(LEASE), self.d.missing_folders()
        try:
            if not isinstance(self.d.fs, LocalFileSystem):
                self._write_and_verify()
            else:  # atomic create-if-absent on the final name
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:  # held, stale or just released
                    self._write_and_verify()
                else:
                    with os.fdopen(fd, "wb") as f:
                        f.write(self.me.to_json())
        except OSError as e:
            raise JobError(f"output {self.d.given}: cannot write its lease {LEASE} ({e}); "
                           "check storage access") from None
        _HELD.add(self.me.token)
        self._thread.start()

    def _write_and_verify(self) -> None:
        """Last writer wins, then verify (object stores; a stale lease anywhere)."""
        if (other := read(self.d)) is not None:
            if not other.stale():
                raise other.refusal(self.d.given)
            log.warning("output %s: taking over the stale lease of %s", self.d.given,
                        other.describe())
        self.d.write_bytes(LEASE, self.me.to_json())
        time.sleep(min(1.0, self.me.timeout_s / 8))  # let a competing writer land
        if (now := read(self.d)) is None or now.token != self.me.token:
            raise now.refusal(self.d.given) if now else InputError(
                f"output {self.d.given}: its lease {LEASE} vanished while taking it; another run "
                "is starting here; rerun later")

    def _beat(self) -> None:
        while not self._stop.wait(self.me.timeout_s / 4):
            try:
                if (h := read(self.d)) is None or h.token != self.me.token:
                    self._lost = True
                    log.error("output %s: this run lost its lease to %s", self.d.given,
                              h.describe() if h else "nobody (the file was removed)")
                    return
                if self._stop.is_set():  # released while this beat read: write nothing
                    return
                self.me.heartbeat = time.time()
                self.d.write_bytes(LEASE, self.me.to_json())
            except Exception as e:  # noqa: BLE001 - retried at the next beat
                log.debug("output %s: lease heartbeat failed: %s", self.d.given, e)

    def check(self) -> None:
        """Raises JobError when this run no longer holds the lease (call before publishing)."""
        if self._lost or (h := read(self.d)) is None or h.token != self.me.token:
            raise JobError(f"output {self.d.given}: this run lost its lease {LEASE} to another "
                           "run; nothing was published; let one run write here, rerun --resume")

    def __enter__(self) -> Self:
        self.take()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Stops the heartbeat; removes the lease if still ours (only after `take`).

        When the storage takes no connection (a run failing because its store went away), the
        lease is left to go stale rather than waiting out the storage library's retries first.
        """
        self._stop.set()
        _HELD.discard(self.me.token)
        if (cause := unreachable_now(self.d.url)) is not None:
            log.debug("output %s: storage unreachable (%s); its lease goes stale %.0f s after "
                      "the last heartbeat", self.d.given, cause, self.me.timeout_s)
            return
        self._thread.join(timeout=30)
        try:
            if (h := read(self.d)) is not None and h.token == self.me.token:
                self.d.remove([LEASE])
                self.d.remove_empty(self._made)  # a run that wrote nothing leaves nothing
        except Exception as e:  # noqa: BLE001 - a leftover lease goes stale on its own
            log.debug("output %s: could not remove its lease: %s", self.d.given, e)
