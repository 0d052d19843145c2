"""`gemma-batch spec --schema` (the JSON Schema of a job spec, from pydantic) and
`gemma-batch init [PATH]` (a commented example spec to start from)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.spec import JobSpec, SpecError

SPEC_COMMANDS = ("spec", "init")

# Every line a new user needs; `gemma-batch validate` accepts it once data/ holds Parquet files.
EXAMPLE = """\
# A gemma-batch job spec. Check it with `gemma-batch validate job.yaml`, run it with
# `gemma-batch run job.yaml`; any flag (--input, --output, --model, ...) overrides a field here.
# Every field and its default: `gemma-batch spec --schema`.

# Parquet input: a directory, a glob, one file or a list (gs://, s3://, file:// or a path).
input: data/
# Output directory: Parquet shards, _SUMMARY.json, then _SUCCESS last.
output: out/summaries/

task: summarize            # summarize | answer (needs question_column) | raw (text is the prompt)
                           # | extract (instruction + text; with output_format: typed fields)
model: gemma3-270m         # a preset, a Hugging Face directory or a .gguf file
text_column: text          # the column holding each document
# id_column: doc_id        # default: the input's `id` column if it has one, else derived ids;
                           # null: always derive ids as "<shard>:<row>"
# summary_words: 60        # summarize: ask for about this many words
# long_document: map-reduce  # longer than the context: map-reduce (summarize's default: chunk
                             # summaries, then theirs), error, truncate (head + tail), stream
# max_input_tokens: 2048   # cap the context a row uses (bounds prefill on small machines)
# output_format: {type: choice, choices: [positive, negative]}  # or json + schema, regex

batch_size: 32             # rows decoded together per generate call
sampling:
  max_new_tokens: 96       # most tokens generated per row
  temperature: 0.0         # 0 = greedy

resources:
  accelerator: cpu         # cpu | gpu | tpu
  num_actors: 1            # generator actors (one model each)
"""


def add_parsers(sub, epilog: str) -> list:
    """Registers `spec` and `init`; returns their parsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    spec = sub.add_parser("spec", help="print the job spec's JSON Schema (--schema)",
                          epilog=epilog, formatter_class=fmt)
    spec.add_argument("--schema", action="store_true", required=True,
                      help="the JSON Schema of a job spec (every field, type and default)")
    init = sub.add_parser("init", help="write a commented example job spec", epilog=epilog,
                          formatter_class=fmt)
    init.add_argument("path", nargs="?", default="job.yaml",
                      help="where to write it (default job.yaml; never overwritten)")
    return [spec, init]


def schema() -> dict:
    """The JSON Schema of JobSpec, as pydantic writes it."""
    return JobSpec.model_json_schema()


def handle(args: argparse.Namespace) -> int:
    if args.command == "spec":
        print(json.dumps(schema(), indent=2))
        return 0
    path = Path(args.path)
    if path.exists():
        raise SpecError(f"{path} already exists; choose another path or remove it first")
    if not path.parent.is_dir():
        raise SpecError(f"folder {path.parent} does not exist; create it or choose another path")
    path.write_text(EXAMPLE, encoding="utf-8")
    print(f"wrote {path}; put Parquet files with a 'text' column under data/, then "
          f"`gemma-batch validate {path}`")
    return 0
