"""Hugging Face Gemma checkpoints (config.json + *.safetensors): HF tensor names and layouts ->
our Gemma parameter tree, every shape checked.

Handles model_type gemma, gemma2, gemma3_text and the text tower of gemma3 (multimodal); the
config comes from `GemmaConfig.from_hf` (both config.json layouts, see checkpoints/configs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoints.safetensors_io import load_dir
from model.config import GemmaConfig
from model.errors import CheckpointError


def _find_prefix(tensors: dict[str, np.ndarray]) -> str:
    for prefix in ("model.", "model.language_model.", "language_model.model.", ""):
        if f"{prefix}embed_tokens.weight" in tensors:
            return prefix
    raise CheckpointError("no embed_tokens.weight tensor found: not a Gemma checkpoint")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: GemmaConfig, dtype: Any,
                   where: str = "checkpoint") -> dict[str, Any]:
    """Maps HF tensor names and layouts onto our parameter tree, checking every shape."""
    import jax.numpy as jnp

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
            "gate": get(m + "gate_proj.weight", (f, d)),  # [out, in], as our MLP reads them
            "up": get(m + "up_proj.weight", (f, d)),
            "down": get(m + "down_proj.weight", (d, f)),
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


def load_params(directory: Path, cfg: GemmaConfig, dtype: Any) -> dict[str, Any]:
    """Reads an HF Gemma 1/2/3 safetensors directory (sharded or not) into our param tree."""
    return params_from_hf(load_dir(directory), cfg, dtype, where=str(directory))
