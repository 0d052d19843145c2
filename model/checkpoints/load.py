"""`load(source, dtype)`: config, parameters, tokenizer and prompt format of any model source,
one reader per kind (random preset, embedded GGUF, GGUF file, HF directory, Orbax directory);
`load_text_side(source)`: the same without the weights (config, tokenizer, prompt format)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from model.checkpoints.source import Source, hf_config, prompt_format_of, read_config_json, resolve
from model.config import PRESETS, GriffinConfig, ModelConfig
from model.tokenizer import Tokenizer


@dataclasses.dataclass
class Loaded:
    """What a checkpoint holds: everything a `Model` is built from."""

    name: str
    config: ModelConfig
    params: Any  # the family's parameter tree of jax arrays
    tokenizer: Tokenizer | None
    prompt_format: str  # "chat" | "completion"
    info: dict[str, Any]
    # Reads the checkpoint's int8 block codes for the decode kernel (GGUF files; see
    # checkpoints/gguf_codes.py), or None.
    codes: Callable[[], dict[str, Any]] | None = None


def load(source: str | Path | Source, dtype: Any, seed: int = 0) -> Loaded:
    """Loads any model source (see `resolve`) with parameters in `dtype`.

    Args:
      source: a preset name, a .gguf file, an HF or Orbax directory, or a resolved `Source`.
      dtype: parameter dtype (a jax dtype).
      seed: seed of the random weights of `tiny-*` presets.
    Raises:
      CheckpointError: the source cannot be resolved or read (one line, what to do).
    """
    src = resolve(source)
    if src.kind == "random":
        return _random(src.name, dtype, seed)
    if src.kind == "embedded":
        from model.embedded import embedded_gguf_path

        return dataclasses.replace(_gguf(embedded_gguf_path(), dtype), name=src.name)
    if src.kind == "gguf":
        return _gguf(src.path, dtype)
    if src.kind == "hf":
        return _hf(src.path, dtype)
    return _orbax(src.path, dtype)


@dataclasses.dataclass(frozen=True)
class TextSide:
    """What building and counting a model's prompts needs, read without its weights."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    prompt_format: str  # "chat" | "completion"


def load_text_side(source: str | Path | Source) -> TextSide | None:
    """The config, tokenizer and prompt format of a source, without reading its weights; None
    for an Orbax directory (its config comes from its parameter tree: `load` it).

    Raises:
      CheckpointError: as `load`.
    """
    src = resolve(source)
    if src.kind == "random":
        from model.tokenizer import ByteTokenizer

        cfg = PRESETS[src.name]
        return TextSide(cfg, ByteTokenizer(cfg.vocab_size), "completion")
    if src.kind in ("embedded", "gguf"):
        from model.checkpoints.gguf import checkpoint_info
        from model.checkpoints.gguf_format import open_gguf
        from model.config import GemmaConfig
        from model.sp_model import sp_model_proto_from_gguf
        from model.tokenizer import SentencePieceTokenizer

        if src.kind == "embedded":
            from model.embedded import embedded_gguf_path

            path = embedded_gguf_path()
        else:
            path = src.path
        g, where = open_gguf(path), str(path)
        cfg = GemmaConfig.from_gguf_metadata(g.metadata, {t.name: t.shape for t in g.tensors},
                                             where)
        info = checkpoint_info(g.metadata, g.tensors, where)
        tokenizer = SentencePieceTokenizer(sp_model_proto_from_gguf(g.metadata, where))
        return TextSide(cfg, tokenizer, info.get("prompt_format", "completion"))
    if src.kind == "hf":
        c = read_config_json(src.path)
        return TextSide(hf_config(src.path, c), _tokenizer_beside(src.path),
                        _hf_prompt_format(src.path, c))
    return None


def _hf_prompt_format(path: Path, c: dict[str, Any]) -> str:
    return prompt_format_of([path.name, Path(str(c.get("_name_or_path", ""))).name])


def _random(name: str, dtype: Any, seed: int) -> Loaded:
    import jax

    from model.family import family_of
    from model.tokenizer import ByteTokenizer

    cfg = PRESETS[name]
    params = family_of(cfg).init_params(cfg, jax.random.PRNGKey(seed), dtype)
    return Loaded(name, cfg, params, ByteTokenizer(cfg.vocab_size), "completion",
                  {"random_weights": True})


def _gguf(path: Path, dtype: Any) -> Loaded:
    from model.checkpoints.gguf import load_gguf

    from model.checkpoints.gguf_codes import GGUFCodes

    cfg, params, tokenizer, info = load_gguf(path, dtype)
    return Loaded(path.stem, cfg, params, tokenizer, info.get("prompt_format", "completion"), info,
                  GGUFCodes(path))


def _tokenizer_beside(directory: Path) -> Tokenizer | None:
    """The SentencePiece `tokenizer.model` in a checkpoint directory, if it has one."""
    from model.tokenizer import SentencePieceTokenizer

    path = directory / "tokenizer.model"
    return SentencePieceTokenizer.from_file(path) if path.exists() else None


def _hf(path: Path, dtype: Any) -> Loaded:
    c = read_config_json(path)
    cfg = hf_config(path, c)
    if isinstance(cfg, GriffinConfig):
        from model.checkpoints.hf_griffin import load_params
    else:
        from model.checkpoints.hf import load_params
    params = load_params(path, cfg, dtype)
    return Loaded(path.name, cfg, params, _tokenizer_beside(path), _hf_prompt_format(path, c),
                  {"source": str(path), "model_type": c["model_type"]})


def _orbax(path: Path, dtype: Any) -> Loaded:
    from model.checkpoints import orbax_griffin

    cfg, params = orbax_griffin.load(path, dtype)
    return Loaded(path.name, cfg, params, _tokenizer_beside(path), "completion", {})
