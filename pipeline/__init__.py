"""gemma-batch's Ray Data pipeline: the job spec, preflight, reading, the generator actor, the
commit loop and publish. Names are exported lazily, so importing the spec stays light.

    from pipeline import build_spec, run_job
    summary = run_job(build_spec({"input": "in/", "output": "out/", "model": "tiny-gemma3"}))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"run_job": "pipeline.run", "build_spec": "pipeline.spec", "JobSpec": "pipeline.spec",
            "InputError": "pipeline.errors", "JobError": "pipeline.errors"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
