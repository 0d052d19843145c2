"""What a generator actor needs besides rows, and the helpers around it: `GenSettings` (from a
job's spec and preflight plan), `prompt_setup` (the prompt builder and stop strings of a loaded
model, shared with `validate`'s token counts), row keys and error triage."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pyarrow as pa

from pipeline.prompts import PromptBuilder, PromptSettings, default_stop
from pipeline.spec import JobSpec

_FATAL_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "DEVICE_LOST", "UNAVAILABLE",
                  "device lost", "Device lost")


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """What the actor needs besides rows: model source, prompt and sampling settings."""

    model: str
    dtype: str | None
    prompt_format: str  # auto | chat | completion
    task: str
    instruction: str | None
    summary_words: int | None
    max_prompt_tokens: int | None
    long_document: str  # the policy in force (JobSpec.long_document_policy)
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stop: tuple[str, ...] | None
    mesh: tuple[int, int] | None  # (data, model); None = chosen from devices and model size
    schema: pa.Schema  # the output schema (id, contract columns, carried columns)
    phase_board: str | None = None  # the board (pipeline.phases) the actor reports its phase to
    output: str | None = None  # where the actor writes its parts (None: returns the rows)
    slots: int = 32  # rows decoding at once per actor
    params: tuple[str, ...] = ()  # per-row settings the batches carry (row_params.PARAMS)
    lease: str | None = None  # the run's lease token: parts are written only while it is live
    output_format: Any = None  # pipeline.formats.JobFormat (compiled once, in preflight)
    max_input_tokens: int | None = None  # caps the context a row uses (prompt + output)

    @classmethod
    def of(cls, spec: JobSpec, plan: Any, phase_board: str | None = None,
           output: str | None = None, params: tuple[str, ...] = (),
           lease: str | None = None) -> "GenSettings":
        """The settings of a job's actors, from its spec and preflight `Plan`."""
        s, schema = spec.sampling, plan.output_schema()
        return cls(
            model=spec.model, dtype=spec.dtype, prompt_format=spec.prompt_format, task=spec.task,
            instruction=spec.instruction, summary_words=spec.summary_words,
            max_prompt_tokens=spec.max_prompt_tokens, long_document=spec.long_document_policy,
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p, seed=s.seed, stop=tuple(s.stop) if s.stop else None,
            mesh=spec.mesh.shape if spec.mesh else None, schema=schema, phase_board=phase_board,
            output=output, slots=spec.batch_size, params=params, lease=lease,
            output_format=plan.output_format, max_input_tokens=spec.max_input_tokens)


def is_fatal(exc: BaseException) -> bool:
    """Errors after which this actor's engine cannot be trusted."""
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc)
    return type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and any(
        m in msg for m in _FATAL_MARKERS)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, at most `limit` characters of message."""
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:limit]}"


def prompt_setup(model: Any, settings: GenSettings) -> tuple[PromptBuilder, list[str] | None]:
    """The prompt builder and stop strings of a loaded model under these settings (the actors
    and `validate`'s token counts use the same)."""
    if model.tokenizer is None:
        raise RuntimeError(f"model {settings.model} has no tokenizer; it cannot read text")
    cfg = model.config
    context = min(cfg.max_seq_len, settings.max_input_tokens or cfg.max_seq_len)
    limit = context - settings.max_new_tokens
    if settings.max_prompt_tokens:
        limit = min(limit, settings.max_prompt_tokens)
    if limit < 8:
        raise RuntimeError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in a "
            f"context of {context} tokens")
    fmt_used, out_fmt = model.prompt_format, settings.output_format
    builder = PromptBuilder(
        PromptSettings(settings.task, fmt_used, limit, settings.long_document,
                       settings.instruction, settings.summary_words,
                       out_fmt.hint() if out_fmt is not None else None),
        model.tokenizer,
    )
    constrained = out_fmt is not None and out_fmt.constrained
    stop = list(settings.stop) if settings.stop else default_stop(fmt_used, settings.task,
                                                                  constrained)
    return builder, stop


def row_id_of(value: Any) -> int:
    """The key of a row's random draws, from its id: the same row samples the same tokens in
    any batch, on any actor, in any run."""
    h = hashlib.blake2b(str(value).encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF
