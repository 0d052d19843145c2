"""gemma-batch's Ray Data pipeline: storage, prompts, the generator actor, and the job runner.

    from jobs.spec import build_spec
    from pipeline import run_job
    summary = run_job(build_spec({"input": "in/", "output": "out/", "model": "tiny-gemma3"}))
"""

from pipeline.errors import InputError, JobError
from pipeline.run import run_job

__all__ = ["run_job", "InputError", "JobError"]
