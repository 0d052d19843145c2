"""Rebuilds a SentencePiece model (ModelProto) from a GGUF file's `tokenizer.ggml.*` metadata.

llama.cpp's converter stores a SentencePiece vocabulary as three parallel arrays (piece text,
score, token type) plus the special ids. GGUF token types use SentencePiece's own numbering
(1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), so the pieces go back
unchanged, with three deliberate edits:

* the unknown token is typed UNKNOWN (the converter types Gemma's `<unk>` as control, and
  SentencePiece needs exactly one UNKNOWN piece);
* user-defined pieces that look like control markers (`<start_of_image>`, `[multimodal]`, Gemma
  1/2's `<start_of_turn>`: a `<...>` name with an underscore, or a bracketed word) become CONTROL.
  SentencePiece matches user-defined pieces inside text, so leaving them would let text typed by
  a user inject them; control pieces are never matched in text. Whitespace runs and HTML tags
  stay user-defined, as in the original model;
* user-defined pieces get back the U+2581 the converter turned into spaces;
* the normalizer is Gemma's: no Unicode normalization, no dummy prefix (unless the GGUF says
  `add_space_prefix`), runs of spaces kept, spaces written as U+2581.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from model.errors import CheckpointError

# GGUF / SentencePiece token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_MARKER = re.compile(r"<[^<>\s]*_[^<>\s]*>|\[[A-Za-z_]+\]")
_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def is_marker_piece(piece: str) -> bool:
    """True for user-defined pieces that act as control markers rather than text."""
    return _MARKER.fullmatch(piece) is not None


def build_sp_model_proto(
    tokens: Sequence[str],
    scores: Sequence[float] | None,
    token_types: Sequence[int] | None,
    *,
    unk_id: int | None = 3,
    bos_id: int | None = 2,
    eos_id: int | None = 1,
    pad_id: int | None = 0,
    add_space_prefix: bool = False,
    where: str = "GGUF",
) -> bytes:
    """Returns a serialized SentencePiece ModelProto (BPE, byte fallback) for a vocabulary.

    Args:
      tokens: [V] piece strings (spaces as U+2581, bytes as `<0xXX>`).
      scores: [V] merge scores (higher merges first); None = all zero.
      token_types: [V] GGUF token types; None = all normal.
      unk_id / bos_id / eos_id / pad_id: special ids (None or -1 = absent).
      add_space_prefix: whether the tokenizer prepends a space to the text (Gemma: no).
      where: file name for error messages.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    n = len(tokens)
    if n == 0:
        raise CheckpointError(
            f"{where}: tokenizer.ggml.tokens is empty; the file has no vocabulary")
    scores = [0.0] * n if scores is None else list(scores)
    types = [NORMAL] * n if token_types is None else [int(t) for t in token_types]
    if len(scores) != n or len(types) != n:
        raise CheckpointError(
            f"{where}: tokenizer arrays disagree in length (tokens {n}, scores {len(scores)}, "
            f"types {len(types)}); the file is corrupt"
        )

    def _id(i: int | None) -> int:
        return -1 if i is None or i < 0 or i >= n else int(i)

    unk, bos, eos, pad = _id(unk_id), _id(bos_id), _id(eos_id), _id(pad_id)
    if unk < 0:  # SentencePiece needs an unknown piece: take one typed UNKNOWN, else "<unk>"
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), -1)
        if unk < 0 and "<unk>" in tokens:
            unk = list(tokens).index("<unk>")
    if unk < 0:
        raise CheckpointError(f"{where}: the vocabulary has no unknown token; cannot build it")

    m = sp_pb2.ModelProto()
    seen: set[str] = set()
    has_bytes = False
    for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
        if i == unk:
            typ = UNKNOWN
        elif typ == UNKNOWN:
            typ = CONTROL  # only one UNKNOWN piece is allowed
        elif typ == USER_DEFINED and is_marker_piece(piece):
            typ = CONTROL
        elif typ == USER_DEFINED and " " in piece:
            # The converter wrote U+2581 as " " in user-defined pieces (llama.cpp matches them on
            # raw text); SentencePiece matches them on normalized text, where spaces are U+2581.
            piece = piece.replace(" ", _SPACE)
        elif typ == BYTE:
            if not _BYTE_PIECE.fullmatch(piece):
                raise CheckpointError(f"{where}: byte token {i} is {piece!r}, not <0xXX>")
            has_bytes = True
        elif typ not in (NORMAL, CONTROL, USER_DEFINED, UNUSED):
            typ = NORMAL
        if i in (bos, eos, pad) and typ in (NORMAL, USER_DEFINED):
            typ = CONTROL
        if piece in seen:
            raise CheckpointError(f"{where}: token {i} {piece!r} appears twice in the vocabulary")
        seen.add(piece)
        sp = m.pieces.add()
        sp.piece = piece
        sp.score = float(score)
        sp.type = typ

    t = m.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = n
    t.byte_fallback = has_bytes
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = unk, bos, eos, pad
    t.unk_piece = tokens[unk]
    if bos >= 0:
        t.bos_piece = tokens[bos]
    if eos >= 0:
        t.eos_piece = tokens[eos]
    if pad >= 0:
        t.pad_piece = tokens[pad]
    t.allow_whitespace_only_pieces = True
    t.split_digits = True

    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(add_space_prefix)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    norm.precompiled_charsmap = b""
    return m.SerializeToString()


def sp_model_proto_from_gguf(metadata: Mapping[str, Any], where: str = "GGUF") -> bytes:
    """Builds the ModelProto from GGUF metadata (key -> value, arrays as lists).

    Raises:
      CheckpointError: the vocabulary is missing, not SentencePiece-style, or inconsistent.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
        raise CheckpointError(
            f"{where}: no tokenizer.ggml.tokens in the metadata; the file carries no tokenizer"
        )
    if kind not in (None, "llama"):
        raise CheckpointError(
            f"{where}: tokenizer.ggml.model is {kind!r}; only SentencePiece ('llama') "
            "vocabularies, as Gemma uses, are supported"
        )

    def get_id(key: str, default: int | None) -> int | None:
        v = metadata.get(f"tokenizer.ggml.{key}", default)
        return None if v is None else int(v)

    return build_sp_model_proto(
        metadata["tokenizer.ggml.tokens"],
        metadata.get("tokenizer.ggml.scores"),
        metadata.get("tokenizer.ggml.token_type"),
        unk_id=get_id("unknown_token_id", None),
        bos_id=get_id("bos_token_id", None),
        eos_id=get_id("eos_token_id", None),
        pad_id=get_id("padding_token_id", None),
        add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        where=where,
    )
