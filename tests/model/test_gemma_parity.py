"""Gemma 1/2/3 parity against Hugging Face transformers (eager attention, CPU torch, float32).

Tiny random models with every weight perturbed, GQA/MQA, head_dim != hidden/heads, sequences
longer than the sliding window, saved as safetensors and loaded through `load_model(dir)`.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from model import CheckpointError, load_model

VOCAB, WINDOW, SEQ = 256, 16, 48


def _hf_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  head_dim=24, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
                  pad_token_id=0, attn_implementation="eager")
    if kind == "gemma":
        return transformers.GemmaConfig(num_hidden_layers=3, num_key_value_heads=1, **common)
    if kind == "gemma-mha":
        return transformers.GemmaConfig(num_hidden_layers=2, num_key_value_heads=4, **common)
    if kind == "gemma2":
        return transformers.Gemma2Config(num_hidden_layers=4, num_key_value_heads=2,
                                         sliding_window=WINDOW, query_pre_attn_scalar=20,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=4.0,
                                         **common)
    if kind == "gemma3":
        layer_types = ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"]
        return transformers.Gemma3TextConfig(
            num_hidden_layers=7, num_key_value_heads=2, sliding_window=WINDOW,
            query_pre_attn_scalar=20, layer_types=layer_types,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0,
                                   "factor": 8.0}},
            **common)
    raise ValueError(kind)


KINDS = ["gemma", "gemma-mha", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=KINDS)
def hf_pair(request, tmp_path_factory):
    """(transformers model, our directory) for one architecture, with perturbed weights."""
    torch.manual_seed(1234)
    cfg = _hf_config(request.param)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Norm weights around 0 (scale is 1 + w), matrices with std 0.15: nothing trivial.
            std = 0.3 if "norm" in name else 0.15
            p.copy_(torch.randn_like(p) * std + (0.05 if "norm" in name else 0.0))
    hf.eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d, safe_serialization=True)
    return request.param, hf, d


def _tokens(seed: int = 0, batch: int = 2, seq: int = SEQ) -> np.ndarray:
    rng = np.random.RandomState(seed)
    t = rng.randint(3, VOCAB, size=(batch, seq)).astype(np.int32)
    t[:, 0] = 2  # BOS
    return t


def test_logits_match_transformers(hf_pair):
    kind, hf, d = hf_pair
    m = load_model(d, dtype="float32")
    assert m.config.family == {"gemma-mha": "gemma"}.get(kind, kind)
    toks = _tokens()
    with torch.no_grad():
        ref = hf(torch.from_numpy(toks).long()).logits.float().numpy()
    ours = m.logits(toks)
    assert ours.shape == (2, SEQ, VOCAB) and ours.dtype == np.float32
    delta = np.abs(ours - ref).max()
    assert delta <= 1e-4, f"{kind}: max |dlogit| = {delta:.3g}"
    # The comparison is not vacuous: logits vary a lot across positions and vocabulary.
    assert ref.std() > 0.3


def test_greedy_matches_transformers_generate(hf_pair):
    kind, hf, d = hf_pair
    m = load_model(d, dtype="float32")
    prompt = _tokens(seed=7, batch=1, seq=20)
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt).long(), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ref = out[0, prompt.shape[1]:].tolist()
    if 1 in ref:  # our generate stops at EOS (id 1); compare up to it
        ref = ref[: ref.index(1)]
    gen = m.generate([prompt[0].tolist()], max_new_tokens=32)[0]
    assert gen.tokens == ref, f"{kind}: greedy continuation differs"
    assert len(ref) >= 16  # prompt 20 + output > window 16: the ring buffer wrapped


def test_bfloat16_as_close_to_float32_as_transformers_bfloat16(hf_pair):
    """Our bf16 logits against HF float32, bounded by HF's own bf16-vs-float32 error."""
    kind, hf, d = hf_pair
    # 64 rows x 96 tokens (6 windows): argmax flips are near-ties, so the agreement counts
    # need thousands of positions to compare two bf16 implementations meaningfully.
    toks = torch.from_numpy(_tokens(seed=3, batch=64, seq=96)).long()
    with torch.no_grad():
        ref = hf(toks).logits.float().numpy()
        theirs = copy.deepcopy(hf).to(torch.bfloat16)(toks).logits.float().numpy()
    mb = load_model(d, dtype="bfloat16")
    assert str(mb.dtype) == "bfloat16"
    ours = mb.logits(toks.numpy())
    assert ours.dtype == np.float32 and np.isfinite(ours).all()

    def errors(x: np.ndarray) -> tuple[float, float, int]:  # max, RMS, argmax agreements
        dx = x - ref
        return (float(np.abs(dx).max()), float(np.sqrt((dx**2).mean())),
                int((x.argmax(-1) == ref.argmax(-1)).sum()))

    (o_max, o_rms, o_agree), (t_max, t_rms, t_agree) = errors(ours), errors(theirs)
    print(f"\n{kind} bf16 vs HF float32: ours max {o_max:.3f} RMS {o_rms:.4f} argmax "
          f"{o_agree}/{ref[..., 0].size}; HF bf16 max {t_max:.3f} RMS {t_rms:.4f} argmax "
          f"{t_agree}")
    assert t_rms > 1e-3  # HF's bf16 really differs from float32: the bound is not zero-width
    assert o_max <= 1.5 * t_max and o_rms <= 1.5 * t_rms, f"{kind}: bf16 error above 1.5x HF's"
    assert o_agree >= t_agree, f"{kind}: bf16 argmax agrees less often than HF's bf16"


# ---- bad inputs -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config("gemma3"))
    d = tmp_path_factory.mktemp("g3")
    hf.save_pretrained(d, safe_serialization=True)
    return d


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_wrong_model_type(gemma3_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(gemma3_dir, d)
    c = json.loads((d / "config.json").read_text())
    c["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_model(d)
    del c["model_type"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="no model_type"):
        load_model(d)


def test_wrong_tensor_shape(gemma3_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(gemma3_dir, d)
    c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "gate_proj.weight" in msg and "(96, 64)" in msg and "(100, 64)" in msg


def test_truncated_safetensors(gemma3_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(gemma3_dir, d)
    f = next(d.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_model(d)
    assert str(f) in str(e.value)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(d)


def test_unknown_source():
    with pytest.raises(CheckpointError, match="neither a preset"):
        load_model("no-such-model")


def test_gemma3_multimodal_text_tower(tmp_path):
    """A gemma3 (vision + text) checkpoint loads its text tower; logits match text-only use."""
    torch.manual_seed(5)
    text = _hf_config("gemma3").to_dict()
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                                    boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.15)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    toks = _tokens(seed=11, seq=40)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(toks).long()).logits.float().numpy()
    m = load_model(tmp_path, dtype="float32")
    assert m.config.family == "gemma3" and m.config.num_layers == 7
    assert np.abs(m.logits(toks) - ref).max() <= 1e-4
