"""Error kinds of a job, each carrying its CLI exit code, and the user-facing cause of a failure
that Ray wrapped; messages are one line."""

from __future__ import annotations

import re


class InputError(ValueError):
    """Bad usage, spec or input data, found before anything is written (exit code 2)."""

    exit_code = 2


class JobError(RuntimeError):
    """The job started but could not finish: model load, storage, lost rows (exit code 1)."""

    exit_code = 1


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def root_cause(e: BaseException) -> str:
    """The user-facing cause inside Ray's wrappers: 'ErrorType: first line of its message'."""
    seen: set[int] = set()
    queue: list[BaseException] = [e]
    found: BaseException | None = None
    while queue:
        x = queue.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        is_ray = type(x).__module__.startswith("ray") or type(x).__name__.startswith("Ray")
        if not is_ray and not isinstance(x, JobError) and str(x).strip():
            found = x  # keep the deepest non-Ray error with a message
        nexts = [getattr(x, "cause", None), x.__cause__, x.__context__,
                 *(a for a in getattr(x, "args", ()) if isinstance(a, BaseException))]
        queue.extend(n for n in nexts if isinstance(n, BaseException))
    if found is not None:
        first = _ANSI.sub("", str(found)).strip().splitlines()[0]
        return f"{type(found).__name__}: {first}"[:400]
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:400]
