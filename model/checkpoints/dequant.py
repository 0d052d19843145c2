"""GGUF tensor data -> float32: dequantisation per tensor type (Q4_K, Q5_0, Q6_K, Q8_0, F16,
BF16, F32, ...) through `gguf.quants.dequantize`, one tensor at a time."""

from __future__ import annotations

import numpy as np

from model.checkpoints.gguf_format import GGUFFile, TensorInfo
from model.errors import CheckpointError


def dequantize(g: GGUFFile, t: TensorInfo) -> np.ndarray:
    """float32 array in numpy order, e.g. attn_q [H*Dh, D].

    Raises:
      CheckpointError: the installed `gguf` package cannot dequantize the tensor's type.
    """
    from gguf.quants import dequantize as gguf_dequantize

    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    raw = np.asarray(g.tensor_bytes(t)).reshape(rows, -1)  # [rows, bytes per row]
    try:
        arr = gguf_dequantize(raw, t.qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{g.path}: tensor {t.name} uses quantization {t.qtype.name}, which the installed "
            "gguf package cannot dequantize; upgrade it: pip install -U gguf"
        ) from None
    return np.ascontiguousarray(arr.reshape(t.shape), dtype=np.float32)
