"""GGUF (llama.cpp) checkpoints of Gemma 1/2/3: config, float weights and tokenizer.

`load_gguf(path)` parses the header (our small reader; tensor types and block sizes from the
`gguf` package), takes the config from the metadata, dequantizes every tensor (Q4_K, Q5_0, Q6_K,
Q8_0, F16, BF16, F32, ... through `gguf.quants.dequantize`), maps llama.cpp's names and
conventions onto our parameter tree and rebuilds the SentencePiece tokenizer. The dequantized
float32 tree is cached on disk (one safetensors file keyed by the GGUF's content) so a reload
takes seconds.

llama.cpp conventions undone here:
* the converter stores every RMSNorm weight as `1 + w` (HF Gemma applies `1 + w` at run time,
  llama.cpp bakes it in): we subtract 1;
* 2-D weights are stored [out, in] in numpy order (`attn_q` [H*Dh, D], `attn_output` [D, H*Dh],
  `ffn_down` [D, F]); we transpose and split the heads;
* Gemma's RoPE is already the "rotate half" (NeoX) layout in llama.cpp, so q/k rows are not
  permuted (unlike llama-architecture files).
Things llama.cpp hard-codes for Gemma 3 rather than storing: the local RoPE base (10,000) and
the 5-local-to-1-global layer pattern; we use the metadata when a newer file carries them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from model.config import GemmaConfig, gemma2_layer_types, gemma3_layer_types
from model.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_CACHE_FORMAT = "gemma-batch-gguf-f32-v1"  # bump when the mapping below changes

# llama.cpp per-layer tensor name -> (our name, is an RMSNorm weight stored as 1 + w).
_LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("attn_norm", True),
    "attn_q": ("q", False),
    "attn_k": ("k", False),
    "attn_v": ("v", False),
    "attn_output": ("o", False),
    "attn_q_norm": ("q_norm", True),
    "attn_k_norm": ("k_norm", True),
    "post_attention_norm": ("post_attn_norm", True),
    "ffn_norm": ("ffw_norm", True),
    "ffn_gate": ("gate", False),
    "ffn_up": ("up", False),
    "ffn_down": ("down", False),
    "post_ffw_norm": ("post_ffw_norm", True),
}
_OPTIONAL = {"q_norm", "k_norm", "post_attn_norm", "post_ffw_norm"}


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: numpy-order shape (GGUF lists dims innermost first)."""

    name: str
    shape: tuple[int, ...]  # e.g. attn_q: (H*Dh, D)
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF header plus a read-only memory map of the whole file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data: np.ndarray  # uint8 memmap of the file

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        return self.data[t.offset : t.offset + t.nbytes]


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from a byte buffer; running past its end raises _Truncated."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise _Truncated
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        v = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return v

    def value(self, vtype: int) -> Any:
        if vtype == 8:  # string
            return self.string()
        if vtype == 9:  # array: element type, count, elements
            etype, count = self.take("<I"), self.take("<Q")
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype == 9:
                return [self.value(9) for _ in range(count)]
            if etype not in self._NUMPY:
                raise ValueError(f"unknown array element type {etype}")
            dt = np.dtype(self._NUMPY[etype])
            if self.pos + count * dt.itemsize > len(self.buf):
                raise _Truncated
            arr = np.frombuffer(self.buf, dt, count, self.pos)
            self.pos += count * dt.itemsize
            return (arr != 0).tolist() if etype == 7 else arr.tolist()
        if vtype not in self._SCALARS:
            raise ValueError(f"unknown value type {vtype}")
        return self.take(self._SCALARS[vtype])


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses a GGUF header (metadata + tensor table) and checks every tensor lies in the file.

    A small reader of our own: `gguf.GGUFReader` builds a numpy view per array element, which
    takes tens of seconds on a 262k-token vocabulary; this reads the same layout in well under
    a second. Quantization types and block sizes still come from the `gguf` package.

    Raises:
      CheckpointError: missing file, not GGUF, truncated or corrupt header or tensor data.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "pass a .gguf produced by llama.cpp's converter"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    cur.pos = 4
    try:
        version = cur.take("<I")
        if version not in (2, 3):
            raise CheckpointError(
                f"{path}: GGUF version {version} is not supported (2 and 3 are; a huge number "
                "means a big-endian file); convert it again with a current llama.cpp"
            )
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
        md: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            md[key] = cur.value(cur.take("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = [cur.take("<Q") for _ in range(n_dims)]
            raw_infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    except _Truncated:
        raise CheckpointError(
            f"{path} is truncated: the file ends inside its header ({size} bytes); "
            "download or assemble the file again"
        ) from None
    except (ValueError, OverflowError) as e:
        raise CheckpointError(
            f"{path} is corrupt: its header does not parse ({e}); download or assemble the "
            "file again"
        ) from None
    align = int(md.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = []
    for name, dims, qt, off in raw_infos:
        try:
            qtype = GGMLQuantizationType(qt)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(
                f"{path}: tensor {name} has quantization type {qt}, unknown to the installed "
                "gguf package; upgrade it: pip install -U gguf"
            ) from None
        n = int(np.prod(dims)) if dims else 1
        if dims and dims[0] % block:
            raise CheckpointError(f"{path} is corrupt: tensor {name} rows of {dims[0]} do not "
                                  f"fill {qtype.name} blocks of {block}")
        info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, start + int(off),
                          n // block * type_size)
        if info.offset + info.nbytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} needs bytes up to "
                f"{info.offset + info.nbytes} but the file has {size}; download or assemble "
                "the file again"
            )
        tensors.append(info)
    md["GGUF.version"] = version
    return GGUFFile(path, version, md, tensors, data)


# ----------------------------------------------------------------------------- config


def _uniform(value: Any, key: str, where: str) -> int:
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise CheckpointError(
                f"{where}: {key} varies per layer ({value[:8]}...); only uniform layers are "
                "supported"
            )
        value = value[0]
    return int(value)


def config_from_metadata(
    md: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], where: str = "GGUF"
) -> GemmaConfig:
    """Builds a GemmaConfig from GGUF metadata plus tensor shapes (numpy order)."""
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{where}: general.architecture is {arch!r}; gemma-batch reads GGUF files of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} only; pass a Gemma GGUF or a Hugging Face "
            "checkpoint directory"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise CheckpointError(
                f"{where}: metadata key {full} is missing; the file is incomplete")
        return md[full]

    def opt(key: str, default: Any) -> Any:
        return md.get(f"{arch}.{key}", default)

    d_model = int(need("embedding_length"))
    num_layers = int(need("block_count"))
    num_heads = _uniform(need("attention.head_count"), "attention.head_count", where)
    num_kv_heads = _uniform(opt("attention.head_count_kv", num_heads), "head_count_kv", where)
    head_dim = int(opt("attention.key_length", d_model // num_heads))
    ffw_dim = _uniform(need("feed_forward_length"), "feed_forward_length", where)
    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{where}: tensor token_embd.weight is missing")
    vocab_size = int(tensor_shapes["token_embd.weight"][0])

    window = opt("attention.sliding_window", None)
    pattern = opt("attention.sliding_window_pattern", None)
    if arch == "gemma":
        layer_types = ("global",) * num_layers
        window = None
    elif isinstance(pattern, list) and len(pattern) == num_layers:
        # Newer files list per layer whether it uses the sliding window.
        layer_types = tuple("local" if p else "global" for p in pattern)
    elif arch == "gemma2":
        layer_types = gemma2_layer_types(num_layers)
        window = window or 4096
    else:  # gemma3; llama.cpp hard-codes a period of 6 (5 local, 1 global)
        period = int(pattern) if isinstance(pattern, (int, float)) and pattern else 6
        layer_types = gemma3_layer_types(num_layers, period)
    if "local" in layer_types and not window:
        raise CheckpointError(
            f"{where}: {arch} has sliding-window layers but no {arch}.attention.sliding_window")

    rope_base = float(opt("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0))
    rope_local = float(opt("rope.freq_base_swa", 10_000.0)) if arch == "gemma3" else rope_base
    scale = 1.0
    if opt("rope.scaling.type", "none") == "linear":
        scale = float(opt("rope.scaling.factor", 1.0))
    # llama.cpp scales queries by head_dim ** -0.5, except for the 27B models, which use
    # (d_model / num_heads) ** -0.5 (they have head_dim 128 but d_model / heads 144 or 168).
    is_27b = (arch, num_layers) in (("gemma2", 46), ("gemma3", 62))
    qscale = float(d_model // num_heads if is_27b else head_dim)

    def softcap(key: str) -> float | None:
        v = opt(key, None)
        return float(v) if v else None

    tokens = md.get("tokenizer.ggml.tokens") or []
    eot = tokens.index("<end_of_turn>") if "<end_of_turn>" in tokens else None
    return GemmaConfig(
        family=arch,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        ffw_dim=ffw_dim,
        layer_types=layer_types,
        sliding_window=int(window) if window else None,
        rope_base_global=rope_base,
        rope_base_local=rope_local,
        rope_scale_global=scale,
        query_pre_attn_scalar=qscale,
        attn_softcap=softcap("attn_logit_softcapping"),
        final_softcap=softcap("final_logit_softcapping"),
        post_norms="blk.0.post_attention_norm.weight" in tensor_shapes,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        # float32 in the file: 1e-6 reads back as 9.99999997e-07; keep 7 significant digits
        rms_eps=float(f"{float(opt('attention.layer_norm_rms_epsilon', 1e-6)):.7g}"),
        max_seq_len=int(opt("context_length", 8192)),
        bos_id=int(md.get("tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(md.get("tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(md.get("tokenizer.ggml.padding_token_id", 0)),
        end_of_turn_id=eot,
    )


def checkpoint_info(md: dict[str, Any], tensors: list[TensorInfo], where: str) -> dict[str, Any]:
    """What we learn about the checkpoint: name, quantization, instruction-tuned or base."""
    name = str(md.get("general.name") or Path(where).stem)
    finetune = str(md.get("general.finetune") or "")
    template = md.get("tokenizer.chat_template")
    words = set(re.split(r"[^a-z0-9]+", f"{name} {finetune} {Path(where).stem}".lower()))
    if words & {"it", "instruct", "chat"}:
        tuned = True
    elif words & {"pt", "base", "pretrained"}:
        tuned = False
    else:  # no word either way: a chat template is the best sign left
        tuned = bool(template)
    return {
        "name": name,
        "architecture": md.get("general.architecture"),
        "size_label": md.get("general.size_label"),
        "file_type": md.get("general.file_type"),
        "tensor_types": dict(Counter(t.qtype.name for t in tensors)),
        "instruction_tuned": tuned,
        "prompt_format": "chat" if tuned else "completion",
        "chat_template": bool(template),
        "source": "gguf",
    }


# ----------------------------------------------------------------------------- weights


def _dequantize(g: GGUFFile, t: TensorInfo) -> np.ndarray:
    """float32 array in numpy order, e.g. attn_q [H*Dh, D]."""
    from gguf.quants import dequantize

    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    raw = np.asarray(g.tensor_bytes(t)).reshape(rows, -1)  # [rows, bytes per row]
    try:
        arr = dequantize(raw, t.qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{g.path}: tensor {t.name} uses quantization {t.qtype.name}, which the installed "
            "gguf package cannot dequantize; upgrade it: pip install -U gguf"
        ) from None
    return np.ascontiguousarray(arr.reshape(t.shape), dtype=np.float32)


def _map_tensors(g: GGUFFile, cfg: GemmaConfig, where: str) -> dict[str, np.ndarray]:
    """Dequantizes and maps every tensor onto flat names of our tree ("layers.3.q", ...)."""
    d, h, k, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim
    expected: dict[str, tuple[int, ...]] = {
        "q": (d, h, dh), "k": (d, k, dh), "v": (d, k, dh), "o": (h, dh, d),
        "gate": (d, f), "up": (d, f), "down": (f, d),
        "attn_norm": (d,), "ffw_norm": (d,), "post_attn_norm": (d,), "post_ffw_norm": (d,),
        "q_norm": (dh,), "k_norm": (dh,),
    }
    flat: dict[str, np.ndarray] = {}
    layer_re = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
    for t in g.tensors:
        w = _dequantize(g, t)
        if t.name == "token_embd.weight":
            flat["embed"] = w  # [V, D]
            continue
        if t.name == "output_norm.weight":
            flat["final_norm"] = w - 1.0
            continue
        if t.name == "output.weight":
            continue  # Gemma ties the output projection to the embedding
        m = layer_re.fullmatch(t.name)
        if not m or m.group(2) not in _LAYER_TENSORS:
            continue  # e.g. rope_freqs: nothing our model needs
        i = int(m.group(1))
        name, is_norm = _LAYER_TENSORS[m.group(2)]
        if name == "q":  # [H*Dh, D] -> [D, H, Dh]
            w = w.T.reshape(d, h, dh)
        elif name in ("k", "v"):  # [K*Dh, D] -> [D, K, Dh]
            w = w.T.reshape(d, k, dh)
        elif name == "o":  # [D, H*Dh] -> [H, Dh, D]
            w = w.T.reshape(h, dh, d)
        elif name in ("gate", "up", "down"):  # [out, in] -> [in, out]
            w = w.T
        elif is_norm:
            w = w - 1.0
        if w.shape != expected[name]:
            raise CheckpointError(
                f"{where}: tensor {t.name} has shape {w.shape} after mapping, expected "
                f"{expected[name]} from the metadata; the file is inconsistent"
            )
        flat[f"layers.{i}.{name}"] = np.ascontiguousarray(w, dtype=np.float32)
    if "embed" in flat and flat["embed"].shape != (cfg.vocab_size, d):
        raise CheckpointError(
            f"{where}: token_embd has shape {flat['embed'].shape}, expected [V, {d}]")
    needed = ["embed", "final_norm"] + [
        f"layers.{i}.{n}"
        for i in range(cfg.num_layers)
        for n, _ in _LAYER_TENSORS.values()
        if n not in _OPTIONAL
        or (n in ("q_norm", "k_norm") and cfg.qk_norm)
        or (n.startswith("post_") and cfg.post_norms)
    ]
    missing = [n for n in needed if n not in flat]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensors are missing (first: {missing[0]}); the file is "
            "incomplete"
        )
    return flat


def unflatten(flat: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Flat names ("layers.3.q") -> the nested parameter tree of model/transformer.py."""
    layers: list[dict[str, Any]] = [{} for _ in range(num_layers)]
    tree: dict[str, Any] = {"layers": layers}
    for name, w in flat.items():
        if name.startswith("layers."):
            _, i, leaf = name.split(".")
            layers[int(i)][leaf] = w
        else:
            tree[name] = w
    return tree


# ----------------------------------------------------------------------------- cache


def _content_key(path: Path) -> str:
    """A cheap content key: size, the first 8 MiB (header + metadata) and the last 1 MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{_CACHE_FORMAT}|{size}|".encode())
    with path.open("rb") as f:
        h.update(f.read(8 << 20))
        if size > 9 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()[:24]


def _cache_paths(path: Path) -> tuple[Path, Path]:
    from model.paths import cache_dir

    key = _content_key(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
    base = cache_dir() / "gguf-f32"
    return base / f"{stem}-{key}.safetensors", base / f"{stem}-{key}.tokenizer.model"


def _atomic_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _config_to_json(cfg: GemmaConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def _config_from_json(text: str) -> GemmaConfig:
    d = json.loads(text)
    d["layer_types"] = tuple(d["layer_types"])
    return GemmaConfig(**d)


def _read_cache(path: Path):
    """(cfg, info, flat weights, tokenizer proto) from the cache, or None if absent/damaged."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    weights_file, proto_file = _cache_paths(path)
    if not (weights_file.exists() and proto_file.exists()):
        return None
    try:
        with safe_open(weights_file, framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _CACHE_FORMAT:
            return None
        cfg = _config_from_json(meta["config"])
        info = json.loads(meta["info"])
        return cfg, info, load_file(weights_file), proto_file.read_bytes()
    except Exception:  # a damaged cache entry is rebuilt, never trusted
        return None


def _write_cache(path: Path, cfg: GemmaConfig, info: dict, flat: dict, proto: bytes) -> None:
    from safetensors.numpy import save_file

    weights_file, proto_file = _cache_paths(path)
    meta = {
        "format": _CACHE_FORMAT,
        "source": str(path),
        "config": _config_to_json(cfg),
        "info": json.dumps(info),
    }
    try:
        _atomic_write(proto_file, lambda tmp: Path(tmp).write_bytes(proto))
        _atomic_write(weights_file, lambda tmp: save_file(flat, tmp, metadata=meta))
    except OSError:
        pass  # a read-only cache only costs the dequantization next time


def read_gguf_numpy(path: str | os.PathLike, *, use_cache: bool = True):
    """Like `load_gguf` but returns flat float32 numpy weights and the tokenizer proto bytes.

    Returns:
      (config, flat: {"embed": [V, D], "layers.3.q": [D, H, Dh], ...}, proto: bytes, info).
    """
    from model.sp_model import sp_model_proto_from_gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    if use_cache:
        hit = _read_cache(path)
        if hit is not None:
            cfg, info, flat, proto = hit
            return cfg, flat, proto, info
    g = open_gguf(path)
    md = g.metadata
    shapes = {t.name: t.shape for t in g.tensors}
    where = str(path)
    cfg = config_from_metadata(md, shapes, where)
    info = checkpoint_info(md, g.tensors, where)
    proto = sp_model_proto_from_gguf(md, where)
    flat = _map_tensors(g, cfg, where)
    if use_cache:
        _write_cache(path, cfg, info, flat, proto)
    return cfg, flat, proto, info


# ----------------------------------------------------------------------------- entry point


def load_gguf(path: str | os.PathLike, dtype: Any = None, *, use_cache: bool = True):
    """Loads a Gemma GGUF checkpoint.

    Args:
      path: the .gguf file.
      dtype: parameter dtype (default float32).
      use_cache: keep / reuse the dequantized float32 tree in the gemma-batch cache.

    Returns:
      (config: GemmaConfig, params: nested dict of jax arrays, tokenizer: SentencePieceTokenizer,
       info: dict with name, architecture, tensor_types, instruction_tuned, prompt_format, ...).

    Raises:
      CheckpointError: missing / truncated / corrupt file, unknown architecture, bad shapes.
    """
    import jax.numpy as jnp

    from model.tokenizer import SentencePieceTokenizer

    cfg, flat, proto, info = read_gguf_numpy(path, use_cache=use_cache)
    tokenizer = SentencePieceTokenizer(proto)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but token_embd has "
            f"{cfg.vocab_size} rows; the file is inconsistent"
        )
    dtype = jnp.float32 if dtype is None else dtype
    # Convert one tensor at a time and drop the numpy copy, so the peak stays near one tree.
    params = unflatten({n: jnp.asarray(flat.pop(n), dtype=dtype) for n in list(flat)},
                       cfg.num_layers)
    return cfg, params, tokenizer, info
