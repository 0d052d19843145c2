"""Output formats as token automata (model/engine/constrain.py): the device tables agree with
outlines-core's own index state by state, and every string a walk over the tables can produce
(random logits, masked to the allowed tokens) matches the regex / validates against the schema."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from model.engine.constrain import Format, FormatError, compile_format, escape, token_bytes
from model.tokenizer import ByteTokenizer

TOK = ByteTokenizer(384)
V, STOPS = TOK.vocab_size, TOK.stop_ids
SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string", "maxLength": 6},
                         "year": {"type": "integer"},
                         "topic": {"enum": ["physics", "history", "art"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
          "required": ["title", "year", "topic"]}


def _walk(auto, rng: np.random.Generator, max_steps: int = 400) -> bytes | None:
    """Greedy over random logits masked to the allowed tokens, until a stop token (its bytes)
    or `max_steps` (None)."""
    state, out = 0, b""
    table = token_bytes(TOK, V)
    for _ in range(max_steps):
        logits = rng.standard_normal(V)
        logits[STOPS[0]] += 2.0  # end once the format allows it, so walks stay short
        tok = int(np.argmax(np.where(auto.allowed(state), logits, -np.inf)))
        if tok in STOPS:
            assert auto.final[state]
            return out
        state = auto.step(state, tok)
        assert state >= 0
        out += table[tok]
    return None


def test_tables_agree_with_the_library_index():
    from outlines_core import Index, Vocabulary

    fmt = Format("regex", r"(yes|no|[a-c]{1,3}-[0-9]{2})")
    auto = compile_format(fmt, TOK, V, STOPS)
    pieces: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(TOK, V)):
        if b and i not in STOPS:
            pieces.setdefault(b, []).append(i)
    index = Index(fmt.regex(), Vocabulary(STOPS[0], pieces))
    seen, todo = {}, [(index.get_initial_state(), 0)]
    while todo:  # both automata in step, from their starts
        theirs, ours = todo.pop()
        if theirs in seen:
            assert seen[theirs] == ours
            continue
        seen[theirs] = ours
        allowed = set(index.get_allowed_tokens(theirs))
        assert set(np.flatnonzero(auto.allowed(ours)).tolist()) == allowed
        assert bool(auto.final[ours]) == index.is_final_state(theirs)
        for tok in allowed - set(STOPS):
            todo.append((index.get_next_state(theirs, tok), auto.step(ours, tok)))
    assert len(seen) == auto.states and auto.classes < V  # tokens share classes
    assert auto.nbytes < V * 4 + auto.states * auto.classes * 4 + auto.states + 1


@pytest.mark.parametrize("fmt,check", [
    (Format("regex", r"[a-z]{2,5}-[0-9]{3}( ok)?"),
     lambda s: re.fullmatch(r"[a-z]{2,5}-[0-9]{3}( ok)?", s)),
    (Format("choice", ["positive", "negative", "neutral (mixed)", "n/a"]),
     lambda s: s in ("positive", "negative", "neutral (mixed)", "n/a")),
    (Format("json", SCHEMA), lambda s: jsonschema.validate(json.loads(s), SCHEMA) is None),
])
def test_every_walk_matches_the_format(fmt, check):
    auto = compile_format(fmt, TOK, V, STOPS)
    rng = np.random.default_rng(0)
    done = [w for w in (_walk(auto, rng) for _ in range(60)) if w is not None]
    assert len(done) >= 50
    texts = [w.decode("utf-8") for w in done]  # complete UTF-8 (strict)
    assert all(check(t) for t in texts), [t for t in texts if not check(t)][:3]
    assert len(set(texts)) > 1  # the walks explore the format


def test_no_walk_can_stop_early():
    auto = compile_format(Format("choice", ["alpha", "beta"]), TOK, V, STOPS)
    assert not auto.final[0] and not auto.allowed(0)[list(STOPS)].any()
    s = auto.step(0, TOK.encode("a")[0])
    for ch in "lph":
        s = auto.step(s, TOK.encode(ch)[0])
    assert auto.step(s, TOK.encode("x")[0]) == -1  # off the format: not allowed
    s = auto.step(s, TOK.encode("a")[0])
    assert auto.final[s] and auto.allowed(s)[STOPS[0]] and auto.allowed(s).sum() == len(STOPS)


def test_escape_and_bad_formats():
    assert re.fullmatch(escape("a.b (c)? [d]"), "a.b (c)? [d]")
    with pytest.raises(FormatError, match="cannot be compiled"):
        compile_format(Format("regex", "(unclosed"), TOK, V, STOPS)
    with pytest.raises(FormatError, match="at least one choice"):
        compile_format(Format("choice", []), TOK, V, STOPS)
    with pytest.raises(FormatError, match=r"states and \d+ token classes: its tables would need"):
        compile_format(Format("json", SCHEMA), TOK, V, STOPS, budget_bytes=1 << 10)


@pytest.fixture(scope="module")
def tiny():
    from model import load_model

    return load_model("tiny-gemma3")


@pytest.mark.parametrize("n", [1, 3])  # 1 slot: [B, V] logits; 3: the vocab-major [V, B] head
def test_constrained_decode_matches_the_format(tiny, n):
    from model.engine import generate

    pattern = r"(yes|no)-[a-f]{2,4}( [0-9]{1,3})?"
    prompts = [tiny.tokenizer.encode(f"Row {i}: answer.", add_bos=True) for i in range(n)]
    for temperature in (0.0, 1.0):  # greedy and seeded sampling
        gens = generate(tiny.engine, prompts, tiny.tokenizer, max_new_tokens=16,
                        temperature=temperature, seed=3, output_format=Format("regex", pattern),
                        max_batch=n)
        for g in gens:
            assert g.complete and g.finish_reason == "stop", g
            assert re.fullmatch(pattern, g.text), g.text
    cut = generate(tiny.engine, prompts, tiny.tokenizer, max_new_tokens=2,
                   output_format=Format("regex", pattern), max_batch=n)
    assert all(g.complete is False and g.finish_reason == "length" for g in cut)


def test_a_format_the_output_already_meets_changes_nothing():
    from model import load_model
    from model.engine import generate

    m = load_model("gemma3-270m", prompt_format="completion")
    prompts = [m.encode_prompts([t])[0] for t in (
        "The capital of France is", "Water boils at", "A list of three colours:")]
    free = generate(m.engine, prompts, m.tokenizer, max_new_tokens=10, max_batch=3)
    for p, g in zip(prompts, free):
        assert g.text.strip()
        [same] = generate(m.engine, [p], m.tokenizer, max_new_tokens=10,
                          output_format=Format("regex", escape(g.text)))
        assert same.tokens == g.tokens and same.text == g.text and same.complete, (g, same)
