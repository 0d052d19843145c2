"""Running a batch job on a cron schedule, on a Ray cluster (Jobs API) or locally.

`gemma-batch schedule job.yaml --cron "0 2 * * *"` stays in the foreground (run it under
systemd, a Kubernetes Deployment or tmux) and, at each tick, starts the job with its output
rendered from the spec's template: `{date}` (YYYY-MM-DD), `{time}` (HHMMSS), `{datetime}`
(YYYYMMDDTHHMMSS) and `{run}` (the run number) are filled in from the tick's UTC time, so every
run writes its own directory. A tick that comes while the previous run is still going is skipped
(and logged), never stacked. Ticks missed while the scheduler was down are not replayed. A state
file records every run, so a restarted scheduler carries on counting and never repeats a tick.
With `--incremental` (the spec's `incremental`), every run generates only the rows that no
earlier run produced with the same content and settings; the ledger is kept beside the outputs
(`_LEDGER/` in the directory above the template's first placeholder) unless the spec names one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.spec import JobSpec, SpecError
from model.paths import cache_dir

_FIELDS = ("date", "time", "datetime", "run")


def parse_cron(expr: str):
    """A croniter for `expr` (5 fields, or 6 with seconds last); SpecError if invalid."""
    from croniter import croniter

    fields = expr.split()
    if len(fields) not in (5, 6) or not croniter.is_valid(expr):
        raise SpecError(f"--cron {expr!r} is not a cron expression; use 5 fields "
                        "'MIN HOUR DAY MONTH WEEKDAY' (e.g. '0 2 * * *'), or 6 with seconds last")
    return croniter


def zone(name: str | None) -> dt.tzinfo:
    """The time zone a cron expression is read in: UTC unless an IANA name is given."""
    if not name or name.upper() in ("UTC", "Z"):
        return dt.timezone.utc
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SpecError(f"--tz {name!r} is not a time zone; use an IANA name such as "
                        "'Europe/Berlin' or 'America/New_York' (default UTC)") from None


def next_fire(expr: str, after: dt.datetime, tz: dt.tzinfo | None = None) -> dt.datetime:
    """The first tick of `expr` strictly after `after`; with `tz` the expression is read in that
    zone (e.g. 02:00 Berlin time) and the tick returned in UTC."""
    croniter = parse_cron(expr)
    if tz is None:
        return croniter(expr, after).get_next(dt.datetime)
    if after.tzinfo is None:
        after = after.replace(tzinfo=dt.timezone.utc)
    tick = croniter(expr, after.astimezone(tz)).get_next(dt.datetime)
    return tick.astimezone(dt.timezone.utc)


def ticks(expr: str, n: int, start: dt.datetime, tz: dt.tzinfo | None = None) -> list[dt.datetime]:
    """The next `n` ticks of `expr` after `start`, read and shown in `tz` (UTC by default):
    what `schedule --dry-run N` prints."""
    croniter = parse_cron(expr)
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.timezone.utc)
    it = croniter(expr, start.astimezone(tz or dt.timezone.utc))
    return [it.get_next(dt.datetime) for _ in range(n)]


def render_output(template: str, when: dt.datetime, run: int) -> str:
    """Fills {date} {time} {datetime} {run} in an output URL template."""
    values = {"date": when.strftime("%Y-%m-%d"), "time": when.strftime("%H%M%S"),
              "datetime": when.strftime("%Y%m%dT%H%M%S"), "run": str(run)}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise SpecError(f"output template {template!r}: unknown placeholder {e}; use "
                        + ", ".join("{" + f + "}" for f in _FIELDS)) from None


def check_template(spec: JobSpec) -> None:
    """Every run must write somewhere new (or the spec must say overwrite)."""
    render_output(spec.output, dt.datetime(2000, 1, 1), 0)
    if not any("{" + f + "}" in spec.output for f in _FIELDS) and not spec.overwrite:
        raise SpecError(f"output {spec.output!r} is the same for every scheduled run; put "
                        "{date}, {datetime} or {run} in it (e.g. gs://b/out/{date}/), or set "
                        "overwrite: true")
    if spec.incremental is not None and not any("{" + f + "}" in spec.output for f in _FIELDS):
        raise SpecError(f"output {spec.output!r} is the same for every incremental run, so each "
                        "run would replace the rows earlier runs produced; put {date} or {run} "
                        "in it (e.g. gs://b/out/{date}/)")


def run_ledger(spec: JobSpec) -> str | None:
    """The ledger every incremental run of `spec` shares (None when not incremental)."""
    if spec.incremental is None:
        return None
    if spec.incremental.ledger:
        return spec.incremental.ledger
    from pipeline.ledger import default_ledger

    return default_ledger(spec.output)


@dataclasses.dataclass
class Run:
    fire: str
    run: int
    output: str
    job_id: str
    status: str = "RUNNING"


class _LocalLauncher:
    """Runs each tick as a local `gemma-batch run` subprocess."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, spec: JobSpec, job_id: str) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.log_dir / f"{job_id}.yaml"
        spec_file.write_text(yaml.safe_dump(spec.to_file()))
        log = open(self.log_dir / f"{job_id}.log", "wb")
        self.procs[job_id] = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "run", str(spec_file), "--progress"],
            stdout=log, stderr=subprocess.STDOUT)
        return job_id

    def status(self, job_id: str) -> str:
        proc = self.procs.get(job_id)
        if proc is None:
            return "UNKNOWN"
        rc = proc.poll()
        return "RUNNING" if rc is None else ("SUCCEEDED" if rc == 0 else "FAILED")


