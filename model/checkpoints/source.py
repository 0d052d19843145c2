"""What a model source names, and whether it can be loaded: `resolve` and `check` (no weights).

A source is a preset name (random weights for `tiny-*`, the embedded GGUF for DEFAULT_MODEL), a
`.gguf` file, a Hugging Face directory (config.json) or a RecurrentGemma Orbax directory. The
rules that tell them apart, and the guess of chat vs completion prompts, live here only.
JAX-free: preflight calls `check` before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from model.config import DEFAULT_MODEL, PRESETS
from model.errors import CheckpointError

if TYPE_CHECKING:
    from model.config import ModelConfig

Kind = Literal["random", "embedded", "gguf", "hf", "orbax"]
ORBAX_MARKERS = ("_METADATA", "checkpoint", "_CHECKPOINT_METADATA", "manifest.ocdbt")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved model source: its kind, its name (models and run summaries), its path."""

    kind: Kind
    name: str
    path: Path | None = None  # None for presets (the embedded file is assembled on load)


def _preset_kind(name: str) -> Kind | None:
    """Which presets ship weights here: tiny-* (random) and the embedded default."""
    if name.startswith("tiny-"):
        return "random"
    return "embedded" if name == DEFAULT_MODEL else None


def looks_like_orbax(path: Path) -> bool:
    """A directory holding any of Orbax's checkpoint marker files."""
    return any((path / n).exists() for n in ORBAX_MARKERS)


def resolve(source: str | Path | Source) -> Source:
    """Tells which kind of source `source` is, touching only file names (no contents).

    Raises:
      CheckpointError: a remote URL, an unknown name, a preset without weights here, a directory
        that is no checkpoint, an unsupported file.
    """
    if isinstance(source, Source):
        return source
    src = str(source)
    if src in PRESETS:
        kind = _preset_kind(src)
        if kind is None:
            raise CheckpointError(
                f"model preset {src!r} ships no weights here; download its checkpoint and pass "
                "its directory (Hugging Face safetensors) or a .gguf file as the model, e.g. "
                f"--model /path/to/{src}")
        return Source(kind, src)
    if "://" in src:
        raise CheckpointError(
            f"model {src!r}: remote model URLs are not supported; copy it locally or use a "
            "preset")
    path = Path(src).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model {src!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
            "path; pass a preset name, a checkpoint directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        return Source("gguf", path.stem, path)
    if path.is_dir() and (path / "config.json").exists():
        return Source("hf", path.name, path)
    if path.is_dir() and looks_like_orbax(path):
        return Source("orbax", path.name, path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: no config.json (Hugging Face) and no Orbax checkpoint files; pass a Hugging "
            "Face checkpoint directory (config.json + *.safetensors), a RecurrentGemma Orbax "
            "checkpoint or a .gguf file")
    raise CheckpointError(
        f"{path}: unsupported model file; expected a .gguf file or a checkpoint directory")


def check(source: str | Path | Source) -> Source:
    """`resolve` plus the checks that need no weights: the embedded package is installed; a
    GGUF's header, tensor table and config parse; an HF config.json reads, and when it names a
    model_type, that type is one we load and its config builds. Orbax directories are left to
    the loader (reading their metadata needs Orbax and JAX).

    Raises:
      CheckpointError: one line saying what is wrong with the source and what to do.
    """
    src = resolve(source)
    if src.kind == "embedded":
        from model.embedded import check_embedded

        check_embedded()
    elif src.kind == "gguf":
        config_of(src)
    elif src.kind == "hf":
        c = read_config_json(src.path)
        if "model_type" in c:  # without one, the loader says so (where the job reports it)
            hf_config(src.path, c)
    return src


def config_of(source: str | Path | Source) -> "ModelConfig | None":
    """The config a source describes, read without weights (what sizing a job needs); None for
    an Orbax directory, whose config comes from its parameter tree.

    Raises:
      CheckpointError: as `check`.
    """
    src = resolve(source)
    if src.kind in ("random", "embedded"):
        return PRESETS[src.name]
    if src.kind == "gguf":
        from model.checkpoints.gguf_format import open_gguf
        from model.config import GemmaConfig

        g = open_gguf(src.path)
        return GemmaConfig.from_gguf_metadata(g.metadata, {t.name: t.shape for t in g.tensors},
                                              str(src.path))
    if src.kind == "hf":
        return hf_config(src.path, read_config_json(src.path))
    return None


def read_config_json(directory: Path) -> dict[str, Any]:
    """The directory's config.json as a dict."""
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{directory}: no config.json; point --model at a Hugging Face checkpoint directory, "
            "a .gguf file or a preset name")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: not a JSON object; is it a Hugging Face config.json?")
    return c


def hf_config(directory: Path, c: dict[str, Any]):
    """The model config of an HF directory's config.json dict `c` (Gemma or RecurrentGemma)."""
    from model.config import GemmaConfig, GriffinConfig

    where = directory / "config.json"
    mt = c.get("model_type")
    if mt is None:
        raise CheckpointError(f"{where}: no model_type field; is it a HF config?")
    if mt == "recurrent_gemma":
        return GriffinConfig.from_hf(c, str(where))
    return GemmaConfig.from_hf(c, str(where))


def prompt_format_of(names: Sequence[str], chat_template: bool = False) -> str:
    """"chat" for an instruction-tuned checkpoint, else "completion".

    Guessed from its names (a word `it`, `instruct` or `chat`: tuned; `pt`, `base` or
    `pretrained`: base) and, when they say neither, from whether it carries a chat template.
    """
    words = set(re.split(r"[^a-z0-9]+", " ".join(names).lower()))
    if words & {"it", "instruct", "chat"}:
        return "chat"
    if words & {"pt", "base", "pretrained"}:
        return "completion"
    return "chat" if chat_template else "completion"
