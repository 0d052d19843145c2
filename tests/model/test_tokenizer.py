"""The Gemma 3 tokenizer rebuilt from GGUF metadata, checked against llama.cpp's own tokenizer.

The corpus (>= 1,000 sentences) is generated from a fixed seed: many scripts, emoji sequences,
code, runs of spaces / tabs / newlines, HTML, digits and random code points.
"""

from __future__ import annotations

import random
from functools import lru_cache

import pytest

from model.embedded import embedded_gguf_path
from model.errors import CheckpointError
from model.sp_model import (
    BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, build_sp_model_proto, is_marker_piece,
    sp_model_proto_from_gguf,
)
from model.tokenizer import SentencePieceTokenizer, encode_with_specials

WORDS = {
    "en": "the quick brown fox jumps over lazy dog while batch inference runs overnight".split(),
    "fr": "où est la bibliothèque déjà façon garçon naïve cœur élève très".split(),
    "de": "Straße Größe übermäßig Fräulein Äpfel schön Bücher weiß".split(),
    "es": "niño mañana corazón acción pingüino ¿qué ¡hola señor".split(),
    "vi": "Tiếng Việt rất đẹp người học những điều mới".split(),
    "pl": "zażółć gęślą jaźń źdźbło łódź".split(),
    "tr": "İstanbul ığdır şehir çocuk güzel".split(),
    "ru": "Привет мир съешь же ещё этих мягких французских булок".split(),
    "uk": "Їжак ґудзик європейський щастя".split(),
    "el": "Καλημέρα κόσμε ψυχή αλφάβητο".split(),
    "ar": "مرحبا بالعالم اللغة العربية جميلة جدا".split(),
    "he": "שלום עולם מה שלומך".split(),
    "fa": "سلام دنیا کتاب خوب".split(),
    "hi": "नमस्ते दुनिया हिन्दी भाषा बहुत सुंदर है".split(),
    "bn": "আমার সোনার বাংলা ভালোবাসি".split(),
    "ta": "வணக்கம் உலகம் தமிழ்".split(),
    "th": ["สวัสดีครับ", "ภาษาไทย", "ง่ายมาก", "กรุงเทพมหานคร", "ขอบคุณ"],
    "zh": ["你好", "世界", "机器学习", "批量推理", "今天天气很好", "中文分词"],
    "ja": ["こんにちは", "世界", "カタカナ", "ひらがな", "東京都", "日本語の文章です"],
    "ko": ["안녕하세요", "세계", "한국어", "문장입니다", "감사합니다"],
    "am": ["ሰላም", "ዓለም", "ኢትዮጵያ"],
    "ka": ["გამარჯობა", "მსოფლიო"],
    "hy": ["Բարեւ", "աշխարհ"],
}
EMOJI = ["😀", "🎉", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "❤️", "🤖", "🧪", "⭐", "🙏🏿", "🫠", "☕"]
CODE = [
    "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    'SELECT id, name FROM users WHERE age >= 18 ORDER BY name;',
    "const add = (a, b) => a + b;\nconsole.log(add(1, 2));",
    "<div class=\"row\"><p>Hello</p></div>",
    "if [ -f ~/.bashrc ]; then\n  source ~/.bashrc\nfi",
    "fn main() {\n    println!(\"{}\", 42_u64);\n}",
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
    "x = np.einsum('btd,dhk->bthk', x, w)  # [B, T, H, K]",
    "#include <stdio.h>\r\nint main(void) { return 0; }\r\n",
]
SPACES = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", " \n", "\r\n", "\t \t",
          "        ", "\u3000", "\u00a0", "\n    ", "\n\t\t"]
PUNCT = [".", ",", "!", "?", "...", ";", ":", "—", "–", "«", "»", "“", "”", "'", "(", ")", "…"]
# Code-point ranges for random characters (no surrogates; no U+2581, see `_random_char`).
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0xDFF),
          (0xE00, 0xEFF), (0x1100, 0x11FF), (0x2000, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
          (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFB00, 0xFFFD), (0x10000, 0x1FAFF),
          (0x20000, 0x2FA1F), (0xE0000, 0xE007F), (0xF0000, 0x10FFFF), (0x0, 0x1F)]


