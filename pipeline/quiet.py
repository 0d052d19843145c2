"""Ray's internal lines kept off the user's terminal unless --debug.

The driver's Ray core worker writes its warnings straight to file descriptor 2 (e.g. the line
about actor constructor arguments in the object store, which Ray Data's actor pool triggers with
its own constructor references on every run); the same lines are in the session's
`python-core-driver-*.log`. `NativeLogFilter` routes fd 2 through a pipe that drops lines in
Ray's native log format (fatal ones pass) and rebinds `sys.stderr` to the real terminal, so
Python's own output, progress bars and isatty() are untouched.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading

# "[2026-12-02 14:25:03,521 E 18823 18823] core_worker.cc:2465: ..." (D/I/W/E; F is kept)
RAY_NATIVE_LINE = re.compile(
    rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] [\w./-]+\.(?:cc|h|cpp):\d+: ")
_HOLD_MAX = 8192  # a partial line longer than this is passed on without waiting for its end


class NativeLogFilter:
    """Filters Ray's native log lines off fd 2 between `start()` and `stop()`."""

    def __init__(self) -> None:
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._py_stderr = None

    def start(self) -> bool:
        """Installs the filter; False (nothing done) when Python's stderr is already redirected
        (a test harness) or fd 2 cannot be duplicated."""
        if self._saved is not None or sys.stderr is not sys.__stderr__ or sys.stderr is None:
            return False
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            read, write = os.pipe()
        except OSError:
            return False
        os.dup2(write, 2)
        os.close(write)
        self._saved = saved
        self._py_stderr = sys.stderr
        enc = getattr(sys.stderr, "encoding", None) or "utf-8"
        sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(saved), "w"), encoding=enc,
                                      errors="backslashreplace", line_buffering=True,
                                      write_through=True)
        # The pump owns its read end and its own copy of the terminal: it closes both itself.
        self._thread = threading.Thread(target=self._pump, args=(read, os.dup(saved)),
                                        name="ray-native-log-filter", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Puts fd 2 and `sys.stderr` back; what was in flight is passed on first."""
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)  # closes the pipe's write end: the pump sees its end
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        replaced, sys.stderr = sys.stderr, self._py_stderr
        try:
            replaced.close()
        except (OSError, ValueError):
            pass
        os.close(self._saved)
        self._saved = self._thread = None

    def _pump(self, read: int, out: int) -> None:
        held = b""
        while True:
            try:
                chunk = os.read(read, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, held = (held + chunk).split(b"\n")
            keep = b"".join(ln + b"\n" for ln in lines if not RAY_NATIVE_LINE.match(ln))
            if held and (not held.startswith(b"[") or len(held) > _HOLD_MAX):
                keep, held = keep + held, b""  # a partial non-Ray line (a \r bar) passes now
            if keep:
                try:
                    os.write(out, keep)
                except OSError:
                    break
        if held and not RAY_NATIVE_LINE.match(held):
            try:
                os.write(out, held)
            except OSError:
                pass
        os.close(read)
        os.close(out)
