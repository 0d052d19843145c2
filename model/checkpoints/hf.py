"""Hugging Face Gemma checkpoints (config.json + *.safetensors) -> GemmaConfig + params.

Handles model_type gemma, gemma2, gemma3_text and the text tower of gemma3 (multimodal), in both
the older config layout (rope_theta / rope_local_base_freq / rope_scaling) and the newer one
(rope_parameters per layer type, layer_types).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from model.checkpoints.safetensors_io import load_dir
from model.config import GemmaConfig, gemma2_layer_types, gemma3_layer_types
from model.errors import CheckpointError

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{directory}: no config.json; point --model at a Hugging Face checkpoint directory, "
            "a .gguf file or a preset name")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _rope(c: dict[str, Any], kind: str) -> tuple[float, float]:
    """(base, linear scale) for layer kind "full_attention" or "sliding_attention"."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and kind in params:
        p = params[kind] or {}
    elif isinstance(params, dict) and "rope_theta" in params:
        p = params
    else:
        p = {"rope_theta": c.get("rope_theta", 10_000.0)}
        if kind == "sliding_attention" and "rope_local_base_freq" in c:
            p = {"rope_theta": c["rope_local_base_freq"]}
        elif kind == "full_attention" and c.get("rope_scaling"):
            p = {**p, **c["rope_scaling"]}
    base = float(p.get("rope_theta", 10_000.0))
    rtype = p.get("rope_type", p.get("type", "default"))
    if rtype not in ("default", "linear", None):
        raise CheckpointError(f"config.json: RoPE type {rtype!r} is not supported (linear only)")
    scale = float(p.get("factor", 1.0)) if rtype == "linear" else 1.0
    return base, scale


def config_from_hf(c: dict[str, Any]) -> GemmaConfig:
    """Maps an HF Gemma config dict onto GemmaConfig."""
    mt = c.get("model_type")
    if mt == "gemma3":
        c = {**c.get("text_config", {}), "model_type": "gemma3_text"}
        mt = "gemma3_text"
    family = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}[mt]
    n = int(c["num_hidden_layers"])
    if "layer_types" in c and c["layer_types"]:
        types = tuple("local" if t == "sliding_attention" else "global" for t in c["layer_types"])
    elif family == "gemma2":
        types = gemma2_layer_types(n)
    elif family == "gemma3":
        types = gemma3_layer_types(n, int(c.get("sliding_window_pattern",
                                                c.get("_sliding_window_pattern", 6))))
    else:
        types = ("global",) * n
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
        raise CheckpointError(f"config.json: activation {act!r} is not Gemma's GeGLU")
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    base_g, scale_g = _rope(c, "full_attention")
    base_l, _ = _rope(c, "sliding_attention")
    eos = c.get("eos_token_id", 1)
    return GemmaConfig(
        family=family,
        vocab_size=int(c["vocab_size"]),
        d_model=int(c["hidden_size"]),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffw_dim=int(c["intermediate_size"]),
        layer_types=types,
        sliding_window=c.get("sliding_window") if "local" in types else None,
        rope_base_global=base_g,
        rope_base_local=base_l if family == "gemma3" else base_g,
        rope_scale_global=scale_g,
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or head_dim),
        attn_softcap=c.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_softcap=c.get("final_logit_softcapping") if family != "gemma" else None,
        post_norms=family != "gemma",
        qk_norm=family == "gemma3",
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(c.get("max_position_embeddings", 8192)),
        bos_id=int(c.get("bos_token_id", 2) or 2),
        eos_id=int(eos[0] if isinstance(eos, list) else eos or 1),
        pad_id=int(c.get("pad_token_id", 0) or 0),
        end_of_turn_id=106 if family == "gemma3" else 107,
    )


def _find_prefix(tensors: dict[str, np.ndarray]) -> str:
    for prefix in ("model.", "model.language_model.", "language_model.model.", ""):
        if f"{prefix}embed_tokens.weight" in tensors:
            return prefix
    raise CheckpointError("no embed_tokens.weight tensor found: not a Gemma checkpoint")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: GemmaConfig, dtype: Any,
                   where: str = "checkpoint") -> dict[str, Any]:
    """Maps HF tensor names and layouts onto our parameter tree, checking every shape."""
    p = _find_prefix(tensors)
    d, h, k, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = p + name
        if full not in tensors:
            raise CheckpointError(f"{where}: tensor {full} is missing")
        t = tensors[full]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {full} has shape {tuple(t.shape)}, expected {shape} "
                "(config.json and weights disagree)")
        return np.asarray(t, dtype=np.float32)

    def arr(x: np.ndarray):
        return jnp.asarray(x, dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        layer = {
            "attn_norm": get(f"layers.{i}.input_layernorm.weight", (d,)),
            "q": get(a + "q_proj.weight", (h * dh, d)).reshape(h, dh, d).transpose(2, 0, 1),
            "k": get(a + "k_proj.weight", (k * dh, d)).reshape(k, dh, d).transpose(2, 0, 1),
            "v": get(a + "v_proj.weight", (k * dh, d)).reshape(k, dh, d).transpose(2, 0, 1),
            "o": get(a + "o_proj.weight", (d, h * dh)).reshape(d, h, dh).transpose(1, 2, 0),
            "gate": get(m + "gate_proj.weight", (f, d)).T,
            "up": get(m + "up_proj.weight", (f, d)).T,
            "down": get(m + "down_proj.weight", (d, f)).T,
        }
        if cfg.post_norms:
            layer["post_attn_norm"] = get(f"layers.{i}.post_attention_layernorm.weight", (d,))
            layer["ffw_norm"] = get(f"layers.{i}.pre_feedforward_layernorm.weight", (d,))
            layer["post_ffw_norm"] = get(f"layers.{i}.post_feedforward_layernorm.weight", (d,))
        else:  # Gemma 1 calls its pre-MLP norm "post_attention_layernorm"
            layer["ffw_norm"] = get(f"layers.{i}.post_attention_layernorm.weight", (d,))
        if cfg.qk_norm:
            layer["q_norm"] = get(a + "q_norm.weight", (dh,))
            layer["k_norm"] = get(a + "k_norm.weight", (dh,))
        layers.append({name: arr(x) for name, x in layer.items()})
    return {
        "embed": arr(get("embed_tokens.weight", (cfg.vocab_size, d))),
        "final_norm": arr(get("norm.weight", (d,))),
        "layers": layers,
    }


def load_hf_gemma(directory: Path, dtype: Any) -> tuple[GemmaConfig, dict[str, Any]]:
    """Loads an HF Gemma 1/2/3 directory."""
    c = read_config_json(directory)
    mt = c.get("model_type")
    if mt not in GEMMA_TYPES:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type {mt!r} is not a Gemma transformer "
            f"(expected one of {', '.join(GEMMA_TYPES)})")
    try:
        cfg = config_from_hf(c)
    except KeyError as e:
        raise CheckpointError(f"{directory / 'config.json'}: missing field {e}") from None
    tensors = load_dir(directory)
    return cfg, params_from_hf(tensors, cfg, dtype, where=str(directory))