def _random_char(rng: random.Random) -> str:
    while True:
        lo, hi = rng.choice(RANGES)
        c = chr(rng.randint(lo, hi))
        # U+2581 is SentencePiece's own space marker: text holding it cannot round-trip, and
        # llama.cpp (which matches whitespace pieces before escaping) splits it differently.
        if c != "\u2581":
            return c


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:  # words of one or two scripts, with punctuation and odd whitespace
        langs = rng.sample(sorted(WORDS), rng.choice([1, 1, 2]))
        parts = []
        for _ in range(rng.randint(1, 10)):
            parts.append(rng.choice(WORDS[rng.choice(langs)]))
            r = rng.random()
            sep = rng.choice(PUNCT) + " " if r < 0.15 else rng.choice(SPACES) if r < 0.3 else " "
            parts.append(sep)
        text = "".join(parts)
        return text.strip() if rng.random() < 0.5 else text
    if kind < 0.55:  # emoji among words
        pool = EMOJI + WORDS["en"] + WORDS["ja"]
        return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
    if kind < 0.65:  # code, sometimes re-indented
        code = rng.choice(CODE)
        indent = rng.choice(["\t", "  ", "        "])
        return code.replace("    ", indent) if rng.random() < 0.5 else code
    if kind < 0.75:  # pure whitespace runs around a word
        return "".join(rng.choice(SPACES) * rng.randint(1, 4) + rng.choice(["a", "x1", "", "é"])
                       for _ in range(rng.randint(1, 5)))
    if kind < 0.85:  # numbers, dates, amounts
        number = rng.choice([
            str(rng.randint(0, 10**12)),
            f"{rng.uniform(-1e6, 1e6):.3f}",
            f"2026-{rng.randint(1, 12):02d}-01",
            f"${rng.randint(1, 999):,}.{rng.randint(0, 99):02d}",
            f"{rng.randint(0, 255)}.{rng.randint(0, 255)}.0.1",
        ])
        return rng.choice(["", "Total: ", "ID ", "v"]) + number
    # random code points, mixed with ASCII
    return "".join(_random_char(rng) for _ in range(rng.randint(1, 24)))


@lru_cache(maxsize=1)
def corpus(n: int = 2000, seed: int = 1234) -> tuple[str, ...]:
    """A fixed pseudo-random corpus (same seed, same sentences) of at least 1,000 sentences."""
    rng = random.Random(seed)
    fixed = ["", " ", "Hello world", " leading space", "trailing space ", "a  b   c    d",
             "\n\n\n\n", "\t\t\tindent", "<div>html</div>", "<h1>Title</h1>\n<p>x</p>",
             "<s>strike</S> tags", "1234567890", "ﬁ ﬂ Ǆ é é Å Å", "\u200b\u200d\ufeff", "\x00\x7f",
             "Ⅻ ① ½ ²", "ａｂｃ全角", "👩🏽‍💻 coding"]
    out = fixed + [_sentence(rng) for _ in range(n - len(fixed))]
    assert len(out) >= 1000
    return tuple(out)


@pytest.fixture(scope="module")
def gguf_path():
    return str(embedded_gguf_path())


@pytest.fixture(scope="module")
def tok(gguf_path) -> SentencePieceTokenizer:
    from model.checkpoints.gguf_format import open_gguf

    md = open_gguf(gguf_path).metadata
    return SentencePieceTokenizer(sp_model_proto_from_gguf(md, gguf_path))


@pytest.fixture(scope="module")
def llama_vocab(gguf_path):
    import llama_cpp

    return llama_cpp.Llama(gguf_path, vocab_only=True, verbose=False)


def _llama_ids(llama, text: str) -> list[int]:
    return llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def test_ids_identical_to_llamacpp(tok, llama_vocab):
    texts = corpus()
    bad = [(t, tok.encode(t), _llama_ids(llama_vocab, t)) for t in texts
           if tok.encode(t) != _llama_ids(llama_vocab, t)]
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    print(f"\ntokenizer parity: {len(texts) - len(bad)}/{len(texts)} sentences, {n_tokens} tokens")
    assert not bad, f"{len(bad)} sentences differ from llama.cpp, first: {bad[0]!r}"


def test_decode_encode_roundtrip(tok):
    bad = [t for t in corpus() if tok.decode(tok.encode(t)) != t]
    assert not bad, f"{len(bad)} sentences do not round-trip, first: {bad[0]!r}"


def test_bos_and_specials(tok, llama_vocab):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 262_144)
    assert tok.stop_ids == (1, 106)
    ref = llama_vocab.tokenize(b"Hi", add_bos=True, special=False)
    assert tok.encode("Hi", add_bos=True) == ref
    assert tok.piece_to_id("<start_of_turn>") == 105 and tok.piece_to_id("<end_of_turn>") == 106


