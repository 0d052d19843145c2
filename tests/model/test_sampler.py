"""The generation engine: cached greedy == full recompute, batch invariance, continuous batching,
seeded sampling, stop tokens / strings, and the number of compiled programs."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import load_model, transformer
from model.engine import DEFAULT_BUCKETS, Buckets, Engine, generate, plan_programs
from model.config import GemmaConfig

# Few buckets keep the number of programs (and compile time) small; chunk 8/32 makes prompts
# longer than 33 tokens prefill in several chunks, and the cache length is always 128.
TB = Buckets(batch=(1, 2, 4), length=(128,), chunk=(8, 32))
FAMILIES = ["tiny-gemma3", "tiny-gemma2"]
if importlib.util.find_spec("model.griffin") is not None:
    FAMILIES.append("tiny-recurrentgemma")

_MODELS: dict = {}
_ENGINES: dict = {}  # model -> its engine with the test buckets TB


def tiny(name: str):
    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


def prompts_of(lengths, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(4, vocab, size=n - 1).tolist() for n in lengths]


def gen(m, prompts, tokenizer=None, **kw):
    if m not in _ENGINES:
        _ENGINES[m] = Engine(m.family, m.config, m.params, buckets=TB)
    kw.setdefault("stop_token_ids", [])
    return generate(_ENGINES[m], prompts, tokenizer or m.tokenizer, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_cached_decode_equals_full_recompute(name):
    m = tiny(name)
    window = getattr(m.config, "sliding_window", None) or m.config.attention_window
    prompts = prompts_of([3, 20, 45])
    outs = gen(m, prompts, max_new_tokens=32, max_batch=4)
    # One full causal forward over all rows, right-padded (padding after a row cannot change
    # its logits).
    seqs = [p + g.tokens for p, g in zip(prompts, outs)]
    width = max(map(len, seqs))
    full = m.logits(np.asarray([s + [0] * (width - len(s)) for s in seqs]))  # [3, T, V]
    for i, (p, g) in enumerate(zip(prompts, outs)):
        assert g.finish_reason == "length" and g.output_tokens == 32 == len(g.tokens)
        assert g.prompt_tokens == len(p)
        assert len(p) + 32 > 2 * window  # the local ring wrapped
        want = np.argmax(full[i, len(p) - 1:len(p) + 31], axis=-1)
        np.testing.assert_array_equal(want, g.tokens)


def test_batch_composition_and_refills_never_change_greedy():
    m = tiny("tiny-gemma3")
    prompts = prompts_of([45, 3, 20, 12, 33], seed=1)
    max_new = [20, 8, 5, 12, 16]  # rows finish at different steps, so slots get refilled
    alone = [gen(m, [p], max_new_tokens=n, max_batch=1)[0] for p, n in zip(prompts, max_new)]
    batched = gen(m, prompts, max_new_tokens=max_new, max_batch=4)  # 4 slots, 5 rows
    for a, b, n in zip(alone, batched, max_new):
        assert len(a.tokens) == n
        assert a.tokens == b.tokens and a.text == b.text


def test_bfloat16_batch_composition_never_changes_greedy():
    # bf16 models take other CPU paths (f32-accumulated dots, a padded one-row product, a float32
    # cache): a row alone (1 slot) and in a batch must still decode the same tokens.
    m = load_model("tiny-gemma3", dtype="bfloat16")
    assert m.dtype == jnp.bfloat16
    prompts = prompts_of([45, 3, 20, 12, 33], seed=2)
    max_new = [20, 8, 5, 12, 16]
    alone = [gen(m, [p], max_new_tokens=n, max_batch=1)[0] for p, n in zip(prompts, max_new)]
    batched = gen(m, prompts, max_new_tokens=max_new, max_batch=4)
    for a, b, n in zip(alone, batched, max_new):
        assert len(a.tokens) == n and a.tokens == b.tokens
    # ... and each decoded token is the argmax of one full bf16 forward over the row (cached
    # bf16 decode == full recompute). How close bf16 is to float32 is bounded against HF's own
    # bf16 error in test_gemma_parity.py. Near-ties (top-2 margin under 0.02, ~5 bf16 steps at
    # this logit scale) may round either way on another CPU; the rest must agree exactly.
    seqs = [p + g.tokens for p, g in zip(prompts, batched)]
    width = max(map(len, seqs))
    full = m.logits(np.asarray([s + [0] * (width - len(s)) for s in seqs]))  # [5, T, V]
    confident = 0
    for i, (p, g) in enumerate(zip(prompts, batched)):
        lg = full[i, len(p) - 1:len(p) - 1 + len(g.tokens)]  # [n, V]: predicts each new token
        top2 = np.sort(lg, axis=-1)[:, -2:]
        sure = top2[:, 1] - top2[:, 0] > 0.02
        np.testing.assert_array_equal(lg.argmax(-1)[sure], np.asarray(g.tokens)[sure])
        confident += int(sure.sum())
    assert confident >= 0.9 * sum(max_new), confident


def test_seeded_sampling_is_reproducible_per_row():
    m = tiny("tiny-gemma3")
    prompts = prompts_of([20, 3, 45, 12], seed=2)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    a = gen(m, prompts, max_batch=4, **kw)
    b = gen(m, prompts, max_batch=1, **kw)
    # Reversed order, same row ids: each row still draws the same tokens.
    c = gen(m, prompts[::-1], max_batch=4, row_ids=[3, 2, 1, 0], **kw)[::-1]
    assert [g.tokens for g in a] == [g.tokens for g in b] == [g.tokens for g in c]
    other = gen(m, prompts, max_batch=4, **{**kw, "seed": 8})
    assert [g.tokens for g in other] != [g.tokens for g in a]
    greedy = gen(m, prompts, max_batch=4, max_new_tokens=12)
    assert [g.tokens for g in greedy] != [g.tokens for g in a]
    top1 = gen(m, prompts, max_batch=4, max_new_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert [g.tokens for g in top1] == [g.tokens for g in greedy]


def test_stop_tokens_and_stop_strings():
    m = tiny("tiny-gemma3")
    prompts = prompts_of([20, 12, 5], seed=3)  # 3 rows: the 4-slot programs of other tests
    ref = gen(m, prompts, max_new_tokens=24, max_batch=4)
    # A stop id taken from row 0's output ends it at its first occurrence.
    stop_id = ref[0].tokens[6]
    first = ref[0].tokens.index(stop_id)
    out = gen(m, prompts, max_new_tokens=24, max_batch=4, stop_token_ids=[stop_id])
    assert out[0].tokens == ref[0].tokens[:first] and out[0].finish_reason == "stop"
    assert out[0].output_tokens == first
    assert out[0].text == m.tokenizer.decode(ref[0].tokens[:first])
    # Rows that never emit the stop id run to their length untouched.
    assert [stop_id in r.tokens for r in ref[1:]] == [False, False]
    assert [o.tokens for o in out[1:]] == [r.tokens for r in ref[1:]]
    assert [o.finish_reason for o in out[1:]] == ["length", "length"]
    # A stop string taken from row 1's text cuts the text before it. The tiny model emits ids
    # the byte tokenizer has no text for, so decode each id as "<id>" here.
    tok = IdText()
    ref = gen(m, prompts, max_new_tokens=24, max_batch=4, tokenizer=tok)
    stop = tok.decode(ref[1].tokens[9:11])[1:-1]  # e.g. "45><301": spans a token boundary
    cut = ref[1].text.find(stop)
    n_keep = next(i for i in range(1, 25) if stop in tok.decode(ref[1].tokens[:i]))
    out = gen(m, prompts, max_new_tokens=24, max_batch=4, stop_strings=[stop],
              stop_check_every=4, tokenizer=tok)
    assert out[1].finish_reason == "stop" and out[1].text == ref[1].text[:cut]
    assert out[1].tokens == ref[1].tokens[:n_keep] and out[1].output_tokens == n_keep
    # Rows whose text never holds the stop string are untouched.
    assert [stop in r.text for r in (ref[0], ref[2])] == [False, False]
    assert [out[0].tokens, out[2].tokens] == [ref[0].tokens, ref[2].tokens]
    assert [out[0].finish_reason, out[2].finish_reason] == ["length", "length"]


class IdText:
    """Decodes id i as "<i>" (a test tokenizer that gives every id a visible text)."""

    stop_ids = (1,)

    def decode(self, ids):
        return "".join(f"<{int(i)}>" for i in ids)


def test_bad_inputs_fail_before_device_work():
    m = tiny("tiny-gemma3")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen(m, [[2, 5], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen(m, [[2, 999]], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the model's 4096-token context"):
        gen(m, [[2] * 4000], max_new_tokens=100)
    with pytest.raises(ValueError, match="max_new_tokens has 1 entries for 2 prompts"):
        gen(m, [[2], [2]], max_new_tokens=[3])
    assert gen(m, [[2, 5]], max_new_tokens=0)[0].finish_reason == "length"
    assert gen(m, [], max_new_tokens=4) == []


def _planned(key):
    """A compile-log key as plan_programs writes it (the out buffer and prefix bound dropped)."""
    kind, b, length = key[:3]
    if kind == "packed":
        return ("packed", b, length, key[4], key[5])
    if kind == "prefill":
        return ("prefill", b, length, key[4], key[5])
    return (kind, b, length)


def test_compiled_programs_stay_within_the_buckets():
    # 1,000 prompts of random lengths 5..2,000: the planner bounds the programs per group.
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 2001, size=1000).tolist()
    plan = plan_programs(lengths, max_new_tokens=16, max_batch=16)
    b = DEFAULT_BUCKETS
    decodes = [p for p in plan if p[0] == "decode"]
    assert len(decodes) == len({p[2] for p in decodes}) <= len(b.length)  # one per group
    assert all(p[1] == 16 for p in decodes)  # groups fill the slots
    # A job of 10 similar rows (the demo's shape) runs as one group, in one wave.
    demo = plan_programs([222] * 10, max_new_tokens=40, max_batch=16)
    assert [p for p in demo if p[0] == "decode"] == [("decode", 12, 384)]

    # A real run with a micro model: every compile is one the plan allows, few in all, and a
    # second run over the same prompts in another order compiles nothing.
    cfg = GemmaConfig(family="gemma3", vocab_size=384, d_model=16, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, ffw_dim=32, layer_types=("local", "global"),
                      sliding_window=16, qk_norm=True, post_norms=True,
                      query_pre_attn_scalar=8.0, max_seq_len=4096)
    params = transformer.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    small = Buckets(batch=(2, 8), length=(64, 128), chunk=(32,), pack=(64, 128, 256, 512),
                    span=(64,))
    lengths = rng.integers(5, 100, size=40).tolist()
    prompts = prompts_of(lengths, seed=4)
    engine = Engine(transformer, cfg, params, buckets=small)
    before = len(engine.compile_log.records)
    kw = dict(max_new_tokens=3, max_batch=8, stop_token_ids=[])
    out = generate(engine, prompts, None, **kw)
    new = engine.compile_log.records[before:]
    plan = plan_programs(lengths, max_new_tokens=3, max_batch=8, buckets=small)
    assert {_planned(r.key) for r in new} <= plan
    assert len(new) <= 12, [r.shapes for r in new]
    assert all(g.output_tokens == 3 for g in out)
    order = rng.permutation(len(prompts))
    again = generate(engine, [prompts[i] for i in order], None, row_ids=order.tolist(), **kw)
    assert len(engine.compile_log.records) == before + len(new)
    assert [again[j].tokens for j in np.argsort(order)] == [g.tokens for g in out]


def test_stop_string_tokens_stop_rows_on_device():
    from model.checkpoints.load import load_text_side
    from model.engine.scheduler import MAX_STOP_TOKENS, stop_string_tokens

    tok = load_text_side("gemma3-270m").tokenizer
    newline = stop_string_tokens(tok, ["\n"])
    # Every token whose own text holds a newline (the byte token, "\n\n", ...), nothing else.
    assert set(tok.encode("a\nb")) & newline  # the newline of real text is among them
    assert newline and all("\n" in tok.decode([i]) for i in newline)
    assert len(newline) < 100
    # A string most tokens hold stays a host check (no giant stop table); the others still go.
    common = stop_string_tokens(tok, ["e"])
    assert common == frozenset() and len(newline) < MAX_STOP_TOKENS
    assert stop_string_tokens(tok, ["\n", "e"]) == newline
    # With the tiny byte tokenizer: one byte is one token; two bytes span tokens (host check).
    m = tiny("tiny-gemma3")
    assert stop_string_tokens(m.tokenizer, ["7"]) == frozenset(m.tokenizer.encode("7"))
    assert stop_string_tokens(m.tokenizer, ["78"]) == frozenset()


def test_stop_string_tokens_are_kept_on_disk_per_vocabulary(tmp_path, monkeypatch):
    from model.checkpoints.load import load_text_side
    from model.engine.results import stop_string_tokens
    from model.tokenizer import SentencePieceTokenizer

    monkeypatch.setenv("GEMMA_BATCH_CACHE", str(tmp_path))
    proto = load_text_side("gemma3-270m").tokenizer.model_proto
    first = stop_string_tokens(SentencePieceTokenizer(proto), ["\n"])
    (entry,) = (tmp_path / "stop-tokens").glob("*.json")
    fresh = SentencePieceTokenizer(proto)  # another process's tokenizer: nothing in memory

    def no_decode(ids):
        raise AssertionError("the vocabulary was decoded again although the cache holds it")

    fresh.decode_each = no_decode
    assert stop_string_tokens(fresh, ["\n"]) == first and len(first) > 1
    # Other stop strings are another entry; a damaged entry is computed again and rewritten.
    other = SentencePieceTokenizer(proto)
    assert stop_string_tokens(other, ["\n", "."]) > first
    assert len(list((tmp_path / "stop-tokens").glob("*.json"))) == 2
    entry.write_text("{not json")
    again = SentencePieceTokenizer(proto)
    assert stop_string_tokens(again, ["\n"]) == first
    assert json.loads(entry.read_text())["ids"] == sorted(first)
