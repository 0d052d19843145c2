"""RecurrentGemma Flax/Orbax checkpoints (google-deepmind `recurrentgemma` layout, e.g. Kaggle).

The tree (optionally under a top-level "params" key) uses the names the `recurrentgemma` package
gives its Flax modules: `embedder/input_embedding` [V, D], `final_norm/scale` [D], and per block
`blocks.{i}/...` as listed in the shared table of griffin_names.py (Flax column), e.g.
`mlp_block/ffw_up/w` [2, D, F] (0: GeLU branch, 1: linear branch), `recurrent_block/conv_1d/w`
[W, L] (w[W-1] multiplies the current step), `attention_block/proj_q/kernel` [D, H*Dh].

Sizes are inferred from the shapes (`GriffinConfig.from_flax_params`). The attention window,
soft-cap and RoPE base are not stored in the checkpoint: they come from the matching preset
(recurrentgemma-2b / -9b) or the defaults (2048, 30.0, 10000), unless given. Note that the
`recurrentgemma` package lets a query see `attention_window_size + 1` keys while transformers
(and we) see `attention_window`; pass `attention_window=2049` to reproduce the package exactly
past 2048 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from model.checkpoints import griffin_names as names
from model.config import GriffinConfig
from model.errors import CheckpointError


def restore_tree(path: str | Path) -> dict[str, Any]:
    """Reads an Orbax PyTree checkpoint into a nested dict of host numpy arrays."""
    import jax
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


def _expected(cfg: GriffinConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter path -> shape for `cfg`."""
    return names.stored_shapes(cfg, "orbax")


def params_from_tree(tree: Mapping[str, Any], cfg: GriffinConfig, dtype: Any = None,
                     path: Path = Path(".")) -> dict:
    """Maps a recurrentgemma Flax parameter tree onto `model.griffin`'s tree, checking shapes."""
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    if "params" in tree and "embedder" not in tree:
        tree = tree["params"]
    for name, shape in _expected(cfg).items():
        found = tuple(names.flax_get(tree, name, path).shape)
        if found != shape:
            raise CheckpointError(
                f"{path}: parameter {name} has shape {found}, expected {shape} "
                f"(inconsistent widths/heads/conv width across blocks?)")
    return names.params_tree(cfg, "orbax", lambda key: names.flax_get(tree, key, path),
                             lambda a: jnp.asarray(a, dtype=dtype))


def load(path: str | Path, dtype: Any = None,
         attention_window: int | None = None) -> tuple[GriffinConfig, dict]:
    """Loads a recurrentgemma Flax/Orbax checkpoint directory.

    Args:
      path: the Orbax checkpoint directory.
      dtype: parameter dtype (default float32).
      attention_window: override the window (default: the matching preset's, else 2048).
    Returns:
      (config inferred from the shapes, parameter tree of `model.griffin`).
    """
    path = Path(path)
    tree = restore_tree(path)
    if "params" in tree and "embedder" not in tree:
        tree = tree["params"]
    cfg = GriffinConfig.from_flax_params(tree, path, attention_window)
    return cfg, params_from_tree(tree, cfg, dtype, path)
