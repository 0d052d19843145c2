"""Model sources: `resolve` (what a source names), `check` (loadable, without reading weights)
and `load` (config, parameters, tokenizer), plus one reader per checkpoint format.

Importing this package, `resolve` and `check` do not import JAX; `load` imports it when called.
"""

from model.checkpoints.load import Loaded, load
from model.checkpoints.source import Source, check, resolve
from model.errors import CheckpointError

__all__ = ["Source", "Loaded", "resolve", "check", "load", "CheckpointError"]
