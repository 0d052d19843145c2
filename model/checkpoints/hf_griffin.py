"""Hugging Face `recurrent_gemma` checkpoints (config.json + safetensors) -> RecurrentGemma params.

Tensor names and layouts come from the shared table in griffin_names.py (HF column); the config
comes from `GriffinConfig.from_hf`. Embedding [V, D] and final norm [D] sit under `model.`;
`lm_head.weight` is tied to the embedding and ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoints import griffin_names as names
from model.checkpoints.safetensors_io import load_dir
from model.config import GriffinConfig
from model.errors import CheckpointError

_IGNORED = ("lm_head.weight",)  # tied to the embedding



def _expected(cfg: GriffinConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor the checkpoint must hold."""
    return names.stored_shapes(cfg, "hf")


def check_config(directory: Path, cfg: GriffinConfig) -> None:
    """Refuses a config that disagrees with the directory's config.json (window, widths...)."""
    path = directory / "config.json"
    if not path.exists():
        return
    try:
        theirs = GriffinConfig.from_hf(json.loads(path.read_text()), str(path))
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
                f"{b}; load it with the checkpoint's own config (GriffinConfig.from_hf)")


def load_params(directory: str | Path, cfg: GriffinConfig, dtype: Any = None) -> dict:
    """Reads a `recurrent_gemma` safetensors directory (sharded or not) into our param tree.

    Args:
      directory: the checkpoint directory.
      cfg: the model config (normally `GriffinConfig.from_hf` of its config.json).
      dtype: parameter dtype (default float32).
    Returns:
      The parameter tree of `model.griffin` (see its module docstring).
    Raises:
      CheckpointError: a tensor is missing, unexpected or mis-shaped, or cfg disagrees with
        the directory's config.json.
    """
    import jax.numpy as jnp

    directory = Path(directory)
    dtype = jnp.float32 if dtype is None else dtype
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

    return names.params_tree(cfg, "hf", lambda key: np.asarray(tensors[key]),
                             lambda a: jnp.asarray(a, dtype=dtype))
