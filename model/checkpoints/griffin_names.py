"""The one RecurrentGemma name table: our parameter -> (HF key, Flax/Orbax key, layouts).

Both readers (hf_griffin.py, orbax_griffin.py) use `stored_shapes` and `params_tree`; each entry
names the stored tensor in either format, its stored shape and how it becomes ours. HF stores Linear
weights [out, in] (we store [in, out], except the MLP's, kept [out, in]); the Flax tree stores
kernels [in, out] and stacks the GeGLU gate and up projections as `ffw_up` [2, D, F].
JAX-free (numpy only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np

from model.config import GriffinConfig
from model.errors import CheckpointError

Shape = Callable[[dict[str, int]], tuple[int, ...]]  # named sizes -> a stored shape
Fn = Callable[[np.ndarray, dict[str, int]], np.ndarray]  # stored array, sizes -> ours


def _same(a: np.ndarray, _: dict[str, int]) -> np.ndarray:
    return a


def _t(a: np.ndarray, _: dict[str, int]) -> np.ndarray:
    return a.T


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of ours and where each format keeps it (keys relative to the block)."""

    ours: str
    hf: str  # under "model.layers.{i}." (top-level entries: the full name)
    hf_shape: Shape
    orbax: str  # under "blocks.{i}/" (top-level entries: the full path)
    orbax_shape: Shape
    from_hf: Fn = _same
    from_orbax: Fn = _same


def _e(ours: str, hf: str, hf_shape: Shape, orbax: str, orbax_shape: Shape,
       from_hf: Fn = _same, from_orbax: Fn = _same) -> Entry:
    return Entry(ours, hf, hf_shape, orbax, orbax_shape, from_hf, from_orbax)


TOP: tuple[Entry, ...] = (
    _e("embed", "model.embed_tokens.weight", lambda s: (s["V"], s["D"]),
       "embedder/input_embedding", lambda s: (s["V"], s["D"])),
    _e("final_norm", "model.final_norm.weight", lambda s: (s["D"],),
       "final_norm/scale", lambda s: (s["D"],)),
)

_MLP, _UP = "mlp_block.", "mlp_block/ffw_up/"
COMMON: tuple[Entry, ...] = (  # every block: norms and the GeGLU MLP
    _e("temporal_norm", "temporal_pre_norm.weight", lambda s: (s["D"],),
       "temporal_pre_norm/scale", lambda s: (s["D"],)),
    _e("channel_norm", "channel_pre_norm.weight", lambda s: (s["D"],),
       "channel_pre_norm/scale", lambda s: (s["D"],)),
    _e("gate", _MLP + "gate_proj.weight", lambda s: (s["F"], s["D"]),
       _UP + "w", lambda s: (2, s["D"], s["F"]), from_orbax=lambda a, _: a[0].T),
    _e("gate_b", _MLP + "gate_proj.bias", lambda s: (s["F"],),
       _UP + "b", lambda s: (2, 1, 1, s["F"]), from_orbax=lambda a, _: a[0].reshape(-1)),
    _e("up", _MLP + "up_proj.weight", lambda s: (s["F"], s["D"]),
       _UP + "w", lambda s: (2, s["D"], s["F"]), from_orbax=lambda a, _: a[1].T),
    _e("up_b", _MLP + "up_proj.bias", lambda s: (s["F"],),
       _UP + "b", lambda s: (2, 1, 1, s["F"]), from_orbax=lambda a, _: a[1].reshape(-1)),
    _e("down", _MLP + "down_proj.weight", lambda s: (s["D"], s["F"]),
       "mlp_block/ffw_down/kernel", lambda s: (s["F"], s["D"]), from_orbax=_t),
    _e("down_b", _MLP + "down_proj.bias", lambda s: (s["D"],),
       "mlp_block/ffw_down/bias", lambda s: (s["D"],)),
)

_T, _R, _G = "temporal_block.", "recurrent_block/", "temporal_block.rg_lru."
RECURRENT: tuple[Entry, ...] = (  # the RG-LRU branch (L = lru_width, N gate blocks of I)
    *(e for nm in ("linear_x", "linear_y") for e in (
        _e(nm, f"{_T}{nm}.weight", lambda s: (s["L"], s["D"]),
           f"{_R}{nm}/kernel", lambda s: (s["D"], s["L"]), _t),
        _e(nm + "_b", f"{_T}{nm}.bias", lambda s: (s["L"],),
           f"{_R}{nm}/bias", lambda s: (s["L"],)))),
    _e("linear_out", _T + "linear_out.weight", lambda s: (s["D"], s["L"]),
       _R + "linear_out/kernel", lambda s: (s["L"], s["D"]), _t),
    _e("linear_out_b", _T + "linear_out.bias", lambda s: (s["D"],),
       _R + "linear_out/bias", lambda s: (s["D"],)),
    _e("conv_w", _T + "conv_1d.weight", lambda s: (s["L"], 1, s["W"]),  # HF [L, 1, W]
       _R + "conv_1d/w", lambda s: (s["W"], s["L"]), lambda a, _: a[:, 0, :].T),  # ours [W, L]
    _e("conv_b", _T + "conv_1d.bias", lambda s: (s["L"],),
       _R + "conv_1d/b", lambda s: (s["L"],)),
    _e("input_gate", _G + "input_gate_weight", lambda s: (s["N"], s["I"], s["I"]),
       _R + "rg_lru/input_gate/w", lambda s: (s["N"], s["I"], s["I"])),
    _e("input_gate_b", _G + "input_gate_bias", lambda s: (s["N"], s["I"]),
       _R + "rg_lru/input_gate/b", lambda s: (s["N"], s["I"])),
    _e("a_gate", _G + "recurrent_gate_weight", lambda s: (s["N"], s["I"], s["I"]),
       _R + "rg_lru/a_gate/w", lambda s: (s["N"], s["I"], s["I"])),
    _e("a_gate_b", _G + "recurrent_gate_bias", lambda s: (s["N"], s["I"]),
       _R + "rg_lru/a_gate/b", lambda s: (s["N"], s["I"])),
    _e("a_param", _G + "recurrent_param", lambda s: (s["L"],),
       _R + "rg_lru/a_param", lambda s: (s["L"],)),
)