class _RemoteLauncher:
    """Submits each tick to a Ray cluster through the Jobs API."""

    def __init__(self, address: str | None):
        self.address = address

    def start(self, spec: JobSpec, job_id: str) -> str:
        from jobs import remote

        return remote.submit(spec, self.address, job_id=job_id)

    def status(self, job_id: str) -> str:
        from jobs import remote

        return remote.status(job_id, self.address)["status"]


def _state_path(spec: JobSpec, cron: str, address: str | None) -> Path:
    key = json.dumps([spec.model_dump(mode="json"), cron, address], sort_keys=True)
    return cache_dir() / "schedules" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)  # atomic


def run_schedule(spec: JobSpec, cron: str, address: str | None = None, local: bool = False,
                 max_runs: int | None = None, state_path: Path | None = None,
                 say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
                 sleep: Callable[[float], None] = time.sleep, poll_s: float = 1.0,
                 tz: dt.tzinfo | None = None) -> int:
    """Runs `spec` at every tick of `cron` until `max_runs` runs have started (forever if None).

    `now` and `sleep` are the clock the ticks are waited on (tests inject one that jumps);
    runs' ends are polled every `poll_s` s of real time. With `max_runs`, waits for the last
    run and returns 0 if every run succeeded, else 1.
    """
    parse_cron(cron)
    check_template(spec)
    ledger = run_ledger(spec)
    path = state_path or _state_path(spec, cron, None if local else address)
    state = json.loads(path.read_text()) if path.exists() else {"cron": cron, "runs": []}
    runs = [Run(**r) for r in state["runs"]]
    launcher = _LocalLauncher(path.parent / path.stem) if local else _RemoteLauncher(address)
    where = "locally" if local else f"on {address or 'the cluster'}"
    say(f"schedule: {cron!r} {where}; state {path} ({len(runs)} earlier runs)")
    started = 0
    last = dt.datetime.fromisoformat(runs[-1].fire) if runs else now()
    while max_runs is None or started < max_runs:
        fire = next_fire(cron, max(last, now()), tz)
        while (wait := (fire - now()).total_seconds()) > 0:
            sleep(min(wait, poll_s))
        last = fire
        for r in runs:
            if r.status in ("RUNNING", "PENDING"):  # a local run of an earlier scheduler: UNKNOWN
                r.status = launcher.status(r.job_id)
        if any(r.status in ("RUNNING", "PENDING") for r in runs):
            say(f"schedule: tick {fire.isoformat()} skipped: the previous run is still running")
            continue
        number = len(runs) + 1
        update: dict[str, Any] = {"output": render_output(spec.output, fire, number)}
        if ledger is not None:  # every run shares the ledger resolved from the template
            update["incremental"] = spec.incremental.model_copy(update={"ledger": ledger})
        run_spec = spec.model_copy(update=update)
        job_id = f"gemma-batch-sched-{fire.strftime('%Y%m%dT%H%M%S')}-{number}"
        launcher.start(run_spec, job_id)
        runs.append(Run(fire.isoformat(), number, run_spec.output, job_id))
        started += 1
        say(f"schedule: run {number} started at {fire.isoformat()} as {job_id} -> "
            f"{run_spec.output}")
        _save(path, {"cron": cron, "runs": [dataclasses.asdict(r) for r in runs]})
    # Bounded mode: wait for our runs to end, then report.
    mine = runs[-started:] if started else []
    for r in mine:
        while (st := launcher.status(r.job_id)) in ("RUNNING", "PENDING"):
            time.sleep(poll_s)
        r.status = st
        say(f"schedule: run {r.run} ({r.job_id}) {st}"
            + (_increment_note(r.output) if ledger is not None and st == "SUCCEEDED" else ""))
    _save(path, {"cron": cron, "runs": [dataclasses.asdict(r) for r in runs]})
    return 0 if all(r.status == "SUCCEEDED" for r in mine) else 1


def _increment_note(output: str) -> str:
    """': 7 rows new or changed, 1 deleted' from a finished incremental run's summary."""
    from pipeline.output import OutputDir

    try:
        inc = OutputDir(output).read_json(OutputDir.SUMMARY).get("incremental") or {}
    except (OSError, ValueError):
        return ""
    if not inc:
        return ""
    return (f": {inc.get('rows_to_generate', 0)} rows new or changed, {inc.get('unchanged', 0)} "
            f"unchanged, {inc.get('deleted', 0)} deleted")
