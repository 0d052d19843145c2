"""A job's output format, pipeline side: the spec's `output_format` compiled once (in preflight)
into the model's token automaton, the output columns it adds, how the prompt describes it, and
each row's values in those columns.

Columns: `parsed` for json (an Arrow type derived from the schema: string, int64, float64, bool,
lists, nested structs; a part of the schema with no single type, e.g. an `anyOf` of several
types or an object without properties, is a string holding its JSON text), `choice` for choice,
and with `logprobs: true` `mean_logprob`, `min_logprob` (of the generated tokens, under the
model's raw logits) and, for choice, `choice_probs` (each choice's probability as the
continuation of the prompt, from the logits, normalised over the choices).

With a completion prompt (a base model) the output may begin with one space ("Answer: {...}"
reads as the model saw text in training); that space is not part of `output`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, Sequence

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.spec import JobSpec

_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
            "boolean": pa.bool_()}
_NAMES = {"string": "string", "integer": "integer", "number": "number", "boolean": "true/false"}


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    """`node` with a local `$ref` ('#/$defs/x', '#/definitions/x') followed."""
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 32:
        target: Any = root
        for part in node["$ref"].lstrip("#").strip("/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) and part else target
        node, seen = target, seen + 1
    return node if isinstance(node, dict) else {}


def _literal_type(values: Sequence[Any]) -> pa.DataType:
    if values and all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pa.int64()
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pa.float64()
    return pa.string()  # strings, or a mix: JSON text for the non-strings


def arrow_type(node: Any, root: dict[str, Any] | None = None) -> pa.DataType:
    """The Arrow type of values of a JSON Schema (see the module docstring)."""
    root = node if root is None else root
    node = _resolve(node, root)
    if "enum" in node:
        return _literal_type(list(node["enum"]))
    if "const" in node:
        return _literal_type([node["const"]])
    alts = node.get("anyOf") or node.get("oneOf")
    if alts:
        types = {str(t) for t in (arrow_type(a, root) for a in alts
                                  if _resolve(a, root).get("type") != "null")}
        return arrow_type(next(a for a in alts if _resolve(a, root).get("type") != "null"),
                          root) if len(types) == 1 else pa.string()
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array" and isinstance(node.get("items"), dict):
        return pa.list_(arrow_type(node["items"], root))
    if kind == "object" and node.get("properties"):
        return pa.struct([pa.field(k, arrow_type(v, root))
                          for k, v in node["properties"].items()])
    return pa.string()


def to_arrow(value: Any, t: pa.DataType) -> Any:
    """A parsed JSON value as a Python value of Arrow type `t` (strings keep non-string values
    as JSON text); ValueError when it does not fit."""
    if value is None:
        return None
    if pa.types.is_string(t):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_boolean(t):
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true/false")
        return value
    if pa.types.is_int64(t):
        if isinstance(value, bool) or not isinstance(value, int) or not -2**63 <= value < 2**63:
            raise ValueError(f"{value!r} is not a 64-bit integer")
        return value
    if pa.types.is_float64(t):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if pa.types.is_list(t):
        if not isinstance(value, list):
            raise ValueError(f"{value!r} is not a list")
        return [to_arrow(v, t.value_type) for v in value]
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not an object")
    return {f.name: to_arrow(value.get(f.name), f.type) for f in t}


def describe(node: Any, root: dict[str, Any] | None = None) -> str:
    """A short English description of a schema's values, for the prompt."""
    root = node if root is None else root
    node = _resolve(node, root)
    if "enum" in node:
        return "one of: " + ", ".join(str(v) for v in node["enum"])
    if "const" in node:
        return f"exactly {node['const']}"
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "array":
        items = node.get("items")
        return "a list" + (f" of {describe(items, root)}" if isinstance(items, dict) else "")
    if kind == "object" and node.get("properties"):
        required = set(node.get("required") or [])
        fields = [f"{k} ({describe(v, root)}{'' if k in required else ', optional'})"
                  for k, v in node["properties"].items()]
        return "an object with " + "; ".join(fields)
    return _NAMES.get(str(kind), "a value")


