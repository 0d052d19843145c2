"""The engines bench/generate.py compares us with, each loaded once and run on our token ids:
transformers `generate` (CPU torch) and llama.cpp (llama-cpp-python's low-level API).

Every peer does the same work as ours: the same prompts (token ids, BOS included), greedy,
exactly `max_new` tokens per row (no stop token), `batch` rows decoding together; the timed call
covers prefill through the last token in host memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------- HF


def build_hf(model, tmp: Path) -> Path:
    """Our Gemma 3 weights as a transformers Gemma3ForCausalLM directory (config + safetensors)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg, p = model.config, model.params
    h, k, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    types = ["full_attention" if t == "global" else "sliding_attention" for t in cfg.layer_types]
    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=cfg.ffw_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=h, num_key_value_heads=k,
        head_dim=dh, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_eps,
        sliding_window=cfg.sliding_window,
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
        layer_types=types, hidden_activation="gelu_pytorch_tanh", bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, tie_word_embeddings=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local},
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_global}},
        architectures=["Gemma3ForCausalLM"])

    def t(x) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))

    sd = {"model.embed_tokens.weight": t(p["embed"]), "model.norm.weight": t(p["final_norm"])}
    for i, L in enumerate(p["layers"]):
        a, m, n = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"model.layers.{i}."
        sd[a + "q_proj.weight"] = t(np.asarray(L["q"]).transpose(1, 2, 0).reshape(h * dh, d))
        sd[a + "k_proj.weight"] = t(np.asarray(L["k"]).transpose(1, 2, 0).reshape(k * dh, d))
        sd[a + "v_proj.weight"] = t(np.asarray(L["v"]).transpose(1, 2, 0).reshape(k * dh, d))
        sd[a + "o_proj.weight"] = t(np.asarray(L["o"]).transpose(2, 0, 1).reshape(d, h * dh))
        sd[a + "q_norm.weight"], sd[a + "k_norm.weight"] = t(L["q_norm"]), t(L["k_norm"])
        sd[m + "gate_proj.weight"] = t(np.asarray(L["gate"]))  # both [out, in]
        sd[m + "up_proj.weight"] = t(np.asarray(L["up"]))
        sd[m + "down_proj.weight"] = t(np.asarray(L["down"]))
        sd[n + "input_layernorm.weight"] = t(L["attn_norm"])
        sd[n + "post_attention_layernorm.weight"] = t(L["post_attn_norm"])
        sd[n + "pre_feedforward_layernorm.weight"] = t(L["ffw_norm"])
        sd[n + "post_feedforward_layernorm.weight"] = t(L["post_ffw_norm"])
    hf_cfg.save_pretrained(tmp)
    save_file(sd, str(tmp / "model.safetensors"))
    return tmp


class HF:
    """transformers generate on CPU torch (sdpa attention), float32 or bfloat16, loaded once."""

    def __init__(self, path: Path, dtype: str):
        import torch
        import transformers

        tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=tdtype, attn_implementation="sdpa").eval()

    def generate(self, prompts: list[list[int]], max_new: int, batch: int,
                 stop_ids: frozenset[int] | None = None) -> list[list[int]]:
        """`batch` prompts at a time (left padding); exactly `max_new` greedy tokens per row, or
        with `stop_ids` up to max_new, a row ending at (and keeping) its first stop id."""
        import torch

        out: list[list[int]] = []
        for i in range(0, len(prompts), batch):
            group = prompts[i:i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[0] * (width - len(g)) + g for g in group])
            mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group])
            with torch.inference_mode():
                stop = dict(eos_token_id=sorted(stop_ids)) if stop_ids else dict(
                    min_new_tokens=max_new)
                gen = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                    do_sample=False, pad_token_id=0, top_k=None, top_p=None, temperature=None,
                    **stop)
            out += [_cut(row, stop_ids) for row in gen[:, width:].tolist()]
        return out


def _cut(tokens: list[int], stop_ids: frozenset[int] | None) -> list[int]:
    """Tokens up to and including the first stop id (all of them without stop ids)."""
    for i, t in enumerate(tokens):
        if stop_ids and t in stop_ids:
            return tokens[:i + 1]
    return tokens


# ----------------------------------------------------------------------------------- llama.cpp


