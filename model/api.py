"""The public entry point: `load_model(source)` -> `Model` with `.logits` and `.generate`."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.config import PRESETS, GemmaConfig, ModelConfig
from model.engine import Engine, Generation, generate
from model.family import Family, Params, family_of
from model.errors import CheckpointError
from model.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def default_dtype() -> str:
    """float32 on CPU (XLA's CPU bf16 matmuls are several times slower), bfloat16 elsewhere."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@functools.partial(jax.jit, static_argnames=("family", "cfg"))
def _full_logits(params: Params, tokens: jax.Array, family: Family, cfg: ModelConfig
                 ) -> jax.Array:
    """int32 tokens [B, T] -> float32 logits [B, T, V], one causal forward without a cache."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = family.forward(params, tokens, positions, None, cfg)
    return logits


class Model:
    """A loaded model: config, parameters, tokenizer, and the generation entry points.

    `engine` holds this model's compiled generation programs: its `buckets` (shape buckets;
    `buckets.max_batch` is the most decode slots) and its `compile_log` (count, seconds, records).
    """

    def __init__(self, name: str, config: ModelConfig, params: Params,
                 tokenizer: Tokenizer | None, prompt_format: str = "completion",
                 info: dict[str, Any] | None = None):
        self.name = name
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.info = info or {}
        self.family: Family = family_of(config)
        self.engine = Engine(self.family, config, params)

    @property
    def dtype(self) -> Any:
        return jax.tree_util.tree_leaves(self.params)[0].dtype

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {type(self.config).__name__}, dtype={self.dtype})"

    def logits(self, tokens: Any) -> np.ndarray:
        """Full causal forward, no cache: int [B, T] -> float32 numpy [B, T, V]."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"logits expects int tokens of shape [batch, time], got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        out = _full_logits(self.params, jnp.asarray(tokens, jnp.int32), self.family, self.config)
        return np.asarray(out, dtype=np.float32)

    def encode_prompts(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Strings -> ids with BOS (user text is never parsed for control tokens); ids pass."""
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"model {self.name} has no tokenizer; pass token id lists")
                out.append(self.tokenizer.encode(p, add_bos=True))
            else:
                out.append([int(t) for t in p])
        return out

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop: Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, **engine_kw: Any
                 ) -> list[Generation]:
        """Generates a continuation per prompt (strings or token id lists).

        Runs this model's `engine` (bucketed, jitted, continuous batching; model.engine); extra
        keyword arguments go to `model.engine.generate` (e.g. `max_batch`, per-row lists of
        sampling values). `stop_token_ids`: ids that end a row (None: the tokenizer's stop ids,
        else EOS; []: none). Returns per prompt a `Generation` with `.tokens`, `.text`,
        `.finish_reason` ("stop" when a stop token or stop string ended it, "length" at
        `max_new_tokens`), `.prompt_tokens` and `.output_tokens`.
        """
        return generate(
            self.engine, self.encode_prompts(prompts), self.tokenizer,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop_token_ids=stop_token_ids, stop_strings=stop, **engine_kw)


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        dtype = default_dtype()
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        return _DTYPES[dtype]
    return dtype


def _hf_prompt_format(directory: Path, config_json: dict[str, Any]) -> str:
    """"chat" for instruction-tuned checkpoints (by name), else "completion"."""
    names = [directory.name, str(config_json.get("_name_or_path", ""))]
    return "chat" if any(n.endswith(("-it", "-chat", "-instruct")) or "-it-" in n
                         for n in names) else "completion"


def _hf_tokenizer(directory: Path) -> Tokenizer | None:
    path = directory / "tokenizer.model"
    return SentencePieceTokenizer.from_file(path) if path.exists() else None


def load_model(source: str | Path = DEFAULT_MODEL, dtype: Any = None,
               prompt_format: str | None = None, seed: int = 0) -> Model:
    """Loads a model from a preset name, an HF directory, a .gguf file or an Orbax directory.

    Args:
      source: preset name (`gemma3-270m` is the embedded default; `tiny-*` presets get random
        weights from `seed`), a Hugging Face checkpoint directory (config.json + safetensors),
        a `.gguf` file, or a RecurrentGemma Flax/Orbax checkpoint directory.
      dtype: "float32" or "bfloat16" (default: float32 on CPU, bfloat16 on GPU/TPU).
      prompt_format: override "chat" / "completion" (default: from the checkpoint).
      seed: seed of the random weights of `tiny-*` presets.
    """
    jdtype = _resolve_dtype(dtype)
    src = str(source)
    if src in PRESETS:
        model = _load_preset(src, jdtype, seed)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"model {src!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
                "existing path")
        if path.is_file() and path.suffix == ".gguf":
            model = _load_gguf(path, jdtype)
        elif path.is_dir() and (path / "config.json").exists():
            model = _load_hf(path, jdtype)
        elif path.is_dir() and _looks_like_orbax(path):
            from model.checkpoints import orbax_griffin

            cfg, params = orbax_griffin.load(path, jdtype)
            model = Model(path.name, cfg, params, _hf_tokenizer(path))
        elif path.is_dir():
            raise CheckpointError(
                f"{path}: no config.json; expected a Hugging Face checkpoint directory "
                "(config.json + *.safetensors) or a RecurrentGemma Orbax checkpoint")
        else:
            raise CheckpointError(
                f"{path}: unsupported model file; expected a .gguf file or a checkpoint directory")
    if prompt_format is not None:
        if prompt_format not in ("chat", "completion"):
            raise ValueError(f"prompt_format must be 'chat' or 'completion', got {prompt_format!r}")
        model.prompt_format = prompt_format
    return model


def _looks_like_orbax(path: Path) -> bool:
    return any((path / n).exists() for n in ("_METADATA", "checkpoint", "_CHECKPOINT_METADATA",
                                              "manifest.ocdbt"))


def _load_preset(name: str, dtype: Any, seed: int) -> Model:
    cfg = PRESETS[name]
    if name.startswith("tiny-"):
        params = family_of(cfg).init_params(cfg, jax.random.PRNGKey(seed), dtype)
        return Model(name, cfg, params, ByteTokenizer(cfg.vocab_size), "completion",
                     {"random_weights": True})
    if name == DEFAULT_MODEL:
        from model.embedded import embedded_gguf_path

        model = _load_gguf(embedded_gguf_path(), dtype)
        model.name = name
        return model
    raise CheckpointError(
        f"preset {name!r} ships no weights here; download its checkpoint and pass the directory "
        f"(Hugging Face safetensors) or a .gguf file as the model, e.g. --model /path/to/{name}")


def _load_gguf(path: Path, dtype: Any) -> Model:
    from model.checkpoints.gguf import load_gguf

    cfg, params, tokenizer, info = load_gguf(path, dtype)
    return Model(path.stem, cfg, params, tokenizer, info.get("prompt_format", "completion"), info)


def _load_hf(path: Path, dtype: Any) -> Model:
    from model.checkpoints.hf import load_hf_gemma, read_config_json

    c = read_config_json(path)
    mt = c.get("model_type")
    if mt is None:
        raise CheckpointError(f"{path / 'config.json'}: no model_type field; is it a HF config?")
    if mt == "recurrent_gemma":
        from model.checkpoints import hf_griffin

        cfg = hf_griffin.config_from_hf(c)
        params = hf_griffin.load_params(path, cfg, dtype)
    else:
        cfg, params = load_hf_gemma(path, dtype)
    return Model(path.name, cfg, params, _hf_tokenizer(path), _hf_prompt_format(path, c),
                 {"source": str(path), "model_type": mt})


def describe(model: Model) -> dict[str, Any]:
    """A JSON-able summary of a model (for run summaries)."""
    return {"name": model.name, "family": model.config.family, "dtype": str(model.dtype),
            "params": int(model.config.num_params()), "prompt_format": model.prompt_format}


__all__ = ["Model", "Generation", "load_model", "describe", "DEFAULT_MODEL"]
