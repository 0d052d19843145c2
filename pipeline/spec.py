"""The job spec: one validated description of a batch job, from a YAML file or CLI flags.

Validated once at the edge (`JobSpec.model_validate` / `load_spec`); code past that point trusts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.config import DEFAULT_MODEL
from pipeline.errors import InputError

Task = Literal["summarize", "answer", "raw", "extract"]
DEFAULT_ID_COLUMN = "id"  # an input column with this name is the id unless the spec says else
# Spec fields that must match for --resume to continue a run.
_SHAPING = ("input", "task", "model", "id_column", "text_column", "question_column",
            "context_column", "prompt_format", "instruction", "summary_words", "sampling_columns",
            "output_format", "logprobs", "long_document", "max_input_tokens")


class SpecError(InputError):
    """A spec (file or flags) that cannot describe a job; the message is one line (exit 2)."""


class SamplingSpec(BaseModel):
    """How tokens are drawn."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192, description="Most tokens generated per row.")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy decoding.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int = Field(0, description="Random seed of the sampler (per batch).")
    stop: list[str] | None = Field(
        None, description="Extra stop strings; None = the prompt format's default stops."
    )


LongDocument = Literal["error", "truncate", "map-reduce", "stream"]
SamplingColumn = Literal["max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"]


class OutputFormatSpec(BaseModel):
    """What each row's output must look like: free text, JSON matching a schema, a regex, or
    one of a list of choices (decoding is constrained to it; pipeline/formats.py)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    type: Literal["text", "json", "regex", "choice"] = Field(
        "text", description="text (free), json (with schema), regex (with pattern) or choice "
                            "(with choices).")
    json_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="json: a JSON Schema (objects, strings, integers, "
                                          "numbers, booleans, enums, arrays, nesting).")
    pattern: str | None = Field(None, description="regex: the pattern every output matches.")
    choices: list[str] | None = Field(None, description="choice: the labels, at least two.")

    @model_validator(mode="before")
    @classmethod
    def _plain_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v != "text":
                raise ValueError(f"{v!r} is not a format; use text, or a mapping with type "
                                 "json/regex/choice")
            return {"type": "text"}
        return v

    @model_validator(mode="after")
    def _needs(self) -> "OutputFormatSpec":
        want = {"json": "schema", "regex": "pattern", "choice": "choices"}
        given = {"schema": self.json_schema is not None, "pattern": self.pattern is not None,
                 "choices": self.choices is not None}
        need = want.get(self.type)
        if need and not given[need]:
            raise ValueError(f"a {self.type} format needs {need}")
        extra = [k for k, on in given.items() if on and k != need]
        if extra:
            raise ValueError(f"{extra[0]} does not apply to a {self.type} format")
        if self.type == "choice":
            ch = self.choices or []
            if len(ch) < 2 or any(not c.strip() for c in ch) or len(set(ch)) != len(ch):
                raise ValueError("choices needs at least two distinct, non-empty labels")
        if self.type == "json":
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(self.json_schema)
            except SchemaError as e:
                raise ValueError(f"schema is not a valid JSON Schema: {e.message}") from None
        if self.type == "regex":
            import re

            try:
                re.compile(self.pattern or "")
            except re.error as e:
                raise ValueError(f"pattern is not a valid regex: {e}") from None
        return self


class MeshSpec(BaseModel):
    """The device mesh of each actor's model: `data` x `model` devices."""

    model_config = ConfigDict(extra="forbid")

    data: int = Field(ge=1, description="Devices along the data axis (decode slots split).")
    model: int = Field(ge=1, description="Devices along the model axis (heads, MLP, vocab).")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data, self.model)


class IncrementalSpec(BaseModel):
    """Incremental runs: only rows that no earlier run produced with the same content and
    settings are generated (the ledger's rules: pipeline/ledger.py)."""

    model_config = ConfigDict(extra="forbid")

    ledger: str | None = Field(
        None, description="Ledger directory URL; None = `_LEDGER` beside the outputs (the "
                          "directory above the output template's first {placeholder}).")