_A = "attention_block/"
ATTENTION: tuple[Entry, ...] = (  # local MQA: H query heads, K key/value heads of Dh
    _e("q", _T + "q_proj.weight", lambda s: (s["H"] * s["Dh"], s["D"]),
       _A + "proj_q/kernel", lambda s: (s["D"], s["H"] * s["Dh"]),
       lambda a, s: a.T.reshape(s["D"], s["H"], s["Dh"]),  # [H*Dh, D] -> [D, H, Dh]
       lambda a, s: a.reshape(s["D"], s["H"], s["Dh"])),
    *(_e(nm, f"{_T}{nm}_proj.weight", lambda s: (s["K"] * s["Dh"], s["D"]),
         f"{_A}proj_{nm}/kernel", lambda s: (s["D"], s["K"] * s["Dh"]),
         lambda a, s: a.T.reshape(s["D"], s["K"], s["Dh"]),  # [K*Dh, D] -> [D, K, Dh]
         lambda a, s: a.reshape(s["D"], s["K"], s["Dh"])) for nm in ("k", "v")),
    _e("o", _T + "o_proj.weight", lambda s: (s["D"], s["H"] * s["Dh"]),
       _A + "proj_final/kernel", lambda s: (s["H"] * s["Dh"], s["D"]),
       lambda a, s: a.T.reshape(s["H"], s["Dh"], s["D"]),  # [D, H*Dh] -> [H, Dh, D]
       lambda a, s: a.reshape(s["H"], s["Dh"], s["D"])),
    _e("o_b", _T + "o_proj.bias", lambda s: (s["D"],),
       _A + "proj_final/bias", lambda s: (s["D"],)),
)


def sizes(cfg: GriffinConfig) -> dict[str, int]:
    """The named sizes the table's shapes use."""
    return {"V": cfg.vocab_size, "D": cfg.d_model, "L": cfg.lru_width, "F": cfg.ffw_dim,
            "H": cfg.num_heads, "K": cfg.num_kv_heads, "Dh": cfg.head_dim,
            "W": cfg.conv1d_width, "N": cfg.num_heads, "I": cfg.lru_width // cfg.num_heads}


def layer_entries(kind: str) -> tuple[Entry, ...]:
    """The entries of one block of `kind` ("recurrent" or "attention")."""
    return COMMON + (RECURRENT if kind == "recurrent" else ATTENTION)


Format = Literal["hf", "orbax"]


def _key(fmt: Format, i: int | None, e: Entry) -> str:
    """The stored name of entry `e` of block `i` (None: a top-level entry) in format `fmt`."""
    rel = e.hf if fmt == "hf" else e.orbax
    if i is None:
        return rel
    return f"model.layers.{i}.{rel}" if fmt == "hf" else f"blocks.{i}/{rel}"


def stored_shapes(cfg: GriffinConfig, fmt: Format) -> dict[str, tuple[int, ...]]:
    """Stored name -> shape of every tensor a `fmt` checkpoint of `cfg` must hold."""
    s = sizes(cfg)

    def shape(e: Entry) -> tuple[int, ...]:
        return e.hf_shape(s) if fmt == "hf" else e.orbax_shape(s)

    out = {_key(fmt, None, e): shape(e) for e in TOP}
    for i, kind in enumerate(cfg.block_types):
        out.update({_key(fmt, i, e): shape(e) for e in layer_entries(kind)})
    return out


def params_tree(cfg: GriffinConfig, fmt: Format, read: Callable[[str], np.ndarray],
                to_array: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    """Our parameter tree (model/griffin.py): each tensor is `read(stored name)`, put in our
    layout, then `to_array` (e.g. a jax array of the parameter dtype)."""
    s = sizes(cfg)

    def get(i: int | None, e: Entry) -> Any:
        ours = e.from_hf if fmt == "hf" else e.from_orbax
        return to_array(ours(read(_key(fmt, i, e)), s))

    layers = [{e.ours: get(i, e) for e in layer_entries(kind)}
              for i, kind in enumerate(cfg.block_types)]
    return {**{e.ours: get(None, e) for e in TOP}, "layers": layers}


def flax_get(tree: Mapping[str, Any], keys: str, path: Path) -> np.ndarray:
    """The array at "a/b/c" of a nested Flax tree; a missing key is a CheckpointError."""
    node: Any = tree
    for k in keys.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise CheckpointError(f"{path}: parameter {keys} is missing; the checkpoint is "
                                  "incomplete or not a RecurrentGemma Flax checkpoint")
        node = node[k]
    return np.asarray(node)