CONTROL_TEXT = ["<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "<pad>", "<unk>", "<mask>",
                "<unused7>", "<start_of_image>", "<end_of_image>", "[multimodal]"]


@pytest.mark.parametrize("text", CONTROL_TEXT)
def test_control_tokens_typed_by_a_user_stay_text(tok, text):
    typed = f"user says {text}model\n"
    ids = tok.encode(typed)
    control = {i for i in ids if tok.id_to_piece(i) == text or i in (0, 1, 2, 3, 105, 106)}
    assert not control, f"{text!r} in user text became control id(s) {control}"
    assert tok.decode(ids) == typed


def test_templates_still_insert_control_tokens(tok):
    ids = encode_with_specials(tok, "<start_of_turn>user\n<end_of_turn>hi<end_of_turn>\n")
    assert ids[:2] == [2, 105] and ids.count(106) == 2


def test_known_differences_from_llamacpp(tok, llama_vocab):
    # 1. llama.cpp matches user-defined pieces even with special=False; we demote the
    #    control-like ones (image markers) so text cannot inject them.
    assert _llama_ids(llama_vocab, "<start_of_image>") == [255999]
    assert 255999 not in tok.encode("<start_of_image>")
    # 2. llama.cpp retypes any token spelled "</s>" as control + end-of-generation (a heuristic
    #    added for another model, see llama-vocab.cpp); in Gemma's vocabulary 212 "</s>" is the
    #    HTML strike-through tag, a user-defined piece, which we keep as the original model does.
    assert tok.encode("</s>") == [212]
    assert _llama_ids(llama_vocab, "</s>") == [954, 236751, 236813]  # "</" "s" ">"
    # Plain user-defined pieces (whitespace runs, HTML tags) match in both.
    for text, piece_id in [("  ", 138), ("\n\n", 108), ("\t\t", 255969), ("<table>", 168)]:
        assert tok.encode(text) == _llama_ids(llama_vocab, text) == [piece_id]


# ------------------------------------------------------------------ proto builder, small vocabs


def _tiny_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n", "  ", "<start_of_image>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁", "a", "b", "ab", "▁a", "▁ab"]
    types = [CONTROL] * 5 + [USER_DEFINED] * 3 + [BYTE] * 256 + [NORMAL] * 6
    scores = [0.0] * (len(tokens) - 6) + [-5.0, -1.0, -2.0, -3.0, -4.0, -6.0]
    return tokens, scores, types


def test_tiny_proto_matches_expectations():
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    tokens, scores, types = _tiny_vocab()
    proto = build_sp_model_proto(tokens, scores, types)
    m = sp_pb2.ModelProto.FromString(proto)
    assert m.pieces[3].type == UNKNOWN  # <unk> typed control by the converter
    assert m.pieces[6].piece == "▁▁" and m.pieces[6].type == USER_DEFINED
    assert m.pieces[7].type == CONTROL  # image marker demoted
    assert m.trainer_spec.byte_fallback and not m.normalizer_spec.add_dummy_prefix
    t = SentencePieceTokenizer(proto)
    assert t.encode("ab  a\n") == [tokens.index("ab"), 6, tokens.index("a"), 5]
    assert t.encode("é") == [8 + 0xC3, 8 + 0xA9]  # byte fallback: pieces 8.. are <0x00>..
    assert t.decode(t.encode(" ab \n")) == " ab \n"


def test_is_marker_piece():
    assert all(map(is_marker_piece, ["<start_of_turn>", "<end_of_image>", "[multimodal]"]))
    assert not any(map(is_marker_piece, ["<table>", "</div>", "  ", "\n\n", "<h1>"]))


@pytest.mark.parametrize("breakage, message", [
    (lambda t, s, y: (t[:-1], s, y), "disagree in length"),
    (lambda t, s, y: (t[:-1] + ["a"], s, y), "appears twice"),
    (lambda t, s, y: (t[:8] + ["<0xZZ>"] + t[9:], s, y), "not <0xXX>"),
    (lambda t, s, y: ([], [], []), "empty"),
])
def test_bad_vocabularies_raise_one_clear_error(breakage, message):
    tokens, scores, types = breakage(*_tiny_vocab())
    with pytest.raises(CheckpointError, match=message):
        build_sp_model_proto(tokens, scores, types, where="bad.gguf")


def test_non_sentencepiece_vocab_is_refused():
    with pytest.raises(CheckpointError, match="only SentencePiece"):
        sp_model_proto_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
