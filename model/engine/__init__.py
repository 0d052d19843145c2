"""The generation engine: bucketed, jitted prefill + on-device decode loop, continuous batching.

Legend: B = decode slots, P = rows per prefill call, T = prefill chunk, L = cache length,
V = vocabulary, S = stop-token table size.

The engine is family-agnostic: it only calls `family.init_state(cfg, batch, max_len, dtype)` and
`family.forward(params, tokens, positions, state, cfg)` (the `Family` protocol, model/family.py),
and finds the batch axis of every state leaf by shape inspection. Per call of `generate`
(scheduler.py, the host side):

  1. A token prefix shared by several rows (the job's prompt frame; a passage its questions
     share) is found from the token ids, prefilled once into a 1-row state and kept in the
     engine (`Engine.prefixes`); its rows start from a copy of that state.
  2. Rows are grouped by cache length L = bucket(prompt + max_new_tokens), taken shortest
     first into groups of at least `max_batch` rows (N rows that fit the slots run as one
     wave), and within a group run through B = bucket(min(#rows, max_batch)) slots.
  3. Prefill: the new rows' tokens past their prefix are packed into one sequence of N tokens
     (model/packed.py; N a bucket), so its cost follows the real token count: the program copies
     the prefix into the rows' slots, runs `forward_packed` (block-diagonal causal attention over
     the prefix and each row's own segment; RecurrentGemma's recurrence restarts per segment)
     and writes each token's K/V (or the rows' recurrent state) into its row, then the rows'
     bookkeeping (last prompt token, position, `RowSettings`). A prompt longer than the largest
     span continues in chunks of T tokens per row (`forward` over the rows' caches). Logits are
     unused, so XLA drops the output projection. `Engine.stats` counts the work (padding ratio).
  4. Decode: one `lax.while_loop` on device feeds each active slot its last token, samples the
     next one per row (sampling.py), and stops when every row is done - or, when prompts are
     waiting, as soon as enough slots have freed up, so the host can refill them (step 2) and
     carry on. Nothing recompiles: a refill only changes array contents. Tokens whose text
     holds a stop string stop their row on device too (the text is still cut on the host).
Programs (programs.py, the device side) are compiled ahead of time per shape bucket
(buckets.py) by each model's `Engine`, logged and counted in its `compile_log`, and kept on disk:
in JAX's persistent compilation cache, and keyed by what they are made from (saved.py), so that a
later process loads them without tracing. Results never depend on batch composition: rows never
interact, and each row's random key comes from (seed, row id, step).
"""

from model.engine.buckets import DEFAULT_BUCKETS, Buckets, CompileLog, enable_compile_cache
from model.engine.constrain import Automaton, Format, FormatError, compile_format
from model.engine.programs import Engine, RowSettings
from model.engine.results import Generation
from model.engine.scheduler import expected_programs, generate, plan_programs
from model.engine.score import choice_probs, continuation_logprobs
from model.engine.stream import Request, Stream, StreamEngine

__all__ = ["Engine", "Generation", "generate", "plan_programs", "expected_programs", "Buckets",
           "Request", "Stream", "StreamEngine", "Automaton", "Format", "FormatError",
           "compile_format", "choice_probs", "continuation_logprobs",
           "DEFAULT_BUCKETS", "CompileLog", "RowSettings", "enable_compile_cache"]
