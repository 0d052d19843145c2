"""Tokenizers: SentencePiece for real checkpoints, bytes for the tiny random presets.

User text is never parsed for control tokens: `encode` maps `<start_of_turn>` typed by a user to
ordinary pieces. Only `encode_with_specials` (used by our own prompt templates) inserts control
tokens, and only at the places the template marks.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    """What the engine and the pipeline need from a tokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    stop_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_each(self, ids: Sequence[int]) -> list[str]: ...

    def id_to_piece(self, i: int) -> str: ...

    def piece_to_id(self, piece: str) -> int | None: ...

    def is_text(self, i: int) -> bool: ...


# Ids per SentencePiece decode call in `decode_each`.
_DECODE_CHUNK = 16384

_SPECIAL = re.compile(r"(<start_of_turn>|<end_of_turn>|<bos>|<eos>)")


def encode_with_specials(tok: Tokenizer, template: str, add_bos: bool = True) -> list[int]:
    """Encodes a prompt *template* (ours, never user text) whose control tokens are real ones.

    The template's `<start_of_turn>`, `<end_of_turn>`, `<bos>` and `<eos>` become their ids when
    the tokenizer has them; everything in between is encoded as plain text.
    """
    ids = [tok.bos_id] if add_bos else []
    for part in _SPECIAL.split(template):
        if not part:
            continue
        special = tok.piece_to_id(part) if _SPECIAL.fullmatch(part) else None
        ids.extend([special] if special is not None else tok.encode(part))
    return ids


class SentencePieceTokenizer:
    """A SentencePiece model (Gemma's), loaded from a serialized ModelProto."""

    def __init__(self, model_proto: bytes, stop_pieces: Sequence[str] = ("<end_of_turn>",)):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)
        self.model_proto = model_proto
        self.vocab_size = int(self._sp.GetPieceSize())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else 0
        stops = [self.eos_id]
        for piece in stop_pieces:
            i = self.piece_to_id(piece)
            if i is not None:
                stops.append(i)
        self.stop_ids = tuple(stops)

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # SentencePiece never matches control pieces inside text, so user-typed "<eos>" stays text.
        ids = list(self._sp.EncodeAsIds(text))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """Each id's text alone, in batched calls (the 262K-piece vocabulary: 0.3 s, not 0.8);
        SentencePiece holds the GIL in a call, so a call takes at most `_DECODE_CHUNK` ids and
        other threads run between them."""
        ids = [int(i) for i in ids]
        out: list[str] = []
        for k in range(0, len(ids), _DECODE_CHUNK):
            out.extend(self._sp.Decode([[i] for i in ids[k:k + _DECODE_CHUNK]]))
        return out

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the model proto: keys what is cached on disk about this vocabulary."""
        return hashlib.sha256(self.model_proto).hexdigest()[:24]

    def is_text(self, i: int) -> bool:
        """Whether id i stands for text (not a control, unknown or unused piece)."""
        sp = self._sp
        return not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i))

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        i = int(self._sp.PieceToId(piece))
        # PieceToId returns unk for unknown pieces; only accept an exact match.
        return i if self._sp.IdToPiece(i) == piece else None


class ByteTokenizer:
    """UTF-8 bytes as tokens, for the tiny random presets (no vocabulary file needed).

    Ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4..259 bytes 0..255; rows up to `vocab_size` unused.
    """

    OFFSET = 4

    def __init__(self, vocab_size: int = 384):
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 260, got {vocab_size}")
        self.vocab_size = vocab_size
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = 0, 1, 2, 3
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < 256 + self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    def is_text(self, i: int) -> bool:
        """Whether id i stands for text (one of the 256 bytes)."""
        return self.OFFSET <= i < 256 + self.OFFSET

    def id_to_piece(self, i: int) -> str:
        names = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"}
        if i in names:
            return names[i]
        if self.OFFSET <= i < 256 + self.OFFSET:
            return f"<0x{i - self.OFFSET:02X}>"
        return f"<unused{i}>"

    def piece_to_id(self, piece: str) -> int | None:
        return {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}.get(piece)
