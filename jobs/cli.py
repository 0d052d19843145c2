"""The `gemma-batch` command: its parser, run / validate / demo, and errors -> exit codes.

The cluster-side commands (submit, status, logs, schedule) live in jobs.remote_cli.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

from jobs.flags import add_estimate_flags, add_job_flags, spec_from_args
from jobs import spec_cli
from jobs.remote_cli import REMOTE_COMMANDS, add_parsers, handle
from pipeline.quiet import NativeLogFilter
from model.config import DEFAULT_MODEL

EXIT_CODES = """exit codes:
  0  done (or, for validate, the spec and inputs are fine)
  1  the job failed (model could not load, storage unreachable, generation failed)
  2  bad usage, bad spec or refused input; nothing was written"""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-batch",
        description="Offline batch inference with Gemma on Ray: Parquet in, Parquet out.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Ray logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter
    run = sub.add_parser("run", help="run a batch job on Ray (local, or RAY_ADDRESS)",
                         epilog=EXIT_CODES, formatter_class=fmt)
    add_job_flags(run)
    val = sub.add_parser("validate", help="check a spec and its inputs; generate nothing",
                         epilog=EXIT_CODES, formatter_class=fmt)
    add_job_flags(val)
    add_estimate_flags(val)
    demo = sub.add_parser("demo", help="summarise the bundled sample corpus with a real model",
                          epilog=EXIT_CODES, formatter_class=fmt)
    demo.add_argument("--output", default="gemma-batch-demo", help="output directory")
    demo.add_argument("--model", default=None, help=f"model (default {DEFAULT_MODEL})")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    # All 21 documents in one batch: one decode wave (a batch of 10 left 1 row for a third).
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    demo.add_argument("--rows", type=int, default=5, help="rows to print")
    rep = sub.add_parser("report", help="re-render _REPORT.html of a finished output directory",
                         epilog=EXIT_CODES, formatter_class=fmt)
    rep.add_argument("output", metavar="OUTPUT", help="output directory (local, gs://, s3://)")
    rep.add_argument("--to", metavar="FILE", default=None,
                     help="write the page here instead of OUTPUT/_REPORT.html")
    remote_parsers = add_parsers(sub, EXIT_CODES) + spec_cli.add_parsers(sub, EXIT_CODES)
    for sp in (run, val, demo, rep, *remote_parsers):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and Ray logs")
    return parser


def _fail(msg: str, code: int) -> int:
    print(f"gemma-batch: error: {msg}", file=sys.stderr)
    return code


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.preflight import preflight

    spec = spec_from_args(args)
    plan, _out, mode = preflight(spec)
    ids = f"id column {spec.id_column!r}" if spec.id_column else "derived ids (shard:row)"
    ok = (f"ok: {len(plan.shards)} shards, {plan.total_rows} rows, {ids}, text column "
          f"{spec.text_column!r}; output {spec.output} ({mode}"
          + (f", {len(plan.done_ids)} rows already done" if plan.resumed else "") + ")")
    inc = plan.increment.summary_fields()["incremental"] if plan.increment else None
    if inc:
        ok += (f"; incremental: {inc['rows_to_generate']} rows to generate ({inc['new']} new, "
               f"{inc['changed'] + inc['settings_changed']} changed), {inc['unchanged']} "
               f"unchanged, {inc['deleted']} deleted (ledger {inc['ledger']})")
    est = None
    if args.estimate:
        from pipeline.estimate import estimate, lines

        est = estimate(spec, plan, calibrate=args.calibrate, sample=args.sample_rows,
                       debug=args.debug)
    if args.json:
        print(json.dumps({"ok": True, "shards": len(plan.shards), "rows": plan.total_rows,
                          "output": spec.output, "mode": mode, "model": spec.model,
                          "estimate": est, "incremental": inc}))
    else:
        print(ok)
        for line in lines(est) if est else []:
            print(line)
    return 0


def _print_done(summary: dict[str, Any], output: str) -> None:
    print(f"done: {summary.get('rows_out', 0)} rows -> {output} ({summary.get('errors', 0)} "
          f"errors, {summary.get('output_tokens', 0)} output tokens, "
          f"{summary.get('tokens_per_s', 0)} tokens/s end to end, "
          f"{summary.get('generate_tokens_per_s', 0)} tokens/s in generate, "
          f"{summary.get('wall_s', 0)} s)")


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import run_job

    spec = spec_from_args(args)
    summary = run_job(spec, progress=args.progress, debug=args.debug)
    if "note" in summary:
        print(f"gemma-batch: {summary['note']}", file=sys.stderr)
    _print_done(summary, spec.output)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    print(f"report: {write_report(args.output, args.to)}")
    return 0


def demo_corpus_rows() -> list[dict[str, Any]]:
    """The bundled sample documents (id, lang, title, text)."""
    from importlib import resources

    text = resources.files("jobs").joinpath("data/demo_corpus.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.run import run_job
    from pipeline.spec import build_spec

    rows = demo_corpus_rows()[: args.limit] if args.limit else demo_corpus_rows()
    model = args.model or DEFAULT_MODEL
    with tempfile.TemporaryDirectory(prefix="gemma-batch-demo-") as tmp:
        shard = Path(tmp) / "demo_corpus.parquet"
        pq.write_table(pa.Table.from_pylist(rows), shard)
        spec = build_spec({
            "input": str(shard), "output": args.output, "task": "summarize", "model": model,
            "id_column": "id", "text_column": "text", "batch_size": args.batch_size,
            "sampling": {"max_new_tokens": args.max_new_tokens}, "overwrite": True}, "demo")
        print(f"gemma-batch demo: summarising {len(rows)} documents with {model} on local Ray "
              f"(output: {args.output})", file=sys.stderr)
        summary = run_job(spec, progress=None, debug=args.debug)  # bar on a terminal
    import pandas as pd

    df = pd.read_parquet(args.output) if "://" not in args.output else None
    if df is not None:
        # One row per language first, so the sample shows several scripts.
        df = df.sort_values("id")
        picked = df.drop_duplicates("lang") if "lang" in df.columns else df
        for _, r in picked.head(args.rows).iterrows():
            text = (r["output"] or f"[error: {r['error']}]").strip().replace("\n", " ")
            print(f"[{r['id']}] ({r.get('lang', '?')}) {r.get('title', '')}\n    -> {text[:200]}")
    _print_done(summary, args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    from pipeline.storage import quiet_library_logs

    quiet_library_logs(debug)  # storage libraries' tracebacks only with --debug
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handlers = {"run": _cmd_run, "validate": _cmd_validate, "demo": _cmd_demo,
                "report": _cmd_report}
    handlers.update({c: handle for c in REMOTE_COMMANDS})
    handlers.update({c: spec_cli.handle for c in spec_cli.SPEC_COMMANDS})
    native = NativeLogFilter()
    if not debug:
        native.start()  # Ray's native log lines stay in its session logs, off the terminal
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun with --resume to finish", 1)
    except Exception as e:  # noqa: BLE001 - every error ends as one line unless --debug
        if debug:
            traceback.print_exc()
        code = getattr(e, "exit_code", None)  # our errors say their own exit code
        if code is not None:
            return _fail(str(e), code)
        msg = " ".join(str(e).split())[:300]
        return _fail(f"unexpected {type(e).__name__}: {msg} (rerun with --debug for details)", 1)
    finally:
        from pipeline.ray_env import shutdown_ray

        shutdown_ray()  # only a local cluster this process started; a no-op otherwise
        native.stop()


if __name__ == "__main__":
    sys.exit(main())