class ResourceSpec(BaseModel):
    """Where and how many generator actors run."""

    model_config = ConfigDict(extra="forbid")

    accelerator: Literal["cpu", "gpu", "tpu"] = Field(
        "cpu", description="cpu: CPUs only; gpu: gpus_per_actor GPUs per actor; tpu: tpu_chips "
                           "chips per actor (default: every chip of a host)."
    )
    num_actors: int | None = Field(
        1, ge=1, description="Fixed pool size; set to null and use min/max_actors to autoscale."
    )
    min_actors: int | None = Field(None, ge=1, description="Autoscaling pool: fewest actors.")
    max_actors: int | None = Field(None, ge=1, description="Autoscaling pool: most actors.")
    num_cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs reserved per actor; default leaves CPUs for reading."
    )
    gpus_per_actor: int = Field(
        1, ge=1, description="gpu: GPUs per actor; the actor's model runs on a mesh over them."
    )
    tpu_chips: int | None = Field(
        None, ge=1, description="tpu: chips per actor (fewer than a host's: several actors per "
                                "host); None = every chip of one host."
    )
    tpu_topology: str | None = Field(
        None, description="tpu: the slice topology, e.g. '2x4' (with accelerator_type "
                          "'TPU-V6E'); sizes actors to its hosts with Ray's TPU support."
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type label, e.g. 'L4', 'A100', 'H100', "
                          "'TPU-V5LITEPOD', 'TPU-V6E' (optional)."
    )
    extra_resources: dict[str, float] | None = Field(
        None, description="Custom Ray resources each actor claims, e.g. {'large_host': 1}."
    )
    max_restarts: int = Field(3, ge=0, description="Times a crashed actor is restarted.")
    max_task_retries: int = Field(
        3, ge=0, description="Times a batch lost with its actor is retried."
    )

    @model_validator(mode="after")
    def _pool(self) -> "ResourceSpec":
        if self.min_actors is not None or self.max_actors is not None:
            if self.min_actors is None or self.max_actors is None:
                raise ValueError("autoscaling needs both min_actors and max_actors")
            if self.min_actors > self.max_actors:
                raise ValueError(
                    f"min_actors={self.min_actors} is larger than max_actors={self.max_actors}"
                )
            self.num_actors = None
        elif self.num_actors is None:
            raise ValueError("set num_actors, or min_actors and max_actors")
        if self.accelerator != "tpu" and (self.tpu_chips or self.tpu_topology):
            raise ValueError("tpu_chips/tpu_topology only apply to accelerator 'tpu'")
        if self.tpu_topology and not (self.accelerator_type or "").startswith("TPU-"):
            raise ValueError("tpu_topology needs accelerator_type, e.g. 'TPU-V6E' or "
                             "'TPU-V5LITEPOD'")
        return self

    @property
    def pool_max(self) -> int:
        return self.num_actors if self.num_actors is not None else int(self.max_actors or 1)


