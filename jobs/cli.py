"""The `gemma-batch` command: run, validate, demo; submit/status/logs/schedule (jobs.remote_cli)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

EXIT_CODES = """exit codes:
  0  done (or, for validate, the spec and inputs are fine)
  1  the job failed (model could not load, storage unreachable, generation failed)
  2  bad usage, bad spec or refused input; nothing was written"""

_SAMPLING = {"max_new_tokens", "temperature", "top_k", "top_p", "seed"}
_RESOURCES = {"num_actors", "min_actors", "max_actors", "accelerator", "num_cpus_per_actor",
              "tpu_chips", "accelerator_type"}
_TOP = {"input", "output", "task", "model", "dtype", "id_column", "text_column",
        "question_column", "context_column", "instruction", "summary_words", "prompt_format",
        "batch_size", "max_prompt_tokens", "long_document", "rows_per_output_shard", "resume",
        "overwrite"}


def _job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="job spec YAML file (flags override its fields)")
    g = p.add_argument_group("job")
    g.add_argument("--input", nargs="+", metavar="URL",
                   help="Parquet input: directory, glob or files (gs://, s3://, file://, path)")
    g.add_argument("--output", metavar="URL", help="output directory")
    g.add_argument("--task", choices=["summarize", "answer", "raw"])
    g.add_argument("--model", help="preset name, HF directory or .gguf file (default gemma3-270m)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"])
    g.add_argument("--prompt-format", choices=["auto", "chat", "completion"])
    g.add_argument("--id-column")
    g.add_argument("--text-column")
    g.add_argument("--question-column")
    g.add_argument("--context-column")
    g.add_argument("--instruction", help="summarize: replaces the default instruction")
    g.add_argument("--summary-words", type=int)
    g.add_argument("--max-prompt-tokens", type=int)
    g.add_argument("--long-document", choices=["error", "truncate"])
    g.add_argument("--batch-size", type=int)
    g.add_argument("--rows-per-output-shard", type=int)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    r = p.add_argument_group("resources")
    r.add_argument("--accelerator", choices=["cpu", "gpu", "tpu"])
    r.add_argument("--num-actors", type=int, help="fixed actor pool size")
    r.add_argument("--min-actors", type=int, help="autoscaling pool: fewest actors")
    r.add_argument("--max-actors", type=int, help="autoscaling pool: most actors")
    r.add_argument("--num-cpus-per-actor", type=float)
    r.add_argument("--tpu-chips", type=int)
    r.add_argument("--accelerator-type")
    m = p.add_argument_group("run")
    m.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted run: only ids not yet committed are generated")
    m.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing output")
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="plain progress lines (default: on when stderr is not a terminal)")


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
    _job_flags(run)
    val = sub.add_parser("validate", help="check a spec and its inputs; generate nothing",
                         epilog=EXIT_CODES, formatter_class=fmt)
    _job_flags(val)
    demo = sub.add_parser("demo", help="summarise the bundled sample corpus with a real model",
                          epilog=EXIT_CODES, formatter_class=fmt)
    demo.add_argument("--output", default="gemma-batch-demo", help="output directory")
    demo.add_argument("--model", default=None, help="model (default gemma3-270m)")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--batch-size", type=int, default=10)
    demo.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    demo.add_argument("--rows", type=int, default=5, help="rows to print")
    from jobs.remote_cli import add_parsers

    remote_parsers = add_parsers(sub, _job_flags, EXIT_CODES)
    for sp in (run, val, demo, *remote_parsers):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and Ray logs")
    return parser


def spec_from_args(args: argparse.Namespace):
    """Spec file (if any) overlaid with the flags that were given; raises SpecError."""
    from jobs.spec import build_spec, load_spec_file

    data: dict[str, Any] = load_spec_file(args.spec) if args.spec else {}
    where = f"spec {args.spec}" if args.spec else "flags"
    for key, value in vars(args).items():
        if value is None:
            continue
        if key == "input" and isinstance(value, list):
            value = value[0] if len(value) == 1 else value
        if key in _SAMPLING:
            data.setdefault("sampling", {})[key] = value
        elif key in _RESOURCES:
            res = data.setdefault("resources", {})
            res[key] = value
            if key in ("min_actors", "max_actors"):
                res.setdefault("num_actors", None)
        elif key in _TOP:
            data[key] = value
    for required in ("input", "output"):
        if required not in data:
            from jobs.spec import SpecError

            raise SpecError(
                f"{where}: {required} is missing; pass --{required} or set it in a spec file")
    return build_spec(data, where)


def _fail(msg: str, code: int) -> int:
    print(f"gemma-batch: error: {msg}", file=sys.stderr)
    return code


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.preflight import preflight

    spec = spec_from_args(args)
    plan, _out, mode = preflight(spec)
    ids = f"id column {spec.id_column!r}" if spec.id_column else "derived ids (shard:row)"
    print(f"ok: {len(plan.shards)} shards, {plan.total_rows} rows, {ids}, text column "
          f"{spec.text_column!r}; output {spec.output} ({mode}"
          + (f", {len(plan.done_ids)} rows already done" if plan.resumed else "") + ")")
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


def demo_corpus_rows() -> list[dict[str, Any]]:
    """The bundled sample documents (id, lang, title, text)."""
    from importlib import resources

    text = resources.files("jobs").joinpath("data/demo_corpus.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.spec import build_spec
    from pipeline.run import run_job

    rows = demo_corpus_rows()[: args.limit] if args.limit else demo_corpus_rows()
    model = args.model or "gemma3-270m"
    with tempfile.TemporaryDirectory(prefix="gemma-batch-demo-") as tmp:
        shard = Path(tmp) / "demo_corpus.parquet"
        pq.write_table(pa.Table.from_pylist(rows), shard)
        spec = build_spec({
            "input": str(shard), "output": args.output, "task": "summarize", "model": model,
            "id_column": "id", "text_column": "text", "batch_size": args.batch_size,
            "sampling": {"max_new_tokens": args.max_new_tokens}, "overwrite": True}, "demo")
        print(f"gemma-batch demo: summarising {len(rows)} documents with {model} on local Ray "
              f"(output: {args.output})", file=sys.stderr)
        summary = run_job(spec, progress=True, debug=args.debug)
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
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from jobs.remote import RemoteError
    from jobs.remote_cli import REMOTE_COMMANDS, handle
    from jobs.spec import SpecError
    from pipeline.errors import InputError, JobError

    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    handlers = {"run": _cmd_run, "validate": _cmd_validate, "demo": _cmd_demo}
    handlers.update({c: (lambda a: handle(a, spec_from_args)) for c in REMOTE_COMMANDS})
    try:
        return handlers[args.command](args)
    except RemoteError as e:
        if debug:
            traceback.print_exc()
        return _fail(str(e), 1)
    except (SpecError, InputError) as e:
        if debug:
            traceback.print_exc()
        return _fail(str(e), 2)
    except JobError as e:
        if debug:
            traceback.print_exc()
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun with --resume to finish", 1)
    except Exception as e:  # noqa: BLE001 - last resort: one line unless --debug
        if debug:
            traceback.print_exc()
        msg = " ".join(str(e).split())[:300]
        return _fail(f"unexpected {type(e).__name__}: {msg} (rerun with --debug for details)", 1)
    finally:
        if "pipeline.run" in sys.modules:
            sys.modules["pipeline.run"].shutdown_ray()


if __name__ == "__main__":
    sys.exit(main())
