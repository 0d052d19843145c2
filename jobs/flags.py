"""Job flags of `gemma-batch run|validate|submit|schedule` and their overlay onto a spec file.

Which flag lands where (top level, `sampling`, `resources`) follows the spec's own fields, so a
field added to the spec needs only its flag here.
"""

from __future__ import annotations

import argparse
from typing import Any

from model.config import DEFAULT_MODEL
from pipeline.spec import (
    IncrementalSpec,
    JobSpec,
    ResourceSpec,
    SamplingSpec,
    SpecError,
    build_spec,
    load_spec_file,
)

# Spec sections a flag can set, by the dest of the flag (= the field name).
_SECTIONS: dict[str, type] = {"sampling": SamplingSpec, "resources": ResourceSpec,
                              "incremental": IncrementalSpec}
_SWITCHES = {"incremental"}  # sections that a flag of their own name turns on (--incremental)
_TOP = {name for name in JobSpec.model_fields if name not in _SECTIONS or name in _SWITCHES}
# Flags that together build one field: --json-schema / --regex / --choices -> output_format.
_FORMAT_FLAGS = {"format_json_schema": "output_format", "format_regex": "output_format",
                 "format_choices": "output_format"}


def add_job_flags(p: argparse.ArgumentParser) -> None:
    """The flags that describe a job; each dest is a field of JobSpec or one of its sections."""
    p.add_argument("spec", nargs="?", help="job spec YAML file (flags override its fields)")
    g = p.add_argument_group("job")
    g.add_argument("--input", nargs="+", metavar="URL",
                   help="Parquet input: directory, glob or files (gs://, s3://, file://, path)")
    g.add_argument("--output", metavar="URL", help="output directory")
    g.add_argument("--task", choices=["summarize", "answer", "raw", "extract"])
    g.add_argument("--model",
                   help=f"preset name, HF directory or .gguf file (default {DEFAULT_MODEL})")
    g.add_argument("--dtype", choices=["float32", "bfloat16"])
    g.add_argument("--prompt-format", choices=["auto", "chat", "completion"])
    g.add_argument("--id-column", metavar="COLUMN",
                   help="input column with unique row ids (default: 'id' when the input has "
                        "one, else ids derived as '<shard>:<row>'); --id-column '' always "
                        "derives ids")
    g.add_argument("--text-column")
    g.add_argument("--question-column")
    g.add_argument("--context-column")
    g.add_argument("--instruction",
                   help="summarize: replaces the default instruction; extract, answer, raw: "
                        "comes before the text")
    g.add_argument("--summary-words", type=int)
    g.add_argument("--max-prompt-tokens", type=int)
    g.add_argument("--long-document", choices=["error", "truncate", "map-reduce", "stream"],
                   help="a document longer than the usable context: map-reduce (summarize's "
                        "default: summarize chunks, then their summaries), error (the other "
                        "tasks' default), truncate (keep head and tail), stream (RecurrentGemma: "
                        "the whole document through its fixed-size state)")
    g.add_argument("--max-input-tokens", type=int, metavar="N",
                   help="cap the context a row uses (prompt + output); long_document applies "
                        "against it")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--batching", choices=["stream", "closed"],
                   help="stream (default): actors refill freed decode slots across batches; "
                        "closed: one batch at a time, until its longest row ends")
    g.add_argument("--batches-in-flight", type=int, help="batches each actor takes at once")
    g.add_argument("--rows-per-output-shard", type=int)
    g.add_argument("--mesh", type=_mesh, metavar="DxM",
                   help="each actor's device mesh: D data x M model devices (default: chosen "
                        "from the actor's devices and the model's size)")
    f = p.add_argument_group("output format (one of; default: free text)")
    f.add_argument("--json-schema", metavar="FILE", dest="format_json_schema",
                   help="every output is JSON valid under this JSON Schema (a .json or .yaml "
                        "file); adds a typed `parsed` column")
    f.add_argument("--regex", metavar="PATTERN", dest="format_regex",
                   help="every output matches this regular expression")
    f.add_argument("--choices", nargs="+", metavar="LABEL", dest="format_choices",
                   help="every output is one of these labels (classification); adds `choice`")
    f.add_argument("--logprobs", action="store_true", default=None,
                   help="add mean_logprob and min_logprob per row (and choice_probs with "
                        "--choices)")
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
    r.add_argument("--gpus-per-actor", type=int, help="gpu: GPUs per actor (one mesh)")
    r.add_argument("--tpu-chips", type=int, help="tpu: chips per actor (default: a whole host)")
    r.add_argument("--tpu-topology", help="tpu: slice topology, e.g. 2x4 (with "
                                          "--accelerator-type TPU-V6E)")
    r.add_argument("--accelerator-type")
    m = p.add_argument_group("run")
    m.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted run: only ids not yet committed are generated")
    m.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing output")
    m.add_argument("--retry-errors", action="store_true", default=None,
                   help="regenerate only the error rows of a finished output (e.g. after "
                        "raising --max-new-tokens) and republish it")
    m.add_argument("--incremental", action="store_true", default=None,
                   help="generate only rows that are new or changed since earlier runs (a "
                        "ledger of ids and content hashes, by default _LEDGER beside the output)")
    m.add_argument("--ledger", metavar="URL",
                   help="the incremental runs' ledger directory (implies --incremental)")
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="--progress: plain progress lines; --no-progress: none (default: a bar on "
                        "a terminal, plain lines elsewhere)")


