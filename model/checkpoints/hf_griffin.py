"""Hugging Face `recurrent_gemma` checkpoints (config.json + safetensors) -> GriffinConfig + params.

Name and layout map (HF stores Linear weights as [out, in]; we store [in, out]):
  model.embed_tokens.weight [V, D]                         -> embed
  model.final_norm.weight [D]                               -> final_norm
  model.layers.{i}.temporal_pre_norm.weight / channel_pre_norm.weight -> temporal_norm / channel_norm
  model.layers.{i}.mlp_block.{gate,up,down}_proj.{weight,bias}        -> gate, up, down (+ _b)
  recurrent: temporal_block.linear_{x,y,out}.{weight,bias}, conv_1d.weight [L, 1, W] -> conv_w [W, L],
    conv_1d.bias, rg_lru.{input_gate,recurrent_gate}_{weight,bias} -> input_gate, a_gate (+ _b),
    rg_lru.recurrent_param -> a_param
  attention: temporal_block.{q,k,v}_proj.weight [N*Dh, D] -> q/k/v [D, N, Dh],
    o_proj.weight [D, H*Dh] -> o [H, Dh, D], o_proj.bias -> o_b
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from model.checkpoints.safetensors_io import load_dir
from model.config import GriffinConfig
from model.errors import CheckpointError

_IGNORED = ("lm_head.weight",)  # tied to the embedding


def _field(c: dict[str, Any], name: str, where: str) -> Any:
    if name not in c or c[name] is None:
        raise CheckpointError(f"{where}: recurrent_gemma config has no {name!r} field")
    return c[name]


def config_from_hf(config_json: dict[str, Any], where: str = "config.json") -> GriffinConfig:
    """Builds a GriffinConfig from a transformers `recurrent_gemma` config.json dict."""
    c = config_json
    if c.get("model_type", "recurrent_gemma") != "recurrent_gemma":
        raise CheckpointError(
            f"{where}: model_type is {c.get('model_type')!r}, expected 'recurrent_gemma'")
    d = int(_field(c, "hidden_size", where))
    heads = int(_field(c, "num_attention_heads", where))
    if d % heads:
        raise CheckpointError(f"{where}: hidden_size {d} is not a multiple of "
                              f"num_attention_heads {heads}")
    act = c.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
        raise CheckpointError(f"{where}: hidden_activation {act!r} is not supported "
                              "(RecurrentGemma uses gelu_pytorch_tanh)")
    rope = c.get("rope_parameters") or {}
    partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    if float(partial) != 0.5:
        raise CheckpointError(f"{where}: partial_rotary_factor {partial} is not supported "
                              "(RecurrentGemma rotates half of each head)")
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{where}: rope_type {rope.get('rope_type')!r} is not supported")
    if c.get("attention_bias"):
        raise CheckpointError(f"{where}: attention_bias=true is not supported "
                              "(RecurrentGemma's q/k/v projections have no bias)")
    blocks = tuple(c.get("block_types") or ("recurrent", "recurrent", "attention"))
    bad = [b for b in blocks if b not in ("recurrent", "attention")]
    if bad:
        raise CheckpointError(f"{where}: unknown block_types {bad}; expected 'recurrent' or "
                              "'attention'")
    eos = c.get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, list) else eos
    vocab = int(_field(c, "vocab_size", where))
    cap = c.get("logits_soft_cap", 30.0)
    return GriffinConfig(
        vocab_size=vocab,
        d_model=d,
        num_layers=int(_field(c, "num_hidden_layers", where)),
        lru_width=int(c.get("lru_width") or d),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=d // heads,  # transformers derives it so, whatever config.json says
        ffw_dim=int(_field(c, "intermediate_size", where)) // 2,  # HF halves it per branch
        attention_window=int(c.get("attention_window_size", 2048)),
        conv1d_width=int(c.get("conv1d_width", 4)),
        block_pattern=blocks,
        final_softcap=float(cap) if cap else None,
        rope_base=float(c.get("rope_theta", rope.get("rope_theta", 10_000.0))),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        bos_id=int(c.get("bos_token_id", 2) if c.get("bos_token_id") is not None else 2),
        eos_id=int(eos if eos is not None else 1),
        pad_id=int(c.get("pad_token_id", 0) if c.get("pad_token_id") is not None else 0),
        end_of_turn_id=107 if vocab == 256_000 else None,
    )


def _expected(cfg: GriffinConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor the checkpoint must hold."""
    d, lw, f, h, k, dh = (cfg.d_model, cfg.lru_width, cfg.ffw_dim, cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim)
    n, iw = cfg.num_heads, cfg.lru_width // cfg.num_heads
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.final_norm.weight": (d,)}
    for i, kind in enumerate(cfg.block_types):
        pre = f"model.layers.{i}."
        out.update({
            pre + "temporal_pre_norm.weight": (d,), pre + "channel_pre_norm.weight": (d,),
            pre + "mlp_block.gate_proj.weight": (f, d), pre + "mlp_block.gate_proj.bias": (f,),
            pre + "mlp_block.up_proj.weight": (f, d), pre + "mlp_block.up_proj.bias": (f,),
            pre + "mlp_block.down_proj.weight": (d, f), pre + "mlp_block.down_proj.bias": (d,),
        })
        tb = pre + "temporal_block."
        if kind == "recurrent":
            out.update({
                tb + "linear_x.weight": (lw, d), tb + "linear_x.bias": (lw,),
                tb + "linear_y.weight": (lw, d), tb + "linear_y.bias": (lw,),
                tb + "linear_out.weight": (d, lw), tb + "linear_out.bias": (d,),
                tb + "conv_1d.weight": (lw, 1, cfg.conv1d_width), tb + "conv_1d.bias": (lw,),
                tb + "rg_lru.recurrent_param": (lw,),
                tb + "rg_lru.input_gate_weight": (n, iw, iw), tb + "rg_lru.input_gate_bias": (n, iw),
                tb + "rg_lru.recurrent_gate_weight": (n, iw, iw),
                tb + "rg_lru.recurrent_gate_bias": (n, iw),
            })
        else:
            out.update({
                tb + "q_proj.weight": (h * dh, d), tb + "k_proj.weight": (k * dh, d),
                tb + "v_proj.weight": (k * dh, d), tb + "o_proj.weight": (d, h * dh),
                tb + "o_proj.bias": (d,),
            })
    return out


