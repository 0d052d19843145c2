"""The generation engine: bucketed, jitted prefill + on-device decode loop, continuous batching.

Legend: B = decode slots, P = rows per prefill call, T = prefill chunk, L = cache length,
V = vocabulary, S = stop-token table size.

The engine is family-agnostic: it only calls `family.init_state(cfg, batch, max_len, dtype)` and
`family.forward(params, tokens, positions, state, cfg)` (the `Family` protocol, model/family.py),
and finds the batch axis of every state leaf by shape inspection. Per call of `generate`
(scheduler.py, the host side):

  1. Prompts are grouped by cache length L = bucket(prompt + max_new_tokens) and, within a group,
     run longest first through B = bucket(min(#prompts, max_batch)) slots.
  2. Prefill: prompt[:-1] of up to P new rows is fed in chunks of T tokens (T a bucket; prompts
     longer than the largest chunk take several calls). The program gathers the P target slots'
     state, runs `forward` (position 0 resets a reused slot), scatters the state back, and writes
     the rows' bookkeeping (last prompt token, position, `RowSettings`). Logits are unused,
     so XLA drops the output projection.
  3. Decode: one `lax.while_loop` on device feeds each active slot its last token, samples the
     next one per row (sampling.py), and stops when every row is done - or, when prompts are
     waiting, as soon as enough slots have freed up, so the host can refill them (step 2) and
     carry on. Nothing recompiles: a refill only changes array contents.
Programs (programs.py, the device side) are compiled ahead of time per shape bucket
(buckets.py) by each model's `Engine`, logged and counted in its `compile_log`, and kept in JAX's
persistent compilation cache. Results never depend on batch composition: rows never interact,
and each row's random key comes from (seed, row id, step).
"""

from model.engine.buckets import DEFAULT_BUCKETS, Buckets, CompileLog, enable_compile_cache
from model.engine.programs import Engine, RowSettings
from model.engine.scheduler import Generation, generate, plan_programs

__all__ = ["Engine", "Generation", "generate", "plan_programs", "Buckets", "DEFAULT_BUCKETS",
           "CompileLog", "RowSettings", "enable_compile_cache"]
