"""gemma-batch's JAX models: Gemma 1/2/3 and RecurrentGemma. No Ray imports here.

    from model import load_model
    m = load_model("gemma3-270m")            # preset, HF directory, .gguf file or Orbax dir
    m.logits(tokens)                         # int [B, T] -> float32 [B, T, V]
    m.generate(["Summarize: ..."], max_new_tokens=64)

Names are exported lazily (PEP 562): `import model` and the config names (DEFAULT_MODEL,
PRESETS, ...) do not import JAX; `load_model`, `Model` and friends import it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> the module that defines it
    "load_model": "model.api", "Model": "model.api", "Generation": "model.api",
    "describe": "model.api",
    "DEFAULT_MODEL": "model.config", "PRESETS": "model.config", "GemmaConfig": "model.config",
    "GriffinConfig": "model.config", "get_preset": "model.config",
    "CheckpointError": "model.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