def add_estimate_flags(p: argparse.ArgumentParser) -> None:
    """`validate`'s own flags: its estimate (pipeline/estimate.py) and how it is shown."""
    e = p.add_argument_group("estimate")
    e.add_argument("--json", action="store_true",
                   help="print the check and the estimate as one JSON object")
    e.add_argument("--calibrate", action="store_true",
                   help="first measure tokens/s on this machine: one batch of the corpus "
                        "through the real engine in an actor like the job's (kept in the "
                        "user cache for later forecasts)")
    e.add_argument("--sample-rows", type=int, default=2000, metavar="N",
                   help="tokenize at most N rows (a random sample of a larger corpus)")
    e.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="only check the spec and inputs (no model, no token counts)")


def _mesh(text: str) -> dict[str, int]:
    """'2x4' -> {"data": 2, "model": 4}."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a mesh shape; write DATAxMODEL with positive counts, e.g. 2x4")
    return {"data": int(parts[0]), "model": int(parts[1])}


def _format_from_flags(args: argparse.Namespace, where: str) -> dict[str, Any] | None:
    """`output_format` from --json-schema / --regex / --choices (None when none is given)."""
    given = {k: getattr(args, f"format_{k}", None) for k in ("json_schema", "regex", "choices")}
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        raise SpecError(f"{where}: --json-schema, --regex and --choices exclude each other; "
                        "give one")
    if "regex" in given:
        return {"type": "regex", "pattern": given["regex"]}
    if "choices" in given:
        return {"type": "choice", "choices": given["choices"]}
    if "json_schema" in given:
        path = given["json_schema"]
        try:
            schema = load_spec_file(path)
        except SpecError as e:
            raise SpecError(str(e).replace("spec file", "--json-schema file")) from None
        return {"type": "json", "schema": schema}
    return None


def section_of(dest: str) -> str | None:
    """Where a flag's value goes in the spec: "" (top level), a section name, or None."""
    if dest in _FORMAT_FLAGS:
        return _FORMAT_FLAGS[dest]
    for section, model in _SECTIONS.items():
        if dest in model.model_fields:
            return section
    return "" if dest in _TOP else None


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Spec file (if any) overlaid with the flags that were given; raises SpecError."""
    data: dict[str, Any] = load_spec_file(args.spec) if args.spec else {}
    where = f"spec {args.spec}" if args.spec else "flags"
    for switch in _SWITCHES:  # `incremental: true` or --incremental: the section, as a dict
        on = data.get(switch)
        fields = _SECTIONS[switch].model_fields
        if on is True or getattr(args, switch, None) or any(
                getattr(args, f, None) is not None for f in fields):
            data[switch] = on if isinstance(on, dict) else {}
    for key, value in vars(args).items():
        section = section_of(key)
        if value is None or section is None or key in _SWITCHES or key in _FORMAT_FLAGS:
            continue
        if key == "input" and isinstance(value, list):
            value = value[0] if len(value) == 1 else value
        if not section:
            data[key] = value
            continue
        part = data.setdefault(section, {})
        part[key] = value
        if key in ("min_actors", "max_actors"):
            part.setdefault("num_actors", None)  # asking for autoscaling drops the fixed size
    fmt = _format_from_flags(args, where)
    if fmt is not None:
        data["output_format"] = fmt
    for required in ("input", "output"):
        if required not in data:
            raise SpecError(
                f"{where}: {required} is missing; pass --{required} or set it in a spec file")
    return build_spec(data, where)
