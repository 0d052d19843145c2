"""The public entry point: `load_model(source)` -> `Model` with `.logits` and `.generate`, on one
device or on a (data, model) mesh over several (model/sharding.py)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import checkpoints, sharding
from model.config import DEFAULT_MODEL, ModelConfig
from model.engine import Engine, Generation, choice_probs, generate
from model.family import Family, Params, family_of
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

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
    `mesh` is the (data, model) device mesh the parameters are placed on (None: the one device
    they are on); `info['mesh']` ({'data': d, 'model': m}) and `info['param_bytes_per_device']`
    (the most parameter bytes any one device holds) say how.
    """

    def __init__(self, name: str, config: ModelConfig, params: Params,
                 tokenizer: Tokenizer | None, prompt_format: str = "completion",
                 info: dict[str, Any] | None = None, mesh: jax.sharding.Mesh | None = None,
                 codes: Callable[[], dict[str, Any]] | None = None):
        self.name = name
        self.config = config
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.family: Family = family_of(config)
        self.mesh = mesh if mesh is not None else sharding.mesh_of(params)
        # On a mesh of several devices the engine places the parameters (one device: as given).
        self.engine = Engine(self.family, config, params, mesh=self.mesh, codes=codes)
        self.params = self.engine.params
        per_device = sharding.bytes_per_device(self.params)
        self.info = {**(info or {}), "mesh": sharding.mesh_dict(self.mesh),
                     "param_bytes_per_device": max(per_device.values(), default=0)}

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
        tokens, mesh = tokens.astype(np.int32), self.engine.mesh
        tokens = (jnp.asarray(tokens) if mesh is None  # rows over `data` on a mesh
                  else jax.device_put(tokens, sharding.batch_sharding(mesh, tokens.shape)))
        out = _full_logits(self.params, tokens, self.family, self.config)
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


    def choice_probs(self, prompt: str | Sequence[int], choices: Sequence[str]) -> np.ndarray:
        """float64 [C] summing to 1: the probability of each choice (a string, encoded without
        BOS) as the continuation of `prompt`, from the model's logits, normalised over the
        choices (model.engine.score)."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.name} has no tokenizer; choices need one")
        ids = [self.tokenizer.encode(str(c)) for c in choices]
        return choice_probs(self.engine, self.encode_prompts([prompt])[0], ids,
                            tuple(self.tokenizer.stop_ids))


def _resolve_dtype(dtype: Any) -> Any:
    """None -> the backend's default; "float32" / "bfloat16" (or fp32 / bf16 ...) -> jnp dtype."""
    if dtype is None:
        dtype = default_dtype()
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        return _DTYPES[dtype]
    return dtype


def load_model(source: str | Path = DEFAULT_MODEL, dtype: Any = None,
               prompt_format: str | None = None, seed: int = 0,
               mesh_shape: Sequence[int] | None = None,
               devices: Sequence[Any] | None = None) -> Model:
    """Loads a model from a preset name, an HF directory, a .gguf file or an Orbax directory.

    Args:
      source: preset name (`gemma3-270m` is the embedded default; `tiny-*` presets get random
        weights from `seed`), a Hugging Face checkpoint directory (config.json + safetensors),
        a `.gguf` file, or a RecurrentGemma Flax/Orbax checkpoint directory (see
        `model.checkpoints.resolve`).
      dtype: "float32" or "bfloat16" (default: float32 on CPU, bfloat16 on GPU/TPU).
      prompt_format: override "chat" / "completion" (default: from the checkpoint).
      seed: seed of the random weights of `tiny-*` presets.
      mesh_shape: (data, model) devices of the mesh, their product the device count; None
        chooses it from the parameter bytes and one device's memory
        (`sharding.choose_mesh_shape`: data-parallel when the model fits one device).
      devices: the devices to run on (default: all that this process sees).
    Raises:
      CheckpointError: the source cannot be found or read (one line saying what to do).
      ValueError: a bad mesh_shape, or a model too big for all the devices together.
    """
    if prompt_format not in (None, "chat", "completion"):
        raise ValueError(f"prompt_format must be 'chat' or 'completion', got {prompt_format!r}")
    devices = list(jax.devices() if devices is None else devices)
    if mesh_shape is not None:
        mesh_shape = sharding.check_mesh_shape(mesh_shape, len(devices))
    if len(devices) == 1:
        c = checkpoints.load(source, _resolve_dtype(dtype), seed)
    else:  # read on the host; the Model places the parameters on the mesh
        with sharding.on_host():
            c = checkpoints.load(source, _resolve_dtype(dtype), seed)
    if mesh_shape is None:
        mesh_shape = sharding.choose_mesh_shape(len(devices), sharding.tree_bytes(c.params),
                                                sharding.device_memory(devices[0]))
    return Model(c.name, c.config, c.params, c.tokenizer, prompt_format or c.prompt_format,
                 c.info, mesh=sharding.make_mesh(mesh_shape, devices), codes=c.codes)


def describe(model: Model) -> dict[str, Any]:
    """A JSON-able summary of a model (for run summaries)."""
    return {"name": model.name, "family": model.config.family, "dtype": str(model.dtype),
            "params": int(model.config.num_params()), "prompt_format": model.prompt_format,
            "mesh": model.info["mesh"],
            "param_bytes_per_device": model.info["param_bytes_per_device"]}


__all__ = ["Model", "Generation", "load_model", "describe", "DEFAULT_MODEL"]
