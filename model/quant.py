"""Block-quantized weights for decode: a GGUF's own int8 codes, read by `kernels.qmatmul`.

A decode step with a few rows is bound by the bytes of its weights. GGUF's Q8_0, Q5_0, Q4_K and
Q6_K blocks are all `scale * q + offset` over groups of 32 (16 for Q6_K) with small integer
codes q, so each tensor is kept as int8 codes [N, K] plus float32 (scale, offset) per group:
1.25-1.5 bytes per weight instead of float32's 4. Every weight equals the float32 weight the
model was loaded with, bit for bit (`codes_exact` checks it per tensor the first time; codes
that passed are cached, checkpoints/gguf_cache.py; a tensor that does not match keeps its float32
path), so decode differs from the float32 program only in the order of summation. Prefill (many
rows per product) keeps the float32 weights.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from model.checkpoints.gguf_codes import Codes

log = logging.getLogger(__name__)

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QWeight:
    """W [N, K] = so[:, k // group, 0] * q + so[:, k // group, 1]; `group` is static."""

    q: jax.Array  # int8 [N, K]
    so: jax.Array  # float32 [N, K / group, 2]
    group: int = dataclasses.field(metadata=dict(static=True))
    rows: jax.Array | None = None  # bool [M]: the rows of x wanted (None: all; see `for_rows`)

    def dot(self, x: jax.Array, vocab_major: bool = False) -> jax.Array:
        """x [..., K] -> [..., N] float32, or [N, M] with `vocab_major` (x [M, K]); rows of x
        not in `rows` give zeros."""
        from model.kernels import qmatmul

        if vocab_major:
            return qmatmul(x, self.q, self.so, self.group, vocab_major=True, rows=self.rows)
        lead = x.shape[:-1]
        y = qmatmul(x.reshape(-1, x.shape[-1]), self.q, self.so, self.group, rows=self.rows)
        return y.reshape(lead + (self.q.shape[0],))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ArgmaxTiles:
    """A quantized head laid out for greedy decoding's next token (`kernels.qargmax_tiles`):
    integer products over these rule out all but a few tokens, which the head's own codes then
    score exactly. `offsets` (static): some group of the head has a nonzero offset."""

    wt: jax.Array  # uint8 [T, K * 16]
    scale: jax.Array  # float32 [T, K / G, 16]
    offset: jax.Array  # float32 [T, K / G, 16]
    bound: jax.Array  # float32 [T, K / G, 16]
    tile: jax.Array  # float32 [T, K / G]
    offsets: bool = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def of(cls, head: QWeight) -> "ArgmaxTiles":
        """The tiles of `head` (made on its device: 0.2 s and 210 MB for the 270M's head)."""
        from model.kernels import qargmax_tiles

        tiles = jax.jit(qargmax_tiles, static_argnums=2)(head.q, head.so, head.group)
        return cls(*tiles, offsets=bool(jnp.any(head.so[..., 1] != 0)))

    def next_token(self, head: QWeight, x: jax.Array) -> jax.Array:
        """x [M, K] -> int32 [M]: the first index of the maximum of `head.dot(x)` (the same
        float32 sums), for the rows `head.rows` wants (others: 0)."""
        from model.kernels import qargmax

        tiles = (self.wt, self.scale, self.offset, self.bound, self.tile)
        return qargmax(x, tiles, head.q, head.so, head.group, self.offsets, head.rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """Quantized matrices a decode step reads instead of the float32 ones: `embed` (the tied
    head, or None) and per layer {name: QWeight} for q, k, v, o, gate, up, down (absent: the
    float32 weight); q, k and v with one group size are one matrix "qkv" (their rows stacked),
    and gate and up "gate_up", so each is one kernel call. `attention` (static): the step's
    attention core runs in the native kernel too (`kernels.decode_attention`). `argmax`: the
    head's `ArgmaxTiles`, for steps whose every row is greedy (`with_argmax`)."""

    embed: QWeight | None
    layers: tuple[dict[str, QWeight], ...]
    attention: bool = dataclasses.field(default=True, metadata=dict(static=True))
    argmax: ArgmaxTiles | None = None

    def with_argmax(self) -> "DecodeWeights":
        """These weights with the head's `ArgmaxTiles` (needs `embed`)."""
        return dataclasses.replace(self, argmax=ArgmaxTiles.of(self.embed))

    def for_rows(self, rows: jax.Array) -> "DecodeWeights":
        """The same matrices for a step whose rows of x are wanted only where `rows` (bool [M]:
        a decode step's active slots): the others are skipped (a wave's finished rows cost
        nothing) and give zeros."""
        def per(w: QWeight | None) -> QWeight | None:
            return None if w is None else dataclasses.replace(w, rows=rows)

        return dataclasses.replace(self, embed=per(self.embed), layers=tuple(
            {k: per(w) for k, w in layer.items()} for layer in self.layers))


def gguf_order(name: str, w: np.ndarray) -> np.ndarray:
    """Our parameter `name` ("embed", "q", "o", "down", ...) in GGUF's [out, in] order: q/k/v
    [D, H, Dh] -> [H*Dh, D], o [H, Dh, D] -> [D, H*Dh]; embed and the MLP's are stored so."""
    if name in ("q", "k", "v"):
        return w.reshape(w.shape[0], -1).T
    if name == "o":
        return w.reshape(-1, w.shape[-1]).T
    return w


def _gguf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `gguf_order` gives our parameter `name` of this shape."""
    if name in ("q", "k", "v"):
        return (math.prod(shape[1:]), shape[0])
    if name == "o":
        return (shape[-1], math.prod(shape[:-1]))
    return tuple(shape)


def codes_exact(q: jax.Array, so: jax.Array, w: jax.Array) -> jax.Array:
    """Whether codes q [N, K] with so [N, K / G, 2] give w [N, K] (GGUF order) exactly."""
    n, k = q.shape
    g = k // so.shape[1]
    deq = so[..., :1] * q.reshape(n, k // g, g).astype(jnp.float32) + so[..., 1:]
    return jnp.array_equal(deq.reshape(n, k), w)


@functools.partial(jax.jit, static_argnames="leaf")
def _same(q: jax.Array, so: jax.Array, w: jax.Array, leaf: str) -> jax.Array:
    """`codes_exact` against our parameter `leaf` w, in our layout."""
    return codes_exact(q, so, gguf_order(leaf, w))


def decode_weights(codes: dict[str, Codes], params: Any, attention: bool = True,
                   checked: bool = False,
                   on_checked: Callable[[dict[str, Codes]], None] | None = None
                   ) -> DecodeWeights:
    """DecodeWeights (device arrays) of the codes that give `params`' float32 weights exactly;
    a tensor whose codes do not (another file, bf16 parameters) keeps its float32 path.
    `checked`: the codes passed that check before (cached by `on_checked`, which gets the
    codes that pass when they were checked here, FUSED groups already stacked, so a later
    engine places them as they are: "layers.3.qkv" names one)."""
    host: list[dict[str, Codes]] = [{} for _ in params["layers"]]  # checked, not yet placed
    embed, dropped, good = None, [], {}
    for name, (q, so, group) in codes.items():
        leaf = name.split(".")[-1]
        layer = None if name == "embed" else params["layers"][int(name.split(".")[1])]
        ws = [params[name]] if layer is None else [layer.get(p) for p in FUSED.get(leaf, [leaf])]
        if (any(w is None or w.dtype != jnp.float32 for w in ws)
                or _stacked_shape(leaf, [w.shape for w in ws]) != q.shape
                or not (checked or (leaf not in FUSED and bool(_same(q, so, ws[0], leaf))))):
            dropped.append(name)
            continue
        good[name] = codes[name]
        if layer is None:
            embed = QWeight(jax.device_put(q), jax.device_put(so), group)
        else:
            host[int(name.split(".")[1])][leaf] = (q, so, group)
    fused = [_fuse(layer) for layer in host]
    if on_checked is not None and not checked and good:
        on_checked({**({"embed": good["embed"]} if "embed" in good else {}),
                    **{f"layers.{i}.{k}": c for i, layer in enumerate(fused)
                       for k, c in layer.items()}})
    layers = tuple({k: QWeight(jax.device_put(q), jax.device_put(so), g)
                    for k, (q, so, g) in layer.items()} for layer in fused)
    if dropped:
        log.warning("%d of %d quantized tensors do not give the loaded weights exactly (first: "
                    "%s); they keep float32 in decode", len(dropped), len(codes), dropped[0])
    return DecodeWeights(embed, layers, attention)


def _stacked_shape(leaf: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The GGUF-order shape of our parameter `leaf` (one shape), or of a FUSED group's stacked
    matrix (its parts' shapes, in FUSED order)."""
    parts = [_gguf_shape(p, s) for p, s in zip(FUSED.get(leaf, [leaf]), shapes)]
    if len({k for _, k in parts}) != 1:
        return ()
    return (sum(n for n, _ in parts), parts[0][1])


# Matrices that multiply the same input, stacked along their output rows into one.
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def _fuse(layer: dict[str, Codes]) -> dict[str, Codes]:
    """The layer's host codes with each FUSED group whose parts are all quantized with one
    group size replaced by its stacked matrix (stacked on the host: one copy to the device)."""
    out = dict(layer)
    for name, parts in FUSED.items():
        ws = [out.get(p) for p in parts]
        if all(w is not None for w in ws) and len({w[2] for w in ws}) == 1:
            out[name] = (np.concatenate([np.asarray(w[0]) for w in ws]),
                         np.concatenate([np.asarray(w[1]) for w in ws]), ws[0][2])
            for p in parts:
                del out[p]
    return out


def nbytes(dw: Any) -> int:
    """Bytes of a DecodeWeights' arrays."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(dw))
