"""RecurrentGemma Flax/Orbax checkpoints (google-deepmind `recurrentgemma` layout, e.g. Kaggle).

The tree (optionally under a top-level "params" key), with the names the `recurrentgemma`
package gives its Flax modules:
  embedder/input_embedding [V, D]; final_norm/scale [D]
  blocks.{i}/temporal_pre_norm/scale, channel_pre_norm/scale [D]
  blocks.{i}/mlp_block/ffw_up/w [2, D, F] (0: GeLU branch, 1: linear branch),
    ffw_up/b [2, 1, 1, F], ffw_down/kernel [F, D], ffw_down/bias [D]
  blocks.{i}/recurrent_block/linear_{x,y}/kernel [D, L], bias [L]; linear_out/kernel [L, D], bias;
    conv_1d/w [W, L] (w[W-1] multiplies the current step), conv_1d/b [L];
    rg_lru/a_param [L], rg_lru/{input_gate,a_gate}/w [N, I, I], b [N, I]
  blocks.{i}/attention_block/proj_q/kernel [D, H*Dh], proj_k/kernel, proj_v/kernel [D, Dh],
    proj_final/kernel [H*Dh, D], proj_final/bias [D]

Sizes are inferred from the shapes. The attention window, soft-cap and RoPE base are not stored
in the checkpoint: they come from the matching preset (recurrentgemma-2b / -9b) or the defaults
(2048, 30.0, 10000), unless given. Note that the `recurrentgemma` package lets a query see
`attention_window_size + 1` keys while transformers (and we) see `attention_window`; pass
`attention_window=2049` to reproduce the package exactly past 2048 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from model.config import PRESETS, GriffinConfig
from model.errors import CheckpointError


def restore_tree(path: str | Path) -> dict[str, Any]:
    """Reads an Orbax PyTree checkpoint into a nested dict of host numpy arrays."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    ckp = ocp.PyTreeCheckpointer()
    try:
        md = ckp.metadata(path)
        md = getattr(md, "item_metadata", md)  # newer orbax wraps the tree in step metadata
        md = getattr(md, "tree", md)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(md))
        tree = ckp.restore(path, restore_args=args)
    except Exception as e:  # orbax raises many types; report one line naming the path
        raise CheckpointError(f"{path}: cannot read it as an Orbax checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return jax.tree.map(np.asarray, tree)


def _get(tree: Mapping[str, Any], keys: str, path: Path) -> np.ndarray:
    node: Any = tree
    for k in keys.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise CheckpointError(f"{path}: parameter {keys} is missing; the checkpoint is "
                                  "incomplete or not a RecurrentGemma Flax checkpoint")
        node = node[k]
    return np.asarray(node)


def _period(kinds: list[str]) -> tuple[str, ...]:
    """The shortest pattern whose repetition gives `kinds`."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return tuple(kinds[:p])
    return tuple(kinds)


def config_from_tree(tree: Mapping[str, Any], path: Path = Path("."),
                     attention_window: int | None = None) -> GriffinConfig:
    """Infers a GriffinConfig from the parameter shapes (+ preset values for the rest)."""
    vocab, d = _get(tree, "embedder/input_embedding", path).shape
    ids = sorted(int(k.split(".", 1)[1]) for k in tree
                 if k.startswith("blocks.") and k.split(".", 1)[1].isdigit())
    n_blocks = ids[-1] + 1 if ids else 0
    kinds: list[str] = []
    lru = heads = head_dim = conv_w = ffw = None
    for i in range(n_blocks):
        name = f"blocks.{i}"
        if name not in tree:
            raise CheckpointError(f"{path}: block {name} is missing (the checkpoint has "
                                  f"blocks up to blocks.{n_blocks - 1}); it is incomplete")
        blk = tree[name]
        if "recurrent_block" in blk:
            kinds.append("recurrent")
            if lru is None:  # sizes from the first block of a kind; the rest are checked
                n, iw, _ = _get(tree, f"{name}/recurrent_block/rg_lru/a_gate/w", path).shape
                lru, heads = n * iw, n
                conv_w = _get(tree, f"{name}/recurrent_block/conv_1d/w", path).shape[0]
        elif "attention_block" in blk:
            kinds.append("attention")
            if head_dim is None:
                head_dim = _get(tree, f"{name}/attention_block/proj_k/kernel", path).shape[1]
        else:
            raise CheckpointError(f"{path}: {name} has neither recurrent_block nor "
                                  f"attention_block (keys: {sorted(blk)})")
        if ffw is None:
            ffw = _get(tree, f"{name}/mlp_block/ffw_up/w", path).shape[-1]
    if not kinds:
        raise CheckpointError(f"{path}: no blocks.N entries; not a RecurrentGemma checkpoint")
    if heads is None:  # attention-only: heads from the query width
        heads = d // head_dim
    if head_dim is None:  # recurrent-only (Hawk)
        head_dim = d // heads
    preset = next((c for c in PRESETS.values() if isinstance(c, GriffinConfig)
                   and (c.d_model, c.vocab_size) == (d, vocab)), None)
    if preset is not None and preset.num_layers != len(kinds):
        raise CheckpointError(
            f"{path}: {len(kinds)} blocks, but a RecurrentGemma of width {d} has "
            f"{preset.num_layers}; blocks are missing (the checkpoint is incomplete)")
    window = attention_window or (preset.attention_window if preset else 2048)
    return GriffinConfig(
        vocab_size=int(vocab), d_model=int(d), num_layers=len(kinds), lru_width=int(lru or d),
        num_heads=int(heads), num_kv_heads=1, head_dim=int(head_dim), ffw_dim=int(ffw),
        attention_window=int(window), conv1d_width=int(conv_w or 4),
        block_pattern=_period(kinds),
        final_softcap=preset.final_softcap if preset else 30.0,
        rope_base=preset.rope_base if preset else 10_000.0,
        end_of_turn_id=107 if vocab == 256_000 else None,
    )


def _expected(cfg: GriffinConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter path -> shape for `cfg`."""
    d, lw, f, h, dh = cfg.d_model, cfg.lru_width, cfg.ffw_dim, cfg.num_heads, cfg.head_dim
    n, iw = cfg.num_heads, cfg.lru_width // cfg.num_heads
    out = {"embedder/input_embedding": (cfg.vocab_size, d), "final_norm/scale": (d,)}
    for i, kind in enumerate(cfg.block_types):
        b = f"blocks.{i}/"
        out.update({
            b + "temporal_pre_norm/scale": (d,), b + "channel_pre_norm/scale": (d,),
            b + "mlp_block/ffw_up/w": (2, d, f), b + "mlp_block/ffw_up/b": (2, 1, 1, f),
            b + "mlp_block/ffw_down/kernel": (f, d), b + "mlp_block/ffw_down/bias": (d,),
        })
        if kind == "recurrent":
            r = b + "recurrent_block/"
            out.update({
                r + "linear_x/kernel": (d, lw), r + "linear_x/bias": (lw,),
                r + "linear_y/kernel": (d, lw), r + "linear_y/bias": (lw,),
                r + "linear_out/kernel": (lw, d), r + "linear_out/bias": (d,),
                r + "conv_1d/w": (cfg.conv1d_width, lw), r + "conv_1d/b": (lw,),
                r + "rg_lru/a_param": (lw,),
                r + "rg_lru/input_gate/w": (n, iw, iw), r + "rg_lru/input_gate/b": (n, iw),
                r + "rg_lru/a_gate/w": (n, iw, iw), r + "rg_lru/a_gate/b": (n, iw),
            })
        else:
            a = b + "attention_block/"
            out.update({
                a + "proj_q/kernel": (d, h * dh), a + "proj_k/kernel": (d, dh),
                a + "proj_v/kernel": (d, dh), a + "proj_final/kernel": (h * dh, d),
                a + "proj_final/bias": (d,),
            })
    return out


def params_from_tree(tree: Mapping[str, Any], cfg: GriffinConfig, dtype: Any = jnp.float32,
                     path: Path = Path(".")) -> dict:
    """Maps a recurrentgemma Flax parameter tree onto `model.griffin`'s tree, checking shapes."""
    if "params" in tree and "embedder" not in tree:
        tree = tree["params"]
    for name, shape in _expected(cfg).items():
        found = tuple(_get(tree, name, path).shape)
        if found != shape:
            raise CheckpointError(
                f"{path}: parameter {name} has shape {found}, expected {shape} "
                f"(inconsistent widths/heads/conv width across blocks?)")
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim

    def get(name: str, fn=lambda a: a) -> jax.Array:
        return jnp.asarray(fn(_get(tree, name, path)), dtype=dtype)

    layers = []
    for i, kind in enumerate(cfg.block_types):
        b = f"blocks.{i}/"
        m = b + "mlp_block/"
        p = {
            "temporal_norm": get(b + "temporal_pre_norm/scale"),
            "channel_norm": get(b + "channel_pre_norm/scale"),
            "gate": get(m + "ffw_up/w", lambda a: a[0]), "up": get(m + "ffw_up/w", lambda a: a[1]),
            "gate_b": get(m + "ffw_up/b", lambda a: a[0].reshape(-1)),
            "up_b": get(m + "ffw_up/b", lambda a: a[1].reshape(-1)),
            "down": get(m + "ffw_down/kernel"), "down_b": get(m + "ffw_down/bias"),
        }
        if kind == "recurrent":
            r = b + "recurrent_block/"
            p.update({
                "linear_x": get(r + "linear_x/kernel"), "linear_x_b": get(r + "linear_x/bias"),
                "linear_y": get(r + "linear_y/kernel"), "linear_y_b": get(r + "linear_y/bias"),
                "linear_out": get(r + "linear_out/kernel"),
                "linear_out_b": get(r + "linear_out/bias"),
                "conv_w": get(r + "conv_1d/w"), "conv_b": get(r + "conv_1d/b"),
                "input_gate": get(r + "rg_lru/input_gate/w"),
                "input_gate_b": get(r + "rg_lru/input_gate/b"),
                "a_gate": get(r + "rg_lru/a_gate/w"), "a_gate_b": get(r + "rg_lru/a_gate/b"),
                "a_param": get(r + "rg_lru/a_param"),
            })
        else:
            a = b + "attention_block/"
            p.update({
                "q": get(a + "proj_q/kernel", lambda x: x.reshape(d, h, dh)),
                "k": get(a + "proj_k/kernel", lambda x: x.reshape(d, 1, dh)),
                "v": get(a + "proj_v/kernel", lambda x: x.reshape(d, 1, dh)),
                "o": get(a + "proj_final/kernel", lambda x: x.reshape(h, dh, d)),
                "o_b": get(a + "proj_final/bias"),
            })
        layers.append(p)
    return {"embed": get("embedder/input_embedding"), "final_norm": get("final_norm/scale"),
            "layers": layers}


def load(path: str | Path, dtype: Any = jnp.float32,
         attention_window: int | None = None) -> tuple[GriffinConfig, dict]:
    """Loads a recurrentgemma Flax/Orbax checkpoint directory.

    Args:
      path: the Orbax checkpoint directory.
      dtype: parameter dtype.
      attention_window: override the window (default: the matching preset's, else 2048).
    Returns:
      (config inferred from the shapes, parameter tree of `model.griffin`).
    """
    path = Path(path)
    tree = restore_tree(path)
    if "params" in tree and "embedder" not in tree:
        tree = tree["params"]
    cfg = config_from_tree(tree, path, attention_window)
    return cfg, params_from_tree(tree, cfg, dtype, path)