class JobSpec(BaseModel):
    """A batch job: read Parquet rows, generate one output per row, write Parquet."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(
        description="Parquet input: a directory, a glob, one file or a list of files (fsspec URLs)."
    )
    output: str = Field(description="Output directory URL (gs://, s3://, file:// or a path).")
    task: Task = Field("summarize", description="summarize | answer | raw (text is the prompt).")
    model: str = Field(
        DEFAULT_MODEL, description="Preset name, HF directory, .gguf file or checkpoint dir."
    )
    dtype: str | None = Field(None, description="Compute dtype (None = the model's default).")
    prompt_format: Literal["auto", "chat", "completion"] = Field(
        "auto", description="auto = chat for instruction-tuned checkpoints, else completion."
    )
    id_column: str | None = Field(
        None, description="Unique, non-null id per row. Unset: the input's `id` column when it "
                          "has one, else ids derived from shard and row; null (or ''): always "
                          "derived ('<shard>:<row>')."
    )
    text_column: str = Field("text", description="Column holding the document / prompt.")
    question_column: str | None = Field(
        None, description="answer task: column holding the question."
    )
    context_column: str | None = Field(
        None, description="answer task: optional column holding extra context."
    )
    instruction: str | None = Field(
        None, description="summarize: replaces the default instruction; extract, answer, raw: "
                          "comes before the text (extract: what to extract or classify)."
    )
    summary_words: int | None = Field(
        None, ge=1, le=2000, description="summarize: ask for about this many words."
    )
    carry_columns: list[str] | None = Field(
        None, description="Input columns copied to the output; None = all except text."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=8, description="Longest prompt accepted (None = context - max_new_tokens)."
    )
    long_document: LongDocument | None = Field(
        None, description="A document longer than the usable context (min(model context, "
                          "max_input_tokens) - prompt frame - max_new_tokens): error (an error "
                          "row), truncate (keep its head and tail), map-reduce (summarize its "
                          "chunks, then their summaries; summarize only) or stream (the whole "
                          "document through RecurrentGemma's fixed-size state). Default: "
                          "map-reduce for summarize, error otherwise.")
    max_input_tokens: int | None = Field(
        None, ge=32, description="Caps the context a row may use (prompt + output), to bound "
                                 "prefill cost; long_document applies against it.")
    mesh: MeshSpec | None = Field(
        None, description="Each actor's device mesh {data, model}; None = chosen from its "
                          "device count and the model's size (data parallel when it fits one).")
    output_format: OutputFormatSpec = Field(
        default_factory=OutputFormatSpec,
        description="text (default), {type: json, schema: {...}}, {type: regex, pattern: ...} "
                    "or {type: choice, choices: [...]}: every output matches it.")
    logprobs: bool = Field(
        False, description="Add mean_logprob and min_logprob of each row's generated tokens "
                           "(and choice_probs for a choice format).")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Decoding.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="Actor pool.")
    batch_size: int = Field(
        32, ge=1, le=4096,
        description="Rows per generate call, decoded together (up to 256): larger batches give "
                    "more tokens/s, smaller ones commit results more often.")
    batching: Literal["stream", "closed"] = Field(
        "stream", description="stream: each actor's engine takes rows of several batches at "
                              "once and refills freed slots across them; closed: one batch at a "
                              "time per actor, returned when its longest row ends (the older "
                              "behaviour, kept for comparison).")
    batches_in_flight: int = Field(
        4, ge=1, le=64, description="Batches each actor takes at once (batching: stream): "
                                    "their rows wait for the slots that free up.")
    sampling_columns: dict[SamplingColumn, str] | None = Field(
        None, description="Input columns that set sampling per row, e.g. {max_new_tokens: "
                          "budget}; default: columns named max_new_tokens, temperature, top_k, "
                          "top_p, seed or stop, when the input has them; {} = none.")
    rows_per_output_shard: int = Field(
        100_000, ge=1, description="Rows per published output Parquet file."
    )
    resume: bool = Field(False, description="Continue a killed run: only missing ids run.")
    overwrite: bool = Field(False, description="Replace an existing output.")
    incremental: IncrementalSpec | None = Field(
        None, description="true or {ledger: URL}: generate only rows that are new or changed "
                          "since earlier runs (a ledger of ids and content hashes); null = all.")
    retry_errors: bool = Field(
        False, description="Regenerate only the error rows of a finished output, then "
                           "republish it (each id still once).")

    @field_validator("id_column", mode="before")
    @classmethod
    def _no_id_column(cls, v: Any) -> Any:
        return None if v == "" else v  # --id-column '' asks for derived ids

    @field_validator("incremental", mode="before")
    @classmethod
    def _incremental_switch(cls, v: Any) -> Any:
        return {} if v is True else (None if v is False else v)

    @model_validator(mode="after")
    def _task_columns(self) -> "JobSpec":
        if self.task == "answer" and not self.question_column:
            raise ValueError("task 'answer' needs question_column (the column with questions)")
        if self.task != "answer" and (self.question_column or self.context_column):
            raise ValueError("question_column/context_column only apply to task 'answer'")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other; choose one")
        if self.retry_errors and (self.resume or self.overwrite):
            raise ValueError("retry_errors works on a finished output; drop resume/overwrite")
        if self.retry_errors and self.incremental is not None:
            raise ValueError("retry_errors does not apply to incremental runs: their rows whose "
                             "generation failed are redone by the next run; drop one of them")
        if self.long_document == "map-reduce" and (self.task != "summarize"
                                                   or self.output_format.type != "text"):
            raise ValueError("long_document: map-reduce summarizes chunks into free text (task "
                             "summarize, no output_format); use error, truncate or stream")
        if self.max_input_tokens and self.max_input_tokens < self.sampling.max_new_tokens + 16:
            raise ValueError(f"max_input_tokens={self.max_input_tokens} leaves no room for a "
                             f"prompt beside max_new_tokens={self.sampling.max_new_tokens}")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is an empty list; give at least one Parquet file")
        return self

    @property
    def long_document_policy(self) -> str:
        """The long-document policy in force (the task's default when unset)."""
        if self.long_document is not None:
            return self.long_document
        free = self.task == "summarize" and self.output_format.type == "text"
        return "map-reduce" if free else "error"

    def id_column_for(self, columns: list[str]) -> str | None:
        """The id column for an input with these columns: the one named, none when id_column
        is set to null, else `id` when the input has it (else ids are derived)."""
        if "id_column" in self.model_fields_set:
            return self.id_column
        return DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in columns else None

    def to_file(self) -> dict[str, Any]:
        """The spec as a YAML/JSON-ready dict that loads back to the same job (an explicit
        `id_column: null` is kept: unset and null differ)."""
        body = self.model_dump(mode="json", exclude_none=True)
        if "id_column" in self.model_fields_set and self.id_column is None:
            body["id_column"] = None
        return body

    def output_shaping(self) -> dict[str, Any]:
        """The fields that shape the outputs: --resume continues a run only when they match."""
        now = json.loads(self.model_dump_json())
        return {k: now.get(k) for k in _SHAPING}

    def input_columns(self) -> list[str]:
        """Columns the job reads to build prompts (id excluded)."""
        cols = [self.text_column]
        for c in (self.question_column, self.context_column):
            if c and c not in cols:
                cols.append(c)
        return cols


def _one_line(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "spec"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {loc}: {msg}{more}"


def build_spec(data: dict[str, Any], where: str = "spec") -> JobSpec:
    """Validates a plain dict into a JobSpec; raises SpecError with one line."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_one_line(e, where)) from None


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Reads a YAML (or JSON) spec file into a dict; raises SpecError with one line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise SpecError(f"spec file {str(p)!r} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise SpecError(
            f"spec file {str(p)!r} must hold a mapping of fields, got {type(data).__name__}")
    return data