@dataclasses.dataclass(frozen=True)
class JobFormat:
    """The output format of a job, compiled (see the module docstring).

    `automaton` is None for text; `lead` the space a completion output may begin with."""

    kind: str  # text | json | regex | choice
    spec: Any  # the schema, pattern or choices
    logprobs: bool
    automaton: Any = None  # model.engine.Automaton
    lead: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def constrained(self) -> bool:
        return self.automaton is not None

    @functools.cached_property
    def parsed_type(self) -> pa.DataType:
        """json: the Arrow type of `parsed` (derived from the schema once)."""
        return arrow_type(self.spec)

    def fields(self) -> list[pa.Field]:
        """The output columns this format adds."""
        out = []
        if self.kind == "json":
            out.append(pa.field("parsed", self.parsed_type))
        if self.kind == "choice":
            out.append(pa.field("choice", pa.string()))
        if self.logprobs:
            out += [pa.field("mean_logprob", pa.float64()), pa.field("min_logprob", pa.float64())]
            if self.kind == "choice":
                out.append(pa.field("choice_probs", pa.map_(pa.string(), pa.float64())))
        return out

    def hint(self) -> str | None:
        """What the prompt tells the model about the expected output."""
        if self.kind == "json":
            return "Answer with JSON: " + describe(self.spec) + "."
        if self.kind == "choice":
            return "Answer with exactly one of: " + ", ".join(self.spec) + "."
        if self.kind == "regex":
            return f"Answer in the form of the regular expression {self.spec}"
        return None

    def row(self, text: str, complete: bool | None, logprobs: list[float] | None,
            output_tokens: int, max_new_tokens: int,
            choice_probs: Callable[[], Sequence[float]] | None = None
            ) -> tuple[str | None, dict[str, Any], tuple[str, str] | None]:
        """A generated row's (output text, values of `fields()`, error (kind, message))."""
        if self.lead and text.startswith(self.lead):
            text = text[len(self.lead):]
        values: dict[str, Any] = {}
        if self.logprobs:
            lp = logprobs or []
            values["mean_logprob"] = math.fsum(lp) / len(lp) if lp else None
            values["min_logprob"] = min(lp) if lp else None
        if self.constrained and not complete:
            return None, values, ("incomplete", (
                f"the output reached max_new_tokens={max_new_tokens} ({output_tokens} tokens) "
                f"before the {self.kind} format was complete; raise max_new_tokens"
                + (" or bound the schema's strings (maxLength)" if self.kind == "json" else "")))
        if self.kind == "json":
            try:
                values["parsed"] = to_arrow(json.loads(text), self.parsed_type)
            except ValueError as e:
                return text, values, ("parse", f"the output is not the schema's JSON: {e}")
        if self.kind == "choice":
            values["choice"] = text
            if self.logprobs and choice_probs is not None:
                values["choice_probs"] = list(zip(self.spec, map(float, choice_probs())))
        return text, values, None


def compile_job_format(spec: JobSpec) -> JobFormat:
    """The spec's format, compiled against its model's tokenizer (read without the weights);
    InputError (one line) when the format cannot be compiled or its tables exceed the bound."""
    f = spec.output_format
    body = {"json": f.json_schema, "regex": f.pattern, "choice": f.choices}.get(f.type)
    if f.type == "text":
        return JobFormat("text", None, spec.logprobs)
    from model.checkpoints import CheckpointError, load_text_side
    from model.engine import Format, FormatError, compile_format

    try:
        side = load_text_side(spec.model)
    except CheckpointError as e:
        raise InputError(str(e).splitlines()[0]) from None
    if side is None or side.tokenizer is None:
        raise InputError(f"output_format {f.type}: model {spec.model} has no tokenizer to "
                         "compile the format against; use a model with one")
    prompt_format = side.prompt_format if spec.prompt_format == "auto" else spec.prompt_format
    lead = " " if prompt_format == "completion" else ""
    t0 = time.perf_counter()
    try:
        auto = compile_format(Format(f.type, body, prefix=" ?" if lead else ""), side.tokenizer,
                              side.config.vocab_size, side.tokenizer.stop_ids)
    except FormatError as e:
        raise InputError(f"output_format: {e}") from None
    info = {"type": f.type, "states": auto.states, "classes": auto.classes,
            "table_bytes": auto.nbytes, "compile_s": round(time.perf_counter() - t0, 3)}
    return JobFormat(f.type, body, spec.logprobs, auto, lead, info)
