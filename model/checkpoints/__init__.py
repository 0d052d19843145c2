"""Model sources: `resolve` (what a source names), `check` (loadable, without reading weights),
`config_of` (its config, without weights) and `load` (config, parameters, tokenizer), plus one
reader per checkpoint format.

Importing this package, `resolve`, `check` and `config_of` do not import JAX; `load` imports it
when called.
"""

from model.checkpoints.load import Loaded, TextSide, load, load_text_side
from model.checkpoints.source import Source, check, config_of, resolve
from model.errors import CheckpointError

__all__ = ["Source", "Loaded", "resolve", "check", "config_of", "load", "TextSide",
           "load_text_side", "CheckpointError"]
