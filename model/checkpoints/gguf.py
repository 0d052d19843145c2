"""GGUF (llama.cpp) checkpoints of Gemma 1/2/3: llama.cpp's tensor names and layouts -> ours.

`load_gguf(path)` reads the header (gguf_format.py), takes the config from the metadata
(`GemmaConfig.from_gguf_metadata`), dequantizes every tensor (dequant.py), maps llama.cpp's
names and conventions onto our parameter tree and rebuilds the SentencePiece tokenizer; the
float32 tree is cached on disk (gguf_cache.py) so a reload takes seconds.

llama.cpp conventions undone here:
* the converter stores every RMSNorm weight as `1 + w` (HF Gemma applies `1 + w` at run time,
  llama.cpp bakes it in): we subtract 1;
* 2-D weights are stored [out, in] in numpy order (`attn_q` [H*Dh, D], `attn_output` [D, H*Dh],
  `ffn_down` [D, F]); we transpose the attention weights and split their heads (the MLP's
  stay [out, in], as our MLP reads them);
* Gemma's RoPE is already the "rotate half" (NeoX) layout in llama.cpp, so q/k rows are not
  permuted (unlike llama-architecture files).
Things llama.cpp hard-codes for Gemma 3 rather than storing: the local RoPE base (10,000) and
the 5-local-to-1-global layer pattern; we use the metadata when a newer file carries them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoints.dequant import dequantize
from model.checkpoints.gguf_cache import read_cache, write_cache
from model.checkpoints.gguf_format import GGUFFile, TensorInfo, open_gguf
from model.checkpoints.source import prompt_format_of
from model.config import GemmaConfig
from model.errors import CheckpointError

__all__ = ["load_gguf", "read_gguf_numpy", "open_gguf", "checkpoint_info", "unflatten"]

# llama.cpp per-layer tensor name -> (our name, is an RMSNorm weight stored as 1 + w).
LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("attn_norm", True),
    "attn_q": ("q", False),
    "attn_k": ("k", False),
    "attn_v": ("v", False),
    "attn_output": ("o", False),
    "attn_q_norm": ("q_norm", True),
    "attn_k_norm": ("k_norm", True),
    "post_attention_norm": ("post_attn_norm", True),
    "ffn_norm": ("ffw_norm", True),
    "ffn_gate": ("gate", False),
    "ffn_up": ("up", False),
    "ffn_down": ("down", False),
    "post_ffw_norm": ("post_ffw_norm", True),
}
_OPTIONAL = {"q_norm", "k_norm", "post_attn_norm", "post_ffw_norm"}


def checkpoint_info(md: dict[str, Any], tensors: list[TensorInfo], where: str) -> dict[str, Any]:
    """What we learn about the checkpoint: name, quantization, instruction-tuned or base."""
    name = str(md.get("general.name") or Path(where).stem)
    finetune = str(md.get("general.finetune") or "")
    template = md.get("tokenizer.chat_template")
    fmt = prompt_format_of([name, finetune, Path(where).stem], chat_template=bool(template))
    return {
        "name": name,
        "architecture": md.get("general.architecture"),
        "size_label": md.get("general.size_label"),
        "file_type": md.get("general.file_type"),
        "tensor_types": dict(Counter(t.qtype.name for t in tensors)),
        "instruction_tuned": fmt == "chat",
        "prompt_format": fmt,
        "chat_template": bool(template),
        "source": "gguf",
    }


def _map_tensors(g: GGUFFile, cfg: GemmaConfig, where: str) -> dict[str, np.ndarray]:
    """Dequantizes and maps every tensor onto flat names of our tree ("layers.3.q", ...)."""
    d, h, k, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim
    expected: dict[str, tuple[int, ...]] = {
        "q": (d, h, dh), "k": (d, k, dh), "v": (d, k, dh), "o": (h, dh, d),
        "gate": (f, d), "up": (f, d), "down": (d, f),
        "attn_norm": (d,), "ffw_norm": (d,), "post_attn_norm": (d,), "post_ffw_norm": (d,),
        "q_norm": (dh,), "k_norm": (dh,),
    }
    flat: dict[str, np.ndarray] = {}
    layer_re = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
    for t in g.tensors:
        w = dequantize(g, t)
        if t.name == "token_embd.weight":
            flat["embed"] = w  # [V, D]
            continue
        if t.name == "output_norm.weight":
            flat["final_norm"] = w - 1.0
            continue
        if t.name == "output.weight":
            continue  # Gemma ties the output projection to the embedding
        m = layer_re.fullmatch(t.name)
        if not m or m.group(2) not in LAYER_TENSORS:
            continue  # e.g. rope_freqs: nothing our model needs
        i = int(m.group(1))
        name, is_norm = LAYER_TENSORS[m.group(2)]
        if name == "q":  # [H*Dh, D] -> [D, H, Dh]
            w = w.T.reshape(d, h, dh)
        elif name in ("k", "v"):  # [K*Dh, D] -> [D, K, Dh]
            w = w.T.reshape(d, k, dh)
        elif name == "o":  # [D, H*Dh] -> [H, Dh, D]
            w = w.T.reshape(h, dh, d)
        elif is_norm:  # (MLP weights stay [out, in], as our MLP reads them)
            w = w - 1.0
        if w.shape != expected[name]:
            raise CheckpointError(
                f"{where}: tensor {t.name} has shape {w.shape} after mapping, expected "
                f"{expected[name]} from the metadata; the file is inconsistent"
            )
        flat[f"layers.{i}.{name}"] = np.ascontiguousarray(w, dtype=np.float32)
    if "embed" in flat and flat["embed"].shape != (cfg.vocab_size, d):
        raise CheckpointError(
            f"{where}: token_embd has shape {flat['embed'].shape}, expected [V, {d}]")
    needed = ["embed", "final_norm"] + [
        f"layers.{i}.{n}"
        for i in range(cfg.num_layers)
        for n, _ in LAYER_TENSORS.values()
        if n not in _OPTIONAL
        or (n in ("q_norm", "k_norm") and cfg.qk_norm)
        or (n.startswith("post_") and cfg.post_norms)
    ]
    missing = [n for n in needed if n not in flat]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensors are missing (first: {missing[0]}); the file is "
            "incomplete"
        )
    return flat


def unflatten(flat: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Flat names ("layers.3.q") -> the nested parameter tree of model/transformer.py."""
    layers: list[dict[str, Any]] = [{} for _ in range(num_layers)]
    tree: dict[str, Any] = {"layers": layers}
    for name, w in flat.items():
        if name.startswith("layers."):
            _, i, leaf = name.split(".")
            layers[int(i)][leaf] = w
        else:
            tree[name] = w
    return tree


