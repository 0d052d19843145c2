"""Prompt templates per task (summarize, answer, raw, extract) and checkpoint kind (chat,
completion).

Instruction-tuned checkpoints get Gemma's turn format; base checkpoints get a few-shot completion
frame ("Text: ... Summary: ...") that a small base model continues well. User text is always
encoded as plain text: control tokens a user types stay text; only our template inserts them.
A job's `instruction` leads every task's prompt (summarize: it replaces the default one); with an
output format, the prompt also says what the output must look like (`format_hint`: for a JSON
schema, its fields and their types).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Literal, Sequence

from model.tokenizer import Tokenizer, encode_with_specials

PromptFormat = Literal["chat", "completion"]

# C0/C1 control characters other than tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

_SUMMARY_SHOTS = (
    (
        "The city council approved a new budget on Monday. It raises spending on public parks "
        "and libraries by ten percent and pays for it by delaying a planned road project.",
        "The council's new budget gives parks and libraries 10% more, funded by delaying a "
        "road project.",
    ),
    (
        "Le musée de la ville rouvrira ses portes en juin après deux ans de travaux. Les "
        "visiteurs découvriront une nouvelle aile consacrée à l'histoire du port.",
        "Le musée rouvre en juin après deux ans de travaux, avec une nouvelle aile sur "
        "l'histoire du port.",
    ),
)

_ANSWER_SHOT = (
    "The Amazon is the largest rainforest on Earth and covers much of northern Brazil.",
    "Which country holds much of the Amazon rainforest?",
    "Brazil.",
)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """Everything that shapes a prompt, independent of the row."""

    task: Literal["summarize", "answer", "raw", "extract"]
    prompt_format: PromptFormat
    max_prompt_tokens: int
    long_document: str = "error"  # error | truncate | map-reduce | stream (spec.LongDocument)
    instruction: str | None = None
    summary_words: int | None = None
    format_hint: str | None = None  # what the output must look like (pipeline/formats.py)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A built prompt (token ids) or the reason a row has none."""

    ids: list[int] | None
    error_kind: str | None = None
    error: str | None = None
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class _Seg:
    text: str
    user: bool = False  # user text: encoded plain, never parsed for control tokens
    cut: bool = False  # may be shortened when the prompt is too long


def _attach_spaces(segs: list[_Seg]) -> list[_Seg]:
    """Moves a template's trailing spaces onto the user text that follows.

    SentencePiece marks a word's leading space on the word itself ("▁word"); encoding "Text: "
    and "word" apart would give a lone "▁" and a space-less "word", a sequence the model never
    saw in training. Encoding "Text:" and " word" gives the natural tokens.
    """
    out = list(segs)
    for i in range(len(out) - 1):
        a, b = out[i], out[i + 1]
        if not a.user and b.user and a.text.endswith(" "):
            stripped = a.text.rstrip(" ")
            spaces = a.text[len(stripped):]
            out[i] = dataclasses.replace(a, text=stripped)
            out[i + 1] = dataclasses.replace(b, text=spaces + b.text)
    return out


def clean_text(value: object) -> str | None:
    """User text without control characters; None for null."""
    if value is None:
        return None
    return _CONTROL.sub("", str(value))


def default_stop(fmt: PromptFormat, task: str, constrained: bool = False) -> list[str] | None:
    """Stop strings a format needs beyond the tokenizer's stop ids (none when an output format
    decides where a row ends)."""
    if fmt == "completion" and task in ("summarize", "answer", "extract") and not constrained:
        return ["\n"]
    return None


def head_and_tail(ids: list[int], keep: int, marker: Sequence[int] = ()) -> list[int]:
    """`keep` tokens of `ids`: its head and its tail (half each), `marker` between them."""
    room = keep - len(marker)
    head = (room + 1) // 2
    return list(ids[:head]) + list(marker) + list(ids[len(ids) - (room - head):])


