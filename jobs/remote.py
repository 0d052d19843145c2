"""Submitting batch jobs to a Ray cluster through the Ray Jobs API, and following them.

The spec is validated here, at the edge, then shipped to the cluster as `job.yaml` in the job's
working directory; the cluster runs `gemma-batch run job.yaml` as the job's entrypoint, so a
submitted job behaves exactly like a local `gemma-batch run`. Token authentication stays on:
the client reads the cluster token from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
`~/.ray/auth_token`, as Ray's own clients do.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.spec import JobSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120.0  # how long to wait for a freshly started head's job agent


class RemoteError(RuntimeError):
    """The cluster could not be reached, refused us, or does not know the job (one line)."""

    exit_code = 1


def resolve_address(address: str | None) -> str:
    """--address, else RAY_JOBS_ADDRESS / RAY_ADDRESS when it is an http(s) URL, else local."""
    if address:
        if not address.startswith(("http://", "https://")):
            raise RemoteError(f"--address {address!r} is not a Jobs API URL; use the dashboard "
                              "URL, e.g. http://HEAD:8265")
        return address.rstrip("/")
    for var in ("RAY_JOBS_ADDRESS", "RAY_ADDRESS"):
        cand = os.environ.get(var, "")
        if cand.startswith(("http://", "https://")):
            return cand.rstrip("/")
    return DEFAULT_ADDRESS


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - Ray raises several types; all mean "not reachable"
        msg = " ".join(str(e).split())
        if "auth" in msg.lower() or "401" in msg or "403" in msg or "token" in msg.lower():
            raise RemoteError(
                f"the Ray cluster at {address} refused the request: token authentication "
                "failed; set RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token") from None
        raise RemoteError(f"cannot reach the Ray Jobs API at {address}: {msg[:200]} "
                          "(is the cluster up? for a remote cluster run `ray dashboard "
                          "CLUSTER.yaml` and use http://127.0.0.1:8265)") from None


def _call(address: str, what: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except RemoteError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())
        if "does not exist" in msg or "404" in msg:
            raise RemoteError(f"{what}: no such job on {address}") from None
        if "auth" in msg.lower() or "401" in msg or "403" in msg:
            raise RemoteError(f"{what}: the cluster at {address} refused the token; set "
                              "RAY_AUTH_TOKEN to the cluster's token") from None
        raise RemoteError(f"{what} on {address} failed: {msg[:300]}") from None


def _job_id(prefix: str = "gemma-batch") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"


def submit(spec: JobSpec, address: str | None = None, job_id: str | None = None,
           pip: list[str] | None = None) -> str:
    """Submits `spec` as a Ray job; returns its submission id.

    Args:
      spec: the validated job spec (paths must be reachable from the cluster: gs://, s3://, or
        a shared filesystem).
      address: the Jobs API URL (default: RAY_JOBS_ADDRESS, RAY_ADDRESS or localhost:8265).
      job_id: a submission id (default: gemma-batch-<time>-<random>); must be new.
      pip: extra pip requirements installed for the job by Ray's runtime_env.
    """
    address = resolve_address(address)
    if job_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", job_id):
        raise RemoteError(f"--job-id {job_id!r}: use letters, digits, '_', '.', '-' only")
    client = _client(address)
    workdir = Path(tempfile.mkdtemp(prefix="gemma-batch-submit-"))
    try:
        body = spec.to_file()  # keeps an explicit id_column: null
        (workdir / "job.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        # Only working_dir (and pip): `gemma-batch run` sets its own env_vars for its workers in
        # ray.init, and Ray refuses a job whose runtime_env sets the same field. Credentials come
        # from the cluster's own environment and are never shipped with a job.
        runtime_env: dict[str, Any] = {"working_dir": str(workdir)}
        if pip:
            runtime_env["pip"] = list(pip)
        sid = job_id or _job_id()
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                _call(address, "submit", client.submit_job,
                      entrypoint="gemma-batch run job.yaml --progress",
                      submission_id=sid, runtime_env=runtime_env,
                      metadata={"tool": "gemma-batch", "output": spec.output,
                                "model": spec.model, "task": spec.task})
                break
            except RemoteError as e:
                # A head that just started has no job agent yet; Ray says "try again later".
                if "try again later" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return sid


def status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """The job's status, message, entrypoint, metadata and times."""
    address = resolve_address(address)
    client = _client(address)
    info = _call(address, f"status of {job_id}", client.get_job_info, job_id)
    return {
        "job_id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata or {},
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(job_id: str, address: str | None = None) -> str:
    """Everything the job has printed so far."""
    address = resolve_address(address)
    client = _client(address)
    return _call(address, f"logs of {job_id}", client.get_job_logs, job_id)


def follow(job_id: str, address: str | None = None, poll_s: float = 1.0,
           timeout_s: float | None = None) -> Iterator[str]:
    """Yields new log text until the job ends (or `timeout_s` passes)."""
    address = resolve_address(address)
    seen = 0
    start = time.monotonic()
    while True:
        text = logs(job_id, address)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if status(job_id, address)["status"] in TERMINAL:
            text = logs(job_id, address)
            if len(text) > seen:
                yield text[seen:]
            return
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise RemoteError(f"job {job_id} still running after {timeout_s:.0f} s")
        time.sleep(poll_s)


def stop(job_id: str, address: str | None = None, timeout_s: float = 120.0,
         poll_s: float = 0.5) -> str:
    """Asks the cluster to stop the job and waits until it has ended; returns its final status
    (STOPPED, or SUCCEEDED/FAILED when it ended first). A stopped run publishes nothing: its
    output holds committed parts only, never `_SUCCESS` (`--resume` finishes it)."""
    address = resolve_address(address)
    client = _client(address)
    if status(job_id, address)["status"] not in TERMINAL:
        _call(address, f"stop {job_id}", client.stop_job, job_id)
    return wait(job_id, address, poll_s=poll_s, timeout_s=timeout_s)


def list_jobs(address: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The cluster's most recent jobs, newest first: id, status, times, entrypoint, metadata."""
    address = resolve_address(address)
    client = _client(address)
    found = []
    for j in _call(address, "list jobs", client.list_jobs):
        found.append({
            "job_id": j.submission_id or j.job_id,
            "status": str(getattr(j.status, "value", j.status)),
            "start_time": j.start_time,
            "end_time": j.end_time,
            "entrypoint": j.entrypoint,
            "metadata": j.metadata or {},
        })
    found.sort(key=lambda j: j["start_time"] or 0, reverse=True)
    return found[:limit]


def wait(job_id: str, address: str | None = None, poll_s: float = 1.0,
         timeout_s: float | None = None) -> str:
    """Blocks until the job ends; returns its final status."""
    start = time.monotonic()
    while True:
        st = status(job_id, address)["status"]
        if st in TERMINAL:
            return st
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise RemoteError(f"job {job_id} still {st} after {timeout_s:.0f} s")
        time.sleep(poll_s)
