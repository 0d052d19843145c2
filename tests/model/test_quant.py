"""Decode on a GGUF's own block codes (model/checkpoints/gguf_codes.py, model/quant.py) through
the native kernel (model/kernels): the codes give the float32 weights bit for bit, the kernel's
products equal float64 ones to float32 rounding, and the 270M's decode steps give the logits and
greedy tokens of the float32 program."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import kernels, load_model, quant
from model import transformer as tr
from model.checkpoints.dequant import dequantize
from model.checkpoints.gguf_cache import codes_file
from model.checkpoints.gguf_codes import GGUFCodes, gguf_codes, read_codes
from model.checkpoints.gguf_format import open_gguf
from model.cpu import cpu_flags
from model.embedded import embedded_gguf_path
from model.engine import sampling
from model.engine.rows import decode_head

CAN_BUILD = (platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags()
             and any(shutil.which(c) for c in ("g++", "c++", "clang++")))


def test_kernel_is_built_where_the_cpu_and_a_compiler_allow_it():
    assert kernels.available() == CAN_BUILD, kernels.reason()
    if not CAN_BUILD:
        assert kernels.reason()  # says why


needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs x86-64 AVX2+FMA and a compiler")


def test_kernel_is_built_for_avx512_where_the_cpu_has_it(monkeypatch):
    # The products below then run the 16-lane path on AVX-512 CPUs and the 8-lane one elsewhere;
    # GEMMA_BATCH_KERNEL_ISA=avx2 builds the AVX2 one anywhere (CI's AVX2 runs cover it).
    monkeypatch.delenv("GEMMA_BATCH_KERNEL_ISA", raising=False)
    assert ("-mavx512f" in kernels.flags()) == ("avx512f" in cpu_flags())
    monkeypatch.setenv("GEMMA_BATCH_KERNEL_ISA", "avx2")
    assert "-mavx512f" not in kernels.flags()


def test_codes_give_every_quantized_tensor_of_the_embedded_gguf_exactly():
    g = open_gguf(embedded_gguf_path())
    types: dict[str, int] = {}
    for t in g.tensors:
        codes = gguf_codes(g, t)
        if codes is None:
            assert t.qtype.name in ("F32", "F16", "BF16"), t.qtype.name  # nothing left out
            continue
        q, so, group = codes
        assert q.dtype == np.int8 and so.shape == (t.shape[0], t.shape[1] // group, 2)
        assert quant.codes_exact(q, so, dequantize(g, t)), t.name
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    assert set(types) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}, types
    # A changed weight is noticed.
    t = next(t for t in g.tensors if t.qtype.name == "Q4_K")
    w = dequantize(g, t)
    w[3, 5] = np.nextafter(w[3, 5], np.float32(np.inf))
    assert not quant.codes_exact(*gguf_codes(g, t)[:2], w)


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 8, 13, 24, 37])
@pytest.mark.parametrize("group", [16, 32])
def test_qmatmul_matches_float64(m, group):
    # 24 and 37 rows: several row blocks of 16 (AVX-512) or 8 (AVX2).
    rng = np.random.default_rng(m * group)
    n, k = 1000, 640
    q = rng.integers(-32, 32, (n, k), dtype=np.int8)
    so = np.stack([rng.uniform(1e-3, 2e-2, (n, k // group)),
                   rng.uniform(-0.1, 0.1, (n, k // group))], -1).astype(np.float32)
    w = (so[..., :1] * q.reshape(n, k // group, group) + so[..., 1:]).reshape(n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T  # [M, N]
    f = jax.jit(kernels.qmatmul, static_argnames=("group", "vocab_major"))
    got = np.asarray(f(jnp.asarray(x), jnp.asarray(q), jnp.asarray(so), group=group))
    got_t = np.asarray(f(jnp.asarray(x), jnp.asarray(q), jnp.asarray(so), group=group,
                         vocab_major=True))
    scale = np.abs(exact).max()
    assert np.abs(got - exact).max() <= 2e-6 * scale
    np.testing.assert_array_equal(got_t, got.T)
    # Rows not wanted (a decode step's free slots) are skipped and give zeros; the others are
    # the same numbers as with every row computed.
    rows = rng.random(m) < 0.6
    for vm in (False, True):
        part = np.asarray(f(jnp.asarray(x), jnp.asarray(q), jnp.asarray(so), group=group,
                            vocab_major=vm, rows=jnp.asarray(rows)))
        np.testing.assert_array_equal(part.T if vm else part, np.where(rows[:, None], got, 0.0))


def _argmax_case(rng: np.random.Generator, m: int, group: int, offsets: bool):
    """A head of 1000 tokens (not a multiple of 16) with hard cases for `qargmax`: an exact
    duplicate of the best token at a higher index and a near-duplicate (one code apart), rows
    aimed at those, a row with one huge entry (coarse codes), a zero row, a NaN row."""
    n, k = 1000, 640
    q = rng.integers(-127, 128, (n, k), dtype=np.int8)
    so = np.stack([rng.uniform(1e-3, 2e-2, (n, k // group)),
                   rng.uniform(-0.05, 0.05, (n, k // group)) if offsets
                   else np.zeros((n, k // group))], -1).astype(np.float32)
    q[41, 5] = 100
    q[700], so[700] = q[41], so[41]  # a tie: the first index must win
    q[702], so[702] = q[41], so[41]
    q[702, 5] = 99  # one code apart, below 41 for the row aimed at it
    w = (so[..., :1] * q.reshape(n, k // group, group) + so[..., 1:]).reshape(n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0] = w[41] * 40 + rng.standard_normal(k).astype(np.float32) * 0.01  # aimed at 41/700/702
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2, 17] = 300.0  # one huge entry: its group's codes are coarse
    if m > 3:
        x[3, 9] = np.nan
    return q, so, x


@needs_kernel
@pytest.mark.parametrize("m", [1, 5, 24, 32])
@pytest.mark.parametrize("group, offsets", [(32, False), (32, True), (16, True)])
def test_qargmax_is_the_argmax_of_qmatmul(m, group, offsets):
    assert kernels.available(), kernels.reason()
    rng = np.random.default_rng(m * group + offsets)
    q, so, x = _argmax_case(rng, m, group, offsets)
    qj, soj = jnp.asarray(q), jnp.asarray(so)
    tiles = jax.jit(kernels.qargmax_tiles, static_argnums=2)(qj, soj, group)
    assert tiles[0].shape == (63, 640 * 16) and tiles[4].shape == (63, 640 // group)
    rows = np.ones(m, bool)
    rows[m // 2] = m == 1  # one row not wanted
    logits = kernels.qmatmul(jnp.asarray(x), qj, soj, group)  # [M, N]
    want = np.where(rows, np.asarray(sampling.argmax(logits)), 0)
    got = np.asarray(kernels.qargmax(jnp.asarray(x), tiles, qj, soj, group, offsets,
                                     jnp.asarray(rows)))
    np.testing.assert_array_equal(got, want)
    assert got[0] == 41  # the hard rows hit what they aim at
    if m > 1:
        assert got[1] == 0
    if not offsets:  # "no offsets" only skips a product that adds zeros
        np.testing.assert_array_equal(
            np.asarray(kernels.qargmax(jnp.asarray(x), tiles, qj, soj, group, True,
                                       jnp.asarray(rows))), want)


@needs_kernel
def test_qargmax_in_the_avx2_build():
    # The AVX2 build (vpmaddubsw, 7-bit codes of x) is the one AVX2-only CPUs run; an AVX-512
    # CPU builds it too when asked, in a process of its own. On an AVX2-only CPU this repeats
    # the test above in a fresh process (no skip: CI=true fails a run with one).
    script = (
        "import numpy as np, jax, jax.numpy as jnp, sys\n"
        "sys.path.insert(0, %r)\n"
        "from tests.model.test_quant import _argmax_case\n"
        "from model import kernels\n"
        "from model.engine import sampling\n"
        "assert kernels.available() and '-mavx512f' not in kernels.flags()\n"
        "for m, group, offsets in [(24, 32, False), (7, 16, True)]:\n"
        "    q, so, x = _argmax_case(np.random.default_rng(m), m, group, offsets)\n"
        "    q, so, xj = jnp.asarray(q), jnp.asarray(so), jnp.asarray(x)\n"
        "    t = kernels.qargmax_tiles(q, so, group)\n"
        "    want = np.asarray(sampling.argmax(kernels.qmatmul(xj, q, so, group)))\n"
        "    got = np.asarray(kernels.qargmax(xj, t, q, so, group, offsets))\n"
        "    assert (got == want).all(), (got, want)\n"
        "print('ok')\n") % str(Path(__file__).parents[2])
    env = {**os.environ, "GEMMA_BATCH_KERNEL_ISA": "avx2", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@needs_kernel
def test_independent_products_in_one_program_do_not_wait_on_each_other():
    # XLA may run independent custom calls at once on its intra-op pool (q, k and v of a layer):
    # each call's helpers must not be waited for while they are queued behind the others.
    rng = np.random.default_rng(0)
    ws = [quant.QWeight(jnp.asarray(rng.integers(-8, 8, (4096, 256), dtype=np.int8)),
                        jnp.asarray(np.ones((4096, 8, 2), np.float32)), 32) for _ in range(6)]
    x = jnp.asarray(rng.standard_normal((8, 256)).astype(np.float32))

    @jax.jit
    def many(x, ws):
        return sum(w.dot(x * (i + 1)) for i, w in enumerate(ws))

    want = sum((np.asarray(x) * (i + 1)) @ (np.asarray(w.q, np.float32) + 1).T
               for i, w in enumerate(ws))
    for _ in range(20):
        np.testing.assert_allclose(np.asarray(many(x, ws)), want, rtol=1e-4, atol=1e-2)


def _attention_reference(q, keys, values, key_pos, query_pos, window, cap):
    """float64 attention of one decode step (kernels.decode_attention's contract)."""
    b, h, dh = q.shape
    kh = keys.shape[2]
    scores = np.einsum("bkgd,bskd->bkgs", q.reshape(b, kh, h // kh, dh), keys)
    if cap:
        scores = np.tanh(scores / cap) * cap
    seen = (key_pos >= 0) & (key_pos <= query_pos[:, None])
    if window:
        seen &= query_pos[:, None] - key_pos < window
    scores = np.where(seen[:, None, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))  # rows that see nothing: zeros
    return np.einsum("bkgs,bkds->bkgd", p, values).reshape(b, h, dh)


@needs_kernel
@pytest.mark.parametrize("b, kh, g, dh, s, window, cap", [
    (3, 2, 2, 16, 40, None, None),  # grouped heads, a length not a multiple of 8
    (8, 1, 4, 256, 256, None, None),  # Gemma 3 270M's shapes
    (2, 1, 5, 8, 13, 6, 50.0),  # more than 4 query heads per KV head, a window, soft-cap
    (4, 2, 1, 32, 64, 16, None),  # ring-like: positions anywhere in the slots
])
def test_decode_attention_matches_float64(b, kh, g, dh, s, window, cap):
    rng = np.random.default_rng(s)
    q = rng.standard_normal((b, kh * g, dh)).astype(np.float32)
    keys = rng.standard_normal((b, s, kh, dh)).astype(np.float32)
    values = rng.standard_normal((b, kh, dh, s)).astype(np.float32)
    key_pos = rng.integers(-1, s, (b, s)).astype(np.int32)  # -1: empty slots
    query_pos = rng.integers(0, s, (b,)).astype(np.int32)
    query_pos[0] = -1  # a free slot's row: sees nothing
    f = jax.jit(kernels.decode_attention, static_argnames=("window", "cap"))
    got = np.asarray(f(q, keys, values, key_pos, query_pos, window=window, cap=cap))
    want = _attention_reference(*(a.astype(np.float64) for a in (q, keys, values)), key_pos,
                                query_pos, window, cap)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert not got[0].any()


@pytest.fixture(scope="module")
def embedded():
    m = load_model("gemma3-270m", dtype="float32")
    return m, read_codes(embedded_gguf_path())


@needs_kernel
def test_engine_decodes_a_gguf_on_its_codes_unless_turned_off(embedded, monkeypatch):
    m, codes = embedded
    dw = m.engine.head
    assert isinstance(dw, quant.DecodeWeights) and dw.embed is not None
    # Every matrix, q/k/v and gate/up stacked.
    assert all(set(layer) == {"qkv", "o", "gate_up", "down"} for layer in dw.layers)
    assert quant.nbytes(dw) < 0.4 * sum(x.nbytes for x in jax.tree_util.tree_leaves(m.params))
    monkeypatch.setenv("GEMMA_BATCH_QUANT_DECODE", "off")
    assert not isinstance(decode_head(m.params, None, codes=lambda: codes), quant.DecodeWeights)
    # Parameters the codes do not give (bfloat16, or changed) keep their float32 path.
    monkeypatch.delenv("GEMMA_BATCH_QUANT_DECODE")
    p = dict(m.params, layers=list(m.params["layers"]))
    p["layers"][2] = dict(p["layers"][2], up=p["layers"][2]["up"] * 1.5)
    dw2 = quant.decode_weights(codes, p)
    assert set(dw2.layers[2]) == {"qkv", "o", "gate", "down"}  # up alone is float32
    assert "gate_up" in dw2.layers[3]


@needs_kernel
def test_checked_codes_are_cached_and_a_damaged_entry_is_read_again(embedded, tmp_path,
                                                                      monkeypatch):
    m, _ = embedded
    monkeypatch.setenv("GEMMA_BATCH_CACHE", str(tmp_path))
    src = GGUFCodes(embedded_gguf_path())
    first = decode_head(m.params, None, codes=src)
    assert not src.checked and codes_file(src.path).exists()
    again = decode_head(m.params, None, codes=src)  # from the cache, not checked again
    assert src.checked
    # Read memory-mapped (no copy, no GIL held while 338 MB are read): the arrays are views.
    cached = src()
    assert all(not q.flags.owndata and not q.flags.writeable for q, _, _ in cached.values())
    # Stored stacked as the kernel reads them (q, k, v -> qkv; gate, up -> gate_up).
    assert {"layers.0.qkv", "layers.0.gate_up", "layers.0.o"} <= cached.keys()
    assert "layers.0.q" not in cached and cached["layers.0.qkv"][0].shape == (1536, 640)
    leaves = jax.tree_util.tree_leaves
    assert len(leaves(again)) == len(leaves(first))
    for a, b in zip(leaves(first), leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Damaged (a new file: the arrays above still map the old one, as a running engine's do).
    codes_file(src.path).unlink()
    codes_file(src.path).write_bytes(b"not a safetensors file")
    decode_head(m.params, None, codes=src)
    assert not src.checked  # read from the GGUF and checked


@needs_kernel
def test_270m_decode_steps_on_codes_match_the_float32_program(embedded):
    m, _ = embedded
    cfg, params, dw = m.config, m.params, m.engine.head
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time there",
               "Water boils at a temperature of"]
    ids = [m.tokenizer.encode(p, add_bos=True) for p in prompts]
    t = max(map(len, ids))
    tokens = np.zeros((len(ids), t), np.int32)
    positions = np.full((len(ids), t), -1, np.int32)
    for i, s in enumerate(ids):  # left-aligned rows, padding after
        tokens[i, :len(s)], positions[i, :len(s)] = s, np.arange(len(s))
    state = tr.init_state(cfg, len(ids), 64, jnp.float32)
    _, state = jax.jit(tr.forward, static_argnames="cfg")(params, tokens, positions, state, cfg)
    step = jax.jit(tr.forward, static_argnames=("cfg", "vocab_major"))
    nxt = jnp.asarray([s[-1] for s in ids], jnp.int32)[:, None]
    pos = jnp.asarray([len(s) - 1 for s in ids], jnp.int32)[:, None]
    # Re-feed each prompt's last token (same position: the cache slot is rewritten), then decode.
    s32 = sq = state
    worst = 0.0
    for _ in range(8):
        l32, s32 = step(params, nxt, pos, s32, cfg, True, None)  # [V, B]
        lq, sq = step(params, nxt, pos, sq, cfg, True, dw)
        l32, lq = np.asarray(l32), np.asarray(lq)
        worst = max(worst, float(np.abs(lq - l32).max() / np.abs(l32).max()))
        np.testing.assert_array_equal(lq.argmax(0), l32.argmax(0))
        nxt, pos = jnp.asarray(l32.argmax(0), jnp.int32)[:, None], pos + 1
    assert worst < 1e-5, worst


@needs_kernel
def test_greedy_rows_take_the_argmax_head_with_the_same_tokens(embedded, monkeypatch):
    m, _ = embedded
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time there",
               "Water boils at a temperature of", "List three colours:"]

    def run(**kw):
        before = len(m.engine.compile_log.records)
        out = [g.tokens for g in m.generate(prompts, max_new_tokens=12, **kw)]
        return out, [r.shapes for r in m.engine.compile_log.records[before:]]

    monkeypatch.setenv("GEMMA_BATCH_GREEDY_HEAD", "off")
    m.engine.compile_log.clear()
    off, shapes_off = run()
    assert not any("greedy" in s for s in shapes_off)
    monkeypatch.delenv("GEMMA_BATCH_GREEDY_HEAD")
    m.engine.compile_log.clear()
    on, shapes_on = run()
    assert on == off and any("greedy" in s for s in shapes_on), shapes_on
    assert isinstance(m.engine.greedy_head.argmax, quant.ArgmaxTiles)
    # A sampled row in the call: the full logits, as before.
    m.engine.compile_log.clear()
    sampled, shapes = run(temperature=[0.0, 0.0, 0.7, 0.0, 0.0])
    assert not any("greedy" in s for s in shapes)
    assert [t for i, t in enumerate(sampled) if i != 2] == [t for i, t in enumerate(on) if i != 2]
    # A soft-capped head (Gemma 2) keeps the logits: tanh may round two of them to a tie.
    assert tr.greedy_head(m.config, m.engine.head, 8)
    capped = dataclasses.replace(m.config, final_softcap=30.0)
    assert not tr.greedy_head(capped, m.engine.head, 8)
    assert not tr.greedy_head(m.config, m.engine.head, tr.QUANT_MAX_ROWS + 1)


def test_codes_read_ahead_are_handed_over_once():
    # An actor reads the codes while its first batch is on its way (host arrays only); the
    # engine's first decode takes them, and they are not held after that.
    codes = GGUFCodes(embedded_gguf_path())
    codes.prefetch()
    first = codes()
    assert codes._ahead is None
    again = codes()
    assert first.keys() == again.keys()
    for name in ("embed", "layers.0.o", "layers.17.down"):  # in either layout (see below)
        np.testing.assert_array_equal(first[name][0], again[name][0])
        assert first[name][2] == again[name][2]