def read_gguf_numpy(path: str | os.PathLike, *, use_cache: bool = True):
    """Like `load_gguf` but returns flat float32 numpy weights and the tokenizer proto bytes.

    Returns:
      (config, flat: {"embed": [V, D], "layers.3.q": [D, H, Dh], ...}, proto: bytes, info).
    """
    from model.sp_model import sp_model_proto_from_gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    if use_cache:
        hit = read_cache(path)
        if hit is not None:
            cfg, info, flat, proto = hit
            return cfg, flat, proto, info
    g = open_gguf(path)
    md = g.metadata
    shapes = {t.name: t.shape for t in g.tensors}
    where = str(path)
    cfg = GemmaConfig.from_gguf_metadata(md, shapes, where)
    info = checkpoint_info(md, g.tensors, where)
    proto = sp_model_proto_from_gguf(md, where)
    flat = _map_tensors(g, cfg, where)
    if use_cache:
        write_cache(path, cfg, info, flat, proto)
    return cfg, flat, proto, info


def load_gguf(path: str | os.PathLike, dtype: Any = None, *, use_cache: bool = True):
    """Loads a Gemma GGUF checkpoint.

    Args:
      path: the .gguf file.
      dtype: parameter dtype (default float32).
      use_cache: keep / reuse the dequantized float32 tree in the gemma-batch cache.

    Returns:
      (config: GemmaConfig, params: nested dict of jax arrays, tokenizer: SentencePieceTokenizer,
       info: dict with name, architecture, tensor_types, instruction_tuned, prompt_format, ...).

    Raises:
      CheckpointError: missing / truncated / corrupt file, unknown architecture, bad shapes.
    """
    import jax.numpy as jnp

    from model.tokenizer import SentencePieceTokenizer

    cfg, flat, proto, info = read_gguf_numpy(path, use_cache=use_cache)
    tokenizer = SentencePieceTokenizer(proto)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but token_embd has "
            f"{cfg.vocab_size} rows; the file is inconsistent"
        )
    dtype = jnp.float32 if dtype is None else dtype
    # Convert one tensor at a time and drop the numpy copy, so the peak stays near one tree.
    params = unflatten({n: jnp.asarray(flat.pop(n), dtype=dtype) for n in list(flat)},
                       cfg.num_layers)
    return cfg, params, tokenizer, info
