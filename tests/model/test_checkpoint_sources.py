"""model.checkpoints: `resolve` tells every kind of source apart, `check` refuses bad ones
without loading weights (and without JAX), and one rule guesses chat vs completion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoints import CheckpointError, Source, check, resolve
from model.checkpoints.source import prompt_format_of
from model.config import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]


def _dir(base: Path, name: str, files: dict[str, str]) -> Path:
    d = base / name
    d.mkdir()
    for f, text in files.items():
        (d / f).write_text(text)
    return d


def test_resolve_tells_the_kinds_apart(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    hf = _dir(tmp_path, "gemma-2b-it", {"config.json": "{}"})
    orbax = _dir(tmp_path, "rg", {"_METADATA": ""})
    assert resolve("tiny-gemma3") == Source("random", "tiny-gemma3")
    assert resolve(DEFAULT_MODEL) == Source("embedded", DEFAULT_MODEL)
    assert resolve(gguf) == Source("gguf", "m", gguf)
    assert resolve(str(hf)) == Source("hf", "gemma-2b-it", hf)
    assert resolve(orbax) == Source("orbax", "rg", orbax)


@pytest.mark.parametrize("source, words", [
    ("gemma-7b", ["'gemma-7b' ships no weights", "--model /path/to/gemma-7b"]),
    ("gs://bucket/model.gguf", ["remote model URLs are not supported"]),
    ("no-such-model", ["'no-such-model' is neither a preset", "tiny-gemma3"]),
    ("EMPTY_DIR", ["no config.json", "Orbax"]),
    ("TEXT_FILE", ["unsupported model file", ".gguf"]),
])
def test_resolve_refuses_with_one_line(source, words, tmp_path):
    if source == "EMPTY_DIR":
        source = str(_dir(tmp_path, "empty", {}))
    elif source == "TEXT_FILE":
        source = str(tmp_path / "weights.bin")
        Path(source).write_text("x")
    with pytest.raises(CheckpointError) as e:
        check(source)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_check_reads_headers_and_configs(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05" * 10)
    with pytest.raises(CheckpointError, match="truncated"):
        check(bad)
    d = _dir(tmp_path, "hf", {"config.json": "{not json"})
    with pytest.raises(CheckpointError, match="invalid JSON"):
        check(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a Gemma"):
        check(d)
    (d / "config.json").write_text(json.dumps({"model_type": "recurrent_gemma"}))
    with pytest.raises(CheckpointError, match="no 'hidden_size' field"):
        check(d)
    (d / "config.json").write_text("{}")  # no model_type: the loader reports it
    assert check(d).kind == "hf"


def test_check_does_not_import_jax(tmp_path):
    hf = _dir(tmp_path, "hf", {"config.json": json.dumps({
        "model_type": "gemma3_text", "num_hidden_layers": 2, "num_attention_heads": 2,
        "hidden_size": 64, "intermediate_size": 96, "vocab_size": 100, "sliding_window": 8})})
    orbax = _dir(tmp_path, "rg", {"_METADATA": ""})
    code = ("import sys, model\n"
            "from model import DEFAULT_MODEL, PRESETS\n"
            "from model.checkpoints import check\n"
            f"kinds = [check(s).kind for s in ('tiny-gemma3', {str(hf)!r}, {str(orbax)!r})]\n"
            "assert kinds == ['random', 'hf', 'orbax'], kinds\n"
            "assert 'jax' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("names, template, fmt", [
    (["gemma-2b-it"], False, "chat"),
    (["gemma-2-9b-it-GGUF"], False, "chat"),
    (["Gemma-7B-Instruct"], False, "chat"),
    (["gemma-2b"], False, "completion"),
    (["gemma-3-1b-pt"], True, "completion"),
    (["Some Gemma"], True, "chat"),
])
def test_one_rule_guesses_the_prompt_format(names, template, fmt):
    assert prompt_format_of(names, chat_template=template) == fmt
