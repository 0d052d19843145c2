"""The cluster-side subcommands of `gemma-batch`: submit, status, logs, stop, list, schedule."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from jobs.flags import add_job_flags, spec_from_args
from pipeline.spec import SpecError

REMOTE_COMMANDS = ("submit", "status", "logs", "stop", "list", "schedule")


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="URL",
                   help="Ray Jobs API URL (default: RAY_JOBS_ADDRESS, RAY_ADDRESS if http(s), "
                        "else http://127.0.0.1:8265); token from RAY_AUTH_TOKEN or "
                        "~/.ray/auth_token")


def add_parsers(sub, epilog: str) -> list:
    """Registers the cluster subcommands; returns their parsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    submit = sub.add_parser("submit", help="submit a job to a Ray cluster (Jobs API)",
                            epilog=epilog, formatter_class=fmt)
    add_job_flags(submit)
    _address(submit)
    submit.add_argument("--job-id", help="submission id (default: generated)")
    submit.add_argument("--wait", action="store_true",
                        help="stream the job's logs until it ends; exit 0 only if it succeeded")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: give up after "
                        "this many seconds (exit 1)")

    status = sub.add_parser("status", help="show a submitted job's status", epilog=epilog,
                            formatter_class=fmt)
    status.add_argument("job_id")
    _address(status)
    status.add_argument("--json", action="store_true", help="print the full status as JSON")

    logs = sub.add_parser("logs", help="print a submitted job's logs", epilog=epilog,
                          formatter_class=fmt)
    logs.add_argument("job_id")
    _address(logs)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")

    stop = sub.add_parser("stop", help="stop a submitted job and wait until it has stopped",
                          epilog=epilog, formatter_class=fmt)
    stop.add_argument("job_id")
    _address(stop)
    stop.add_argument("--timeout", type=float, default=120.0,
                      help="give up waiting after this many seconds (exit 1)")

    jobs = sub.add_parser("list", help="list recent jobs on the cluster with their status",
                          epilog=epilog, formatter_class=fmt)
    _address(jobs)
    jobs.add_argument("--limit", type=int, default=20, help="most recent N jobs (default 20)")
    jobs.add_argument("--json", action="store_true", help="print them as JSON")

    sched = sub.add_parser(
        "schedule", help="run a job on a cron schedule (on a cluster, or --local)",
        epilog="The output may contain {date} {time} {datetime} {run}, filled per run.\n"
               + epilog, formatter_class=fmt)
    add_job_flags(sched)
    _address(sched)
    sched.add_argument("--cron", required=True,
                       help="cron expression, e.g. '0 2 * * *' (UTC unless --tz); 6 fields = "
                            "seconds last")
    sched.add_argument("--tz", metavar="ZONE", default=None,
                       help="read the cron expression in this IANA time zone, e.g. "
                            "Europe/Berlin (default UTC)")
    sched.add_argument("--dry-run", type=int, metavar="N", default=None,
                       help="print the next N tick times and exit; nothing is submitted")
    sched.add_argument("--local", action="store_true",
                       help="run each tick here (gemma-batch run) instead of submitting it")
    sched.add_argument("--max-runs", type=int, default=None,
                       help="stop after this many runs (wait for them; exit 1 if any failed)")
    sched.add_argument("--state", default=None, help="state file (default: in the user cache)")
    return [submit, status, logs, stop, jobs, sched]


def handle(args: argparse.Namespace) -> int:
    """Runs one of the cluster subcommands. Raises SpecError / RemoteError for the caller."""
    from jobs import remote
    from jobs.schedule import ticks, zone

    if args.command == "status":
        st = remote.status(args.job_id, args.address)
        if args.json:
            print(json.dumps(st, indent=1, default=str))
        else:
            meta = st["metadata"]
            print(f"{st['job_id']}: {st['status']}"
                  + (f" - {st['message']}" if st.get("message") else "")
                  + (f" (output {meta['output']})" if meta.get("output") else ""))
        return 0 if st["status"] != "FAILED" else 1
    if args.command == "logs":
        if args.follow:
            for chunk in remote.follow(args.job_id, args.address):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(remote.logs(args.job_id, args.address))
        return 0
    if args.command == "stop":
        st = remote.stop(args.job_id, args.address, timeout_s=args.timeout)
        print(f"{args.job_id}: {st}")
        return 0
    if args.command == "list":
        found = remote.list_jobs(args.address, limit=args.limit)
        if args.json:
            print(json.dumps(found, indent=1, default=str))
        for j in found if not args.json else []:
            where = j["metadata"].get("output") or j["entrypoint"]
            print(f"{j['job_id']}  {j['status']:<9}  {_when(j['start_time'])}  {where}")
        return 0
    if args.command == "schedule" and args.dry_run is not None:
        if args.dry_run < 1:
            raise SpecError("--dry-run N needs N >= 1 (how many tick times to print)")
        for t in ticks(args.cron, args.dry_run, dt.datetime.now(dt.timezone.utc), zone(args.tz)):
            print(t.isoformat())
        return 0
    spec = spec_from_args(args)
    if args.command == "submit":
        job_id = remote.submit(spec, args.address, job_id=args.job_id)
        print(job_id)
        print(f"submitted {job_id} to {remote.resolve_address(args.address)}; follow it with "
              f"'gemma-batch logs {job_id} --follow'", file=sys.stderr)
        if not args.wait:
            return 0
        for chunk in remote.follow(job_id, args.address, timeout_s=args.timeout):
            sys.stderr.write(chunk)
        st = remote.status(job_id, args.address)
        print(f"{job_id}: {st['status']}", file=sys.stderr)
        return 0 if st["status"] == "SUCCEEDED" else 1
    from pathlib import Path

    from jobs.schedule import run_schedule

    return run_schedule(spec, args.cron, address=args.address, local=args.local,
                        max_runs=args.max_runs,
                        state_path=Path(args.state) if args.state else None, tz=zone(args.tz))


def _when(ms: int | None) -> str:
    """A Jobs API time (ms since the epoch) as UTC, to the second."""
    if not ms:
        return "-" * 20
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
