"""Model configs read from checkpoints: HF config.json, GGUF metadata and Flax parameter shapes.

The bodies of `GemmaConfig.from_hf` / `from_gguf_metadata` and `GriffinConfig.from_hf` /
`from_flax_params` (model/config.py); JAX-free, so preflight can build a config cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from model.checkpoints.griffin_names import flax_get
from model.config import (
    PRESETS,
    GemmaConfig,
    GriffinConfig,
    gemma2_layer_types,
    gemma3_layer_types,
)
from model.errors import CheckpointError

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")  # HF model_type values of Gemma
GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")  # GGUF general.architecture values we read


# ----------------------------------------------------------------------------- HF Gemma


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


def gemma_from_hf(c: dict[str, Any], where: str = "config.json") -> GemmaConfig:
    """An HF Gemma 1/2/3 config dict (gemma3: its text tower) -> GemmaConfig."""
    mt = c.get("model_type")
    if mt not in GEMMA_TYPES:
        raise CheckpointError(
            f"{where}: model_type {mt!r} is not a Gemma transformer "
            f"(expected one of {', '.join(GEMMA_TYPES)})")
    try:
        return _gemma_from_hf(c)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e}") from None


def _gemma_from_hf(c: dict[str, Any]) -> GemmaConfig:
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


# ----------------------------------------------------------------------------- GGUF Gemma


def _uniform(value: Any, key: str, where: str) -> int:
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise CheckpointError(
                f"{where}: {key} varies per layer ({value[:8]}...); only uniform layers are "
                "supported"
            )
        value = value[0]
    return int(value)


def gemma_from_gguf(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                    where: str = "GGUF") -> GemmaConfig:
    """GGUF metadata plus tensor shapes (numpy order) -> GemmaConfig."""
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{where}: general.architecture is {arch!r}; gemma-batch reads GGUF files of "
            f"{', '.join(GGUF_ARCHITECTURES)} only; pass a Gemma GGUF or a Hugging Face "
            "checkpoint directory"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise CheckpointError(
                f"{where}: metadata key {full} is missing; the file is incomplete")
        return md[full]

    def opt(key: str, default: Any) -> Any:
        return md.get(f"{arch}.{key}", default)

    d_model = int(need("embedding_length"))
    num_layers = int(need("block_count"))
    num_heads = _uniform(need("attention.head_count"), "attention.head_count", where)
    num_kv_heads = _uniform(opt("attention.head_count_kv", num_heads), "head_count_kv", where)
    head_dim = int(opt("attention.key_length", d_model // num_heads))
    ffw_dim = _uniform(need("feed_forward_length"), "feed_forward_length", where)
    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{where}: tensor token_embd.weight is missing")
    vocab_size = int(tensor_shapes["token_embd.weight"][0])

    window = opt("attention.sliding_window", None)
    pattern = opt("attention.sliding_window_pattern", None)
    if arch == "gemma":
        layer_types = ("global",) * num_layers
        window = None
    elif isinstance(pattern, list) and len(pattern) == num_layers:
        # Newer files list per layer whether it uses the sliding window.
        layer_types = tuple("local" if p else "global" for p in pattern)
    elif arch == "gemma2":
        layer_types = gemma2_layer_types(num_layers)
        window = window or 4096
    else:  # gemma3; llama.cpp hard-codes a period of 6 (5 local, 1 global)
        period = int(pattern) if isinstance(pattern, (int, float)) and pattern else 6
        layer_types = gemma3_layer_types(num_layers, period)
    if "local" in layer_types and not window:
        raise CheckpointError(
            f"{where}: {arch} has sliding-window layers but no {arch}.attention.sliding_window")

    rope_base = float(opt("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0))
    rope_local = float(opt("rope.freq_base_swa", 10_000.0)) if arch == "gemma3" else rope_base
    scale = 1.0
    if opt("rope.scaling.type", "none") == "linear":
        scale = float(opt("rope.scaling.factor", 1.0))
    # llama.cpp scales queries by head_dim ** -0.5, except for the 27B models, which use
    # (d_model / num_heads) ** -0.5 (they have head_dim 128 but d_model / heads 144 or 168).
    is_27b = (arch, num_layers) in (("gemma2", 46), ("gemma3", 62))
    qscale = float(d_model // num_heads if is_27b else head_dim)

    def softcap(key: str) -> float | None:
        v = opt(key, None)
        return float(v) if v else None

    tokens = md.get("tokenizer.ggml.tokens") or []
    eot = tokens.index("<end_of_turn>") if "<end_of_turn>" in tokens else None
    return GemmaConfig(
        family=arch,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        ffw_dim=ffw_dim,
        layer_types=layer_types,
        sliding_window=int(window) if window else None,
        rope_base_global=rope_base,
        rope_base_local=rope_local,
        rope_scale_global=scale,
        query_pre_attn_scalar=qscale,
        attn_softcap=softcap("attn_logit_softcapping"),
        final_softcap=softcap("final_logit_softcapping"),
        post_norms="blk.0.post_attention_norm.weight" in tensor_shapes,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        # float32 in the file: 1e-6 reads back as 9.99999997e-07; keep 7 significant digits
        rms_eps=float(f"{float(opt('attention.layer_norm_rms_epsilon', 1e-6)):.7g}"),
        max_seq_len=int(opt("context_length", 8192)),
        bos_id=int(md.get("tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(md.get("tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(md.get("tokenizer.ggml.padding_token_id", 0)),
        end_of_turn_id=eot,
    )


# ----------------------------------------------------------------------------- HF Griffin


def _field(c: dict[str, Any], name: str, where: str) -> Any:
    if name not in c or c[name] is None:
        raise CheckpointError(f"{where}: recurrent_gemma config has no {name!r} field")
    return c[name]


def griffin_from_hf(c: dict[str, Any], where: str = "config.json") -> GriffinConfig:
    """A transformers `recurrent_gemma` config.json dict -> GriffinConfig."""
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


# ----------------------------------------------------------------------------- Flax Griffin


def _period(kinds: list[str]) -> tuple[str, ...]:
    """The shortest pattern whose repetition gives `kinds`."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return tuple(kinds[:p])
    return tuple(kinds)


def griffin_from_flax(tree: Mapping[str, Any], path: Path = Path("."),
                      attention_window: int | None = None) -> GriffinConfig:
    """A recurrentgemma Flax parameter tree (shapes only) + preset values -> GriffinConfig."""
    if "params" in tree and "embedder" not in tree:
        tree = tree["params"]
    vocab, d = flax_get(tree, "embedder/input_embedding", path).shape
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
                n, iw, _ = flax_get(tree, f"{name}/recurrent_block/rg_lru/a_gate/w", path).shape
                lru, heads = n * iw, n
                conv_w = flax_get(tree, f"{name}/recurrent_block/conv_1d/w", path).shape[0]
        elif "attention_block" in blk:
            kinds.append("attention")
            if head_dim is None:
                head_dim = flax_get(tree, f"{name}/attention_block/proj_k/kernel", path).shape[1]
        else:
            raise CheckpointError(f"{path}: {name} has neither recurrent_block nor "
                                  f"attention_block (keys: {sorted(blk)})")
        if ffw is None:
            ffw = flax_get(tree, f"{name}/mlp_block/ffw_up/w", path).shape[-1]
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