_EXTRA_BUFTS: dict[str, bool] = {}


def extra_bufts_work(gguf: Path) -> bool:
    """Whether llama.cpp's extra weight buffers (AMX, repacked Q4 layouts) run on this machine.

    On a CPU that reports AMX but whose kernel or sandbox does not grant the tile state,
    llama.cpp's AMX matmul segfaults (seen on a Xeon with amx_tile); a decode in a child process
    tells, and llama.cpp then runs on its plain CPU kernels. Elsewhere it keeps its fastest path.
    """
    import subprocess
    import sys

    key = str(gguf)
    if key not in _EXTRA_BUFTS:
        probe = ("import llama_cpp, sys; "
                 f"m = llama_cpp.Llama({key!r}, n_ctx=64, n_batch=64, verbose=False); "
                 "m.eval([2, 100, 200, 300])")
        rc = subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode
        _EXTRA_BUFTS[key] = rc == 0
        if rc != 0:
            logging.getLogger(__name__).warning(
                "llama.cpp crashed with its extra buffer types (exit %s): running it without",
                rc)
    return _EXTRA_BUFTS[key]


class LlamaCpp:
    """llama.cpp on the GGUF, `slots` parallel sequences in one context (its batched decoding).

    A llama_batch carries every active sequence's next token (prefill: all their prompt tokens)
    into one `llama_decode`; each sequence is one prompt (`n_seq_max` = slots, a unified KV
    cache of slots x `ctx_per_seq` cells); llama.cpp's greedy sampler picks each next token.
    Prompts run in waves of `slots` (every row generates exactly `max_new` tokens, so a wave's
    rows finish together, as ours do). slots=1 is llama.cpp's single stream.
    """

    def __init__(self, gguf: Path, slots: int, ctx_per_seq: int, flash: bool,
                 threads: int | None = None):
        import llama_cpp as lc

        # llama-cpp-python routes llama.cpp's log through this logger: errors only.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.lc, self.slots = lc, slots
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts_work(gguf)
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        p = lc.llama_context_default_params()
        p.n_ctx = slots * ctx_per_seq
        p.n_batch = p.n_ctx  # a whole wave's prompts in one llama_decode
        p.n_ubatch = min(512, p.n_ctx)
        p.n_seq_max = slots
        p.kv_unified = True
        p.n_threads = p.n_threads_batch = threads or os.cpu_count() or 1
        p.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                             else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        p.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create its context")
        self.n_batch = p.n_batch
        self.batch = lc.llama_batch_init(p.n_batch, 0, 1)
        self.sampler = lc.llama_sampler_init_greedy()

    def close(self) -> None:
        lc = self.lc
        lc.llama_sampler_free(self.sampler)
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def generate(self, prompts: list[list[int]], max_new: int,
                 stop_ids: frozenset[int] | None = None) -> list[list[int]]:
        """Greedy continuations of exactly `max_new` tokens, `slots` prompts decoding at once;
        with `stop_ids` a row ends at (and keeps) its first stop id, the others go on."""
        lc, out = self.lc, []
        for w in range(0, len(prompts), self.slots):
            wave = prompts[w:w + self.slots]
            if sum(map(len, wave)) > self.n_batch:
                raise ValueError("a wave's prompts do not fit llama.cpp's batch")
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
            items, last = [], []  # last: batch index of each sequence's logits
            for s, p in enumerate(wave):
                for j, tok in enumerate(p):
                    items.append((tok, j, s, j == len(p) - 1))
                last.append(len(items) - 1)
            self._decode(items)
            toks: list[list[int]] = [[] for _ in wave]
            live = list(range(len(wave)))  # sequences still generating, in `last` order
            for step in range(max_new):
                nxt = [int(lc.llama_sampler_sample(self.sampler, self.ctx, ctypes.c_int32(i)))
                       for i in last]
                for s, t in zip(live, nxt):
                    toks[s].append(t)
                keep = [(s, t) for s, t in zip(live, nxt) if not (stop_ids and t in stop_ids)]
                if step == max_new - 1 or not keep:
                    break
                self._decode([(t, len(wave[s]) + step, s, True) for s, t in keep])
                live = [s for s, _ in keep]
                last = list(range(len(keep)))
            out += toks
        return out