class PromptBuilder:
    """Turns rows into prompt token ids with one tokenizer and one set of settings."""

    def __init__(self, settings: PromptSettings, tokenizer: Tokenizer):
        self.s = settings
        self.tok = tokenizer

    def _instruction(self) -> str:
        if self.s.instruction:
            return self.s.instruction.strip()
        if self.s.task == "extract":
            return "Extract the requested information from the text."
        length = (
            f" in about {self.s.summary_words} words" if self.s.summary_words else
            " in one or two sentences"
        )
        return f"Summarize the following text{length}, in the language of the text."

    def _head(self) -> str:
        """The lines before a task's own frame: the job's instruction (tasks other than
        summarize and extract, which place it themselves) and the format hint."""
        own = self.s.task in ("summarize", "extract")
        lines = [self.s.instruction.strip()] if self.s.instruction and not own else []
        if self.s.format_hint:
            lines.append(self.s.format_hint)
        return "".join(line + "\n" for line in lines)

    def _segments(self, text: str, question: str | None, context: str | None) -> list[_Seg]:
        task, fmt, head = self.s.task, self.s.prompt_format, self._head()
        if task == "raw":
            if fmt == "chat":
                return [_Seg("<start_of_turn>user\n" + head + ("\n" if head else "")),
                        _Seg(text, True, True), _Seg("<end_of_turn>\n<start_of_turn>model\n")]
            return [_Seg(head + ("\n" if head else "")), _Seg(text, True, True)]
        if task == "extract":
            ask = self._instruction() + "\n" + head
            if fmt == "chat":
                return [_Seg(f"<start_of_turn>user\n{ask}\n"), _Seg(text, True, True),
                        _Seg("<end_of_turn>\n<start_of_turn>model\n")]
            return [_Seg(f"{ask}\nText: "), _Seg(" ".join(text.split()), True, True),
                    _Seg("\nAnswer:")]
        if task == "summarize":
            if fmt == "chat":
                return [_Seg(f"<start_of_turn>user\n{self._instruction()}\n{head}\n"),
                        _Seg(text, True, True),
                        _Seg("<end_of_turn>\n<start_of_turn>model\n")]
            if self.s.instruction or self.s.summary_words:
                head = self._instruction() + "\n" + head
            head += "\n" if head else ""
            # "###" between examples: without it the 270M base model tends to repeat the first
            # example for scripts it saw little of (Arabic, Japanese, Swahili were measured).
            shots = "".join(f"Text: {t}\nSummary: {s}\n###\n" for t, s in _SUMMARY_SHOTS)
            return [_Seg(head + shots + "Text: "), _Seg(" ".join(text.split()), True, True),
                    _Seg("\nSummary:")]
        # answer: the text column is the context unless a separate context column is given.
        ctx = context if context is not None else text
        if fmt == "chat":
            segs = [_Seg(f"<start_of_turn>user\n{head}Answer the question using the context."
                         "\n\nContext:\n")]
            segs += [_Seg(ctx, True, True), _Seg("\n\nQuestion: "), _Seg(question or "", True),
                     _Seg("<end_of_turn>\n<start_of_turn>model\n")]
            return segs
        c, q, a = _ANSWER_SHOT
        return [_Seg(f"{head}{chr(10) if head else ''}Context: {c}\nQuestion: {q}\nAnswer: {a}"
                     "\n###\nContext: "),
                _Seg(" ".join(ctx.split()), True, True), _Seg("\nQuestion: "),
                _Seg(" ".join((question or "").split()), True), _Seg("\nAnswer:")]

    def build(self, text: object, question: object = None, context: object = None) -> Prompt:
        """Builds one row's prompt; a row that cannot be used gets an error instead."""
        t = clean_text(text)
        if t is None:
            return Prompt(None, "empty", "text is null; nothing to process")
        if not t.strip():
            return Prompt(None, "empty", "text is empty or only whitespace; nothing to process")
        q = clean_text(question)
        if self.s.task == "answer" and (q is None or not q.strip()):
            return Prompt(None, "empty", "question is null or empty; nothing to answer")
        ctx = clean_text(context)
        segs = _attach_spaces(self._segments(t, q, ctx))
        encoded: list[list[int]] = []
        for seg in segs:
            if seg.user:
                encoded.append(self.tok.encode(seg.text))
            else:
                encoded.append(encode_with_specials(self.tok, seg.text, add_bos=False))
        ids_len = 1 + sum(len(e) for e in encoded)
        limit = self.s.max_prompt_tokens
        truncated = False
        policy = self.s.long_document
        if ids_len > limit and policy != "stream":  # stream: any length (a fixed-size state)
            excess = ids_len - limit
            cut_at = [i for i, s in enumerate(segs) if s.cut]
            if policy != "truncate":
                return Prompt(
                    None, "too_long",
                    f"prompt is {ids_len} tokens, over the limit of {limit}; shorten the text, "
                    "raise max_input_tokens or max_prompt_tokens, or set long_document: truncate"
                    + (" or map-reduce" if self.s.task == "summarize" else ""),
                )
            i = cut_at[0] if cut_at else None
            marker = self.tok.encode(" [...]")
            if i is None or len(encoded[i]) <= excess + len(marker) + 2:
                return Prompt(
                    None, "too_long",
                    f"prompt is {ids_len} tokens and cannot be cut to the limit of {limit}",
                )
            encoded[i] = head_and_tail(encoded[i], len(encoded[i]) - excess, marker)
            truncated = True
        ids = [self.tok.bos_id]
        for e in encoded:
            ids.extend(e)
        return Prompt(ids, truncated=truncated)

    @functools.cached_property
    def frame_tokens(self) -> int:
        """Tokens a prompt takes besides its text (the template, BOS), about (measured once)."""
        return len(self.build("x").ids or ()) - len(self.tok.encode(" x"))

    def build_many(
        self,
        texts: Sequence[object],
        questions: Sequence[object] | None = None,
        contexts: Sequence[object] | None = None,
    ) -> list[Prompt]:
        n = len(texts)
        qs = questions if questions is not None else [None] * n
        cs = contexts if contexts is not None else [None] * n
        return [self.build(t, q, c) for t, q, c in zip(texts, qs, cs)]
