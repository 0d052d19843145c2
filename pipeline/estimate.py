"""What a job will cost before it runs (`gemma-batch validate`): rows, prompt tokens counted with
the model's tokenizer and the real prompt template (a sample on large corpora), output tokens,
and a wall-time / device-hours forecast from a calibration (pipeline/calibration.py)."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from pipeline import calibration
from pipeline.longdoc import OVERLAP_TOKENS, usable_tokens
from pipeline.predictor import CONTEXT, QUESTION, TEXT, GenSettings, prompt_setup
from pipeline.plan import Plan
from pipeline.read import ReadSettings, read_unit
from pipeline.spec import JobSpec

SAMPLE_ROWS = 2000  # rows tokenized at most; larger corpora are sampled (whole read units)


def sample_rows(spec: JobSpec, plan: Plan, limit: int = SAMPLE_ROWS) -> tuple[list[tuple], int]:
    """(text, question, context) of the rows still to generate, all of them when there are at
    most `limit`, else a seeded random sample of read units; and the rows to generate."""
    rs = ReadSettings.of(spec, plan)
    units = list(plan.units)
    todo = plan.total_rows - len(plan.done_ids)
    if todo > limit:
        random.Random(0).shuffle(units)
    rows: list[tuple] = []
    for u in units:
        t = read_unit(u, rs)
        cols = t.column_names
        texts = t.column(TEXT).to_pylist()
        qs = t.column(QUESTION).to_pylist() if QUESTION in cols else [None] * len(texts)
        cs = t.column(CONTEXT).to_pylist() if CONTEXT in cols else [None] * len(texts)
        rows.extend(zip(texts, qs, cs))
        if len(rows) >= limit:
            break
    return rows[:limit], todo


def load_for_counting(spec: JobSpec) -> Any:
    """The tokenizer, context length and prompt format the actors will use, read without the
    weights (an Orbax directory, whose config lives in its parameters, is loaded whole)."""
    from model.checkpoints import load_text_side

    fmt = None if spec.prompt_format == "auto" else spec.prompt_format
    text = load_text_side(spec.model)
    if text is None:
        from model import load_model

        return load_model(spec.model, dtype=spec.dtype, prompt_format=fmt)
    return dataclasses.replace(text, prompt_format=fmt or text.prompt_format)


def count_tokens(spec: JobSpec, plan: Plan, model: Any, limit: int = SAMPLE_ROWS
                 ) -> dict[str, Any]:
    """Prompt tokens of the rows to generate, built exactly as the actors build them."""
    rows, todo = sample_rows(spec, plan, limit)
    builder, _stop = prompt_setup(model, GenSettings.of(spec, plan))
    lengths, errors, long_docs = [], 0, 0
    map_reduce = spec.long_document_policy == "map-reduce"
    for text, q, c in rows:
        p = builder.build(text, q, c)
        if p.ids is None and p.error_kind == "too_long" and map_reduce:
            # Its chunks, each in a prompt frame (the reduce levels' summaries are left out).
            n_text = len(builder.tok.encode(str(text)))
            chunks = -(-n_text // max(1, usable_tokens(builder) - OVERLAP_TOKENS))
            lengths.append(n_text + chunks * builder.frame_tokens)
            long_docs += 1
        elif p.ids is None:
            errors += 1
        else:
            lengths.append(len(p.ids))
    n = len(rows)
    exact = n == todo
    scale = todo / n if n else 0.0
    total = sum(lengths)
    return {
        "rows_counted": n, "exact": exact,
        "sample_note": None if exact else f"sampled {n} of {todo} rows; totals scaled",
        "total": total if exact else round(total * scale),
        "mean": round(total / len(lengths), 2) if lengths else 0.0,
        "max": max(lengths, default=0),
        "prompt_errors": errors if exact else round(errors * scale),
        "map_reduce_documents": long_docs if exact else round(long_docs * scale),
        "texts": [r[0] for r in rows],  # for a calibration on the corpus itself; not emitted
    }


def forecast(spec: JobSpec, todo: int, prompt_tokens: int, entry: dict[str, Any] | None,
             ) -> dict[str, Any]:
    """Wall time and device-hours of the run from a calibration entry (None: no forecast)."""
    r = spec.resources
    pool = r.num_actors or r.min_actors or 1
    max_new = spec.sampling.max_new_tokens
    upper = todo * max_new
    if entry is None:
        return {"source": None, "expected_output_tokens": None,
                "note": f"no calibration for {spec.model} ({spec.dtype or 'default'} dtype) on "
                        f"this {r.accelerator}{' ' + r.accelerator_type if r.accelerator_type else ''}"
                        "; run `gemma-batch validate --calibrate` (or bench/calibrate.py)"}
    frac = float(entry.get("output_fraction", 1.0)) if entry.get("max_new_tokens") == max_new \
        else 1.0
    expected_out = round(upper * min(frac, 1.0))
    gen_s = (prompt_tokens / float(entry["prefill_tok_s"])
             + expected_out / float(entry["decode_tok_s"]))
    # CPU actors share this machine's cores: more of them do not add speed.
    parallel = 1 if r.accelerator == "cpu" else pool
    st = entry.get("startup", {})
    # bench/calibrate.py measures no Ray or actor start: its model load is the lower bound.
    startup = (float(st.get("ray_start_s", 0))
               + float(st.get("actor_ready_s", st.get("model_load_s", 0)))
               + float(st.get("compile_s", entry.get("compile_s", 0))))
    wall = startup + gen_s / parallel
    from pipeline.ray_env import devices_per_actor

    devices = pool * (devices_per_actor(spec) or 1)
    return {
        "source": f"{entry.get('source', 'calibration')} on {entry.get('device')} at "
                  f"{entry.get('measured_at', '?')} (batch {entry.get('batch_size')}; "
                  f"{entry.get('path') or calibration.table_path()})",
        "accelerator": r.accelerator, "device": entry.get("device"), "pool_size": pool,
        "prefill_tok_s": entry["prefill_tok_s"], "decode_tok_s": entry["decode_tok_s"],
        "expected_output_tokens": expected_out,
        "startup_s": round(startup, 1), "generate_s": round(gen_s / parallel, 1),
        "wall_s": round(wall, 1),
        "device_hours": round(wall * devices / 3600, 4),
        "device_hours_unit": "cpu-machine-hours" if r.accelerator == "cpu" else
        f"{r.accelerator}-hours ({devices} devices)",
    }


def estimate(spec: JobSpec, plan: Plan, *, calibrate: bool = False, sample: int = SAMPLE_ROWS,
             debug: bool = False) -> dict[str, Any]:
    """Rows, prompt and output tokens, and the forecast (after a calibration run if asked)."""
    ray_start_s = calibration.start_ray_timed(debug) if calibrate else 0.0
    model = load_for_counting(spec)
    tokens = count_tokens(spec, plan, model, sample)
    texts = tokens.pop("texts")
    todo = plan.total_rows - len(plan.done_ids)
    r = spec.resources
    if calibrate:
        picked = [t for t in texts if t and str(t).strip()][: spec.batch_size]
        if not picked:
            raise ValueError("no row with text to calibrate on")
        entry = calibration.calibrate_on_ray(
            spec, GenSettings.of(spec, plan), picked, ray_start_s)
    else:
        entry = calibration.lookup(spec.model, spec.dtype or "default", spec.batch_size,
                                   r.accelerator, r.accelerator_type)
    fc = forecast(spec, todo, tokens["total"], entry)
    return {
        "rows": plan.total_rows, "rows_to_generate": todo,
        "prompt_tokens": tokens,
        "output_tokens": {"max_new_tokens": spec.sampling.max_new_tokens,
                          "upper_bound": todo * spec.sampling.max_new_tokens,
                          "expected": fc.get("expected_output_tokens")},
        "forecast": fc,
    }


def lines(est: dict[str, Any]) -> list[str]:
    """The estimate as validate prints it."""
    pt, ot, fc = est["prompt_tokens"], est["output_tokens"], est["forecast"]
    out = [f"rows: {est['rows']} ({est['rows_to_generate']} to generate)",
           f"prompt tokens: {pt['total']} (mean {pt['mean']}, max {pt['max']}"
           + (f"; {pt['sample_note']}" if pt["sample_note"] else "; every row tokenized")
           + (f"; {pt['prompt_errors']} rows give no prompt" if pt["prompt_errors"] else "")
           + (f"; {pt['map_reduce_documents']} long documents by map-reduce (their chunks "
              "counted)" if pt.get("map_reduce_documents") else "") + ")",
           f"output tokens: at most {ot['upper_bound']} ({ot['max_new_tokens']} x rows)"
           + (f", expected ~{ot['expected']}" if ot["expected"] is not None else "")]
    if fc["source"] is None:
        out.append(f"forecast: none; {fc['note']}")
    else:
        out.append(f"forecast: {_hms(fc['wall_s'])} wall ({fc['startup_s']} s start-up + "
                   f"{fc['generate_s']} s generating on {fc['pool_size']} actor(s)), "
                   f"{fc['device_hours']} {fc['device_hours_unit']}; from {fc['source']}")
    return out


def _hms(s: float) -> str:
    h, rem = divmod(math.ceil(s), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
