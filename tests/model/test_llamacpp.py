"""The embedded Gemma 3 270M against llama.cpp running the same GGUF (loose parity).

llama.cpp quantizes activations for its quantized matmuls, so free-running greedy text diverges
from any exact float implementation at near-ties. We compare teacher-forced instead: on the same
token sequences (the 20 prompts of test_gguf.py, each followed by our own 32 greedy tokens), the
next-token argmax of both at every position. Flash attention is off in llama.cpp (it changes its
outputs).
"""

from __future__ import annotations

import numpy as np
import pytest

from model.embedded import embedded_gguf_path
from test_gguf import embedded_greedy_run, right_pad  # shared: one load, one generation

llama_cpp = pytest.importorskip("llama_cpp")

@pytest.fixture(scope="module")
def sequences():
    """Prompt + our 32 greedy tokens per prompt, and our float32 argmax at every position."""
    ours, _, seqs = embedded_greedy_run()
    batch = right_pad(seqs)
    # 5 rows per call: [5, T, 262144] float32 logits stay near 300 MB.
    argmax = np.concatenate([ours.logits(batch[i : i + 5]).argmax(-1)
                             for i in range(0, len(seqs), 5)])
    return seqs, [argmax[i, : len(s)] for i, s in enumerate(seqs)]


@pytest.fixture(scope="module")
def llama():
    return llama_cpp.Llama(
        str(embedded_gguf_path()), n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True,
        # One thread: llama.cpp's threads spin-wait on each other, and on a busy 2-core machine
        # two threads measured 10x slower than one.
        flash_attn=False, n_threads=1, n_threads_batch=1, seed=0, verbose=False)


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
