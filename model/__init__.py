"""gemma-batch's JAX models: Gemma 1/2/3 and RecurrentGemma. No Ray imports here.

    from model import load_model
    m = load_model("gemma3-270m")            # preset, HF directory, .gguf file or Orbax dir
    m.logits(tokens)                         # int [B, T] -> float32 [B, T, V]
    m.generate(["Summarize: ..."], max_new_tokens=64)
"""

from model.api import DEFAULT_MODEL, Generation, Model, describe, load_model
from model.config import PRESETS, GemmaConfig, GriffinConfig, get_preset
from model.errors import CheckpointError

__all__ = ["load_model", "Model", "Generation", "describe", "DEFAULT_MODEL", "PRESETS",
           "GemmaConfig", "GriffinConfig", "get_preset", "CheckpointError"]
