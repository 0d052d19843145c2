"""The embedded Gemma 3 270M against llama.cpp running the same GGUF (loose parity).

llama.cpp quantizes activations for its quantized matmuls, so free-running greedy text diverges
from any exact float implementation at near-ties. We compare teacher-forced instead: on the same
token sequences (20 prompts, each followed by our own 32 greedy tokens), the next-token argmax
of both at every position. Flash attention is off in llama.cpp (it changes its outputs).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from model import load_model
from model.embedded import embedded_gguf_path

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def quicksort(arr):\n",
    "The three primary colors are",
    "In 1969, the first humans",
    "import numpy as np\nx = np.arange(10)\n",
    "Le petit prince est un livre",
    "Die Hauptstadt von Deutschland ist",
    "El sol es una estrella que",
    "東京は日本の",
    "人工智能的发展",
    "Москва — столица",
    "The recipe calls for two cups of flour,",
    "Dear customer, thank you for your order.",
    "Summarize: The council approved a new park next to the river.\nSummary:",
    "Q: What is the largest planet in the solar system?\nA:",
    "<html>\n<head>\n<title>",
    "Monday, Tuesday, Wednesday,",
    "The mitochondria is the powerhouse of",
    "Once upon a time there was a dragon who",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def sequences():
    """[(tokens of prompt + our 32 greedy tokens)] and our float32 logits' argmax per position."""
    ours = load_model("gemma3-270m", dtype="float32")
    prompts = [ours.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    gens = ours.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    seqs = [p + g.tokens for p, g in zip(prompts, gens)]
    width = max(map(len, seqs))
    batch = np.zeros((len(seqs), width), np.int32)  # right padding: causal, so harmless
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    # 5 rows per call: [5, T, 262144] float32 logits stay near 300 MB.
    argmax = np.concatenate([ours.logits(batch[i : i + 5]).argmax(-1)
                             for i in range(0, len(seqs), 5)])
    return seqs, [argmax[i, : len(s)] for i, s in enumerate(seqs)]


@pytest.fixture(scope="module")
def llama():
    return llama_cpp.Llama(
        str(embedded_gguf_path()), n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True,
        flash_attn=False, n_threads=max(1, min(4, os.cpu_count() or 1)), seed=0, verbose=False)


def _llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `tokens`: float32 [T, V]."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def test_teacher_forced_argmax_agrees_with_llamacpp(sequences, llama):
    seqs, our_argmax = sequences
    agree, margins = [], []
    for tokens, ours in zip(seqs, our_argmax):
        ref = _llama_logits(llama, tokens)
        top2 = np.sort(np.partition(ref, -2, axis=-1)[:, -2:], axis=-1)  # [T, 2] ascending
        agree.append(ours == ref.argmax(-1))
        margins.append(top2[:, 1] - top2[:, 0])
    agree, margins = np.concatenate(agree), np.concatenate(margins)
    confident = margins > 0.5
    overall, conf = float(agree.mean()), float(agree[confident].mean())
    worst = float(margins[~agree].max()) if (~agree).any() else 0.0
    print(f"\nllama.cpp teacher-forced argmax agreement: {agree.sum()}/{agree.size} = "
          f"{overall:.2%} overall; {agree[confident].sum()}/{confident.sum()} = {conf:.2%} where "
          f"llama.cpp's top-2 margin > 0.5; largest margin at a disagreement {worst:.3f}")
    assert conf >= 0.99 and overall >= 0.90