def check_config(directory: Path, cfg: GriffinConfig) -> None:
    """Refuses a config that disagrees with the directory's config.json (window, widths...)."""
    path = directory / "config.json"
    if not path.exists():
        return
    try:
        theirs = config_from_hf(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for name in ("attention_window", "conv1d_width", "d_model", "lru_width", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "ffw_dim", "vocab_size",
                 "block_pattern"):
        a, b = getattr(theirs, name), getattr(cfg, name)
        if name == "block_pattern":
            a, b = theirs.block_types, cfg.block_types
        if a != b:
            raise CheckpointError(
                f"{path}: {name} mismatch: the checkpoint has {a}, the requested config has "
                f"{b}; load it with the checkpoint's own config (config_from_hf)")


def load_params(directory: str | Path, cfg: GriffinConfig, dtype: Any = jnp.float32) -> dict:
    """Reads a `recurrent_gemma` safetensors directory (sharded or not) into our param tree.

    Args:
      directory: the checkpoint directory.
      cfg: the model config (normally `config_from_hf` of its config.json).
      dtype: parameter dtype.
    Returns:
      The parameter tree of `model.griffin` (see its module docstring).
    Raises:
      CheckpointError: a tensor is missing, unexpected or mis-shaped, or cfg disagrees with
        the directory's config.json.
    """
    directory = Path(directory)
    check_config(directory, cfg)
    tensors = load_dir(directory)
    expected = _expected(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{directory}: tensor {missing[0]} is missing{more}; the config expects "
            f"{cfg.num_layers} blocks {cfg.block_types}; the checkpoint is incomplete or "
            "its config.json does not match it")
    extra = sorted(n for n in tensors if n not in expected and n not in _IGNORED
                   and not n.endswith("inv_freq"))
    if extra:
        raise CheckpointError(
            f"{directory}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all); "
            f"the config's block types {cfg.block_types} do not match the checkpoint")
    for name, shape in expected.items():
        found = tuple(tensors[name].shape)
        if found != shape:
            raise CheckpointError(
                f"{directory}: tensor {name} has shape {found}, expected {shape} for this "
                "config (a width/window/head mismatch between config.json and the weights)")

    def get(name: str, fn=lambda a: a) -> Any:
        return jnp.asarray(fn(np.asarray(tensors[name])), dtype=dtype)

    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = []
    for i, kind in enumerate(cfg.block_types):
        pre = f"model.layers.{i}."
        mlp = pre + "mlp_block."
        p = {
            "temporal_norm": get(pre + "temporal_pre_norm.weight"),
            "channel_norm": get(pre + "channel_pre_norm.weight"),
            "gate": get(mlp + "gate_proj.weight", np.transpose),
            "gate_b": get(mlp + "gate_proj.bias"),
            "up": get(mlp + "up_proj.weight", np.transpose), "up_b": get(mlp + "up_proj.bias"),
            "down": get(mlp + "down_proj.weight", np.transpose),
            "down_b": get(mlp + "down_proj.bias"),
        }
        tb = pre + "temporal_block."
        if kind == "recurrent":
            p.update({
                "linear_x": get(tb + "linear_x.weight", np.transpose),
                "linear_x_b": get(tb + "linear_x.bias"),
                "linear_y": get(tb + "linear_y.weight", np.transpose),
                "linear_y_b": get(tb + "linear_y.bias"),
                "linear_out": get(tb + "linear_out.weight", np.transpose),
                "linear_out_b": get(tb + "linear_out.bias"),
                "conv_w": get(tb + "conv_1d.weight", lambda a: a[:, 0, :].T),  # [W, L]
                "conv_b": get(tb + "conv_1d.bias"),
                "input_gate": get(tb + "rg_lru.input_gate_weight"),
                "input_gate_b": get(tb + "rg_lru.input_gate_bias"),
                "a_gate": get(tb + "rg_lru.recurrent_gate_weight"),
                "a_gate_b": get(tb + "rg_lru.recurrent_gate_bias"),
                "a_param": get(tb + "rg_lru.recurrent_param"),
            })
        else:
            p.update({
                "q": get(tb + "q_proj.weight", lambda a: a.T.reshape(d, h, dh)),
                "k": get(tb + "k_proj.weight", lambda a: a.T.reshape(d, k, dh)),
                "v": get(tb + "v_proj.weight", lambda a: a.T.reshape(d, k, dh)),
                "o": get(tb + "o_proj.weight", lambda a: a.T.reshape(h, dh, d)),
                "o_b": get(tb + "o_proj.bias"),
            })
        layers.append(p)
    return {"embed": get("model.embed_tokens.weight"),
            "final_norm": get("model.final_norm.weight"), "layers": layers}
