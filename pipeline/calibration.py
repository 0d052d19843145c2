"""Measured generation speed: a small JSON table (user cache) of prefill and decode tokens/s per
device, model, dtype and batch size, with the start-up a run pays (Ray, actor + model load,
compiles). `validate --calibrate` and bench/calibrate.py write it; validate's forecast reads it."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from model.cpu import cpu_model
from model.paths import atomic_write, cache_dir

VERSION = 1


def table_path() -> Path:
    """`cache_dir()/calibration.json` ($GEMMA_BATCH_CACHE honoured)."""
    return cache_dir() / "calibration.json"


def this_device(accelerator: str) -> str:
    """The device a calibration on this process measures: the CPU model, else JAX's kind."""
    if accelerator == "cpu":
        return cpu_model()
    import jax

    return str(jax.devices()[0].device_kind)


def _norm(text: str) -> str:
    return "".join(ch for ch in text.upper() if ch.isalnum())


def device_matches(entry: dict[str, Any], accelerator: str, accelerator_type: str | None) -> bool:
    """An entry measured on the device a job asks for: this CPU for cpu jobs; for gpu/tpu the
    accelerator type (e.g. H100, TPU-V6E) within the measured device's name (any if unset)."""
    if entry.get("accelerator") != accelerator:
        return False
    if accelerator == "cpu":
        return entry.get("device") == cpu_model()
    if not accelerator_type:
        return True
    want = _norm(accelerator_type.removeprefix("TPU-").removeprefix("tpu-"))
    return want in _norm(str(entry.get("device", "")))


def load_table(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or table_path()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # a damaged table is no calibration; the next write replaces it
    return list(data.get("entries", [])) if isinstance(data, dict) else []


def _key(e: dict[str, Any]) -> tuple:
    return (e.get("accelerator"), e.get("device"), e.get("model"), e.get("dtype"),
            e.get("batch_size"))


def write_entry(entry: dict[str, Any], path: Path | None = None) -> Path:
    """Adds (or replaces, same device/model/dtype/batch) one entry; returns the table's path."""
    path = path or table_path()
    entries = [e for e in load_table(path) if _key(e) != _key(entry)] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"version": VERSION, "entries": entries}, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def lookup(model: str, dtype: str, batch_size: int, accelerator: str,
           accelerator_type: str | None, path: Path | None = None) -> dict[str, Any] | None:
    """The entry for this device, model and dtype whose batch size is nearest (newest first)."""
    hits = [e for e in load_table(path) if e.get("model") == model and e.get("dtype") == dtype
            and device_matches(e, accelerator, accelerator_type)]
    if not hits:
        return None
    hits.sort(key=lambda e: (abs(int(e.get("batch_size", 0)) - batch_size),
                             -float(e.get("measured_at_unix", 0))))
    return hits[0]


def measure(model: Any, prompts: list[list[int]], max_new_tokens: int,
            stop: list[str] | None, repeats: int = 2) -> dict[str, Any]:
    """Times real prompts through a loaded model's engine (greedy), all in one batch.

    Runs once cold (compiles), then 1 new token (prefill-dominated) and `max_new_tokens` warm,
    alternately, `repeats` times each (the fastest of each kept). Returns prefill and decode
    tokens/s, the compile seconds and the mean output fraction.
    """
    batch = max(1, min(len(prompts), model.engine.buckets.max_batch))

    def gen(n: int) -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=n, temperature=0.0, stop=stop,
                             max_batch=batch)
        return time.perf_counter() - t0, out

    first_s, outs = gen(max_new_tokens)
    gen(1)  # compiles the 1-token shapes, if they differ
    pre, full = [], []
    for _ in range(repeats):
        pre.append(gen(1)[0])
        full.append(gen(max_new_tokens)[0])
    pre_s, full_s = min(pre), min(full)
    prompt_tokens = sum(len(p) for p in prompts)
    out_tokens = sum(int(g.output_tokens) for g in outs)
    # Below timing noise the decode share is bounded: the total (prefill + decode) stays right.
    decode_s = max(full_s - pre_s, 0.01 * full_s, 1e-4)
    return {
        "batch_size": len(prompts),
        "prefill_tok_s": round(prompt_tokens / max(pre_s, 1e-4), 2),
        "decode_tok_s": round(max(out_tokens - len(prompts), 1) / decode_s, 2),
        "compile_s": round(max(first_s - full_s, 0.0), 3),
        "output_fraction": round(out_tokens / (len(prompts) * max_new_tokens), 4),
        "max_new_tokens": max_new_tokens,
        "sample_prompts": len(prompts),
        "sample_prompt_tokens": prompt_tokens,
        "batch_s": round(full_s, 3),
    }


class _CalibrationActor:
    """One actor shaped like the job's generators: loads the model as they do, then measures."""

    def __init__(self, settings: Any):
        from pipeline.predictor import Predictor

        self.p = Predictor(settings)

    def ready(self) -> float:
        return self.p.load_s

    def measure(self, texts: list[str]) -> dict[str, Any]:
        prompts = [pr.ids for pr in (self.p.builder.build(t) for t in texts) if pr.ids]
        if not prompts:
            raise ValueError("none of the sampled rows gives a prompt; nothing to calibrate")
        out = measure(self.p.model, prompts, self.p.s.max_new_tokens, self.p.stop)
        out["device"] = this_device(_platform())
        return out


def _platform() -> str:
    import jax

    return jax.devices()[0].platform


def start_ray_timed(debug: bool = False) -> float:
    """Connects to (or starts) Ray as a run does; returns the seconds it took. Call it before
    JAX starts in this process: Ray forks its processes, which JAX's threads warn about."""
    from pipeline import ray_env

    t0 = time.perf_counter()
    ray_env.ensure_ray(debug)
    return time.perf_counter() - t0


def calibrate_on_ray(spec: Any, settings: Any, texts: list[str], ray_start_s: float
                     ) -> dict[str, Any]:
    """Starts one actor with the job's resources on Ray (timed: start + model load) and measures
    `texts` (one batch of the corpus) in it; writes and returns the table entry."""
    import ray

    from pipeline import ray_env
    opts = ray_env.actor_options(spec, ray_env.cluster_cpus())
    keep = {k: v for k, v in opts.items() if k in ("num_cpus", "num_gpus", "resources",
                                                  "accelerator_type")}
    t1 = time.perf_counter()
    actor = ray.remote(max_restarts=0, **keep)(_CalibrationActor).remote(settings)
    try:
        load_s = ray.get(actor.ready.remote())
        actor_ready_s = time.perf_counter() - t1
        m = ray.get(actor.measure.remote(texts))
    finally:
        ray.kill(actor)
    r = spec.resources
    entry = {
        "accelerator": r.accelerator, "model": spec.model, "dtype": spec.dtype or "default",
        **m,
        "startup": {"ray_start_s": round(ray_start_s, 3), "actor_ready_s": round(actor_ready_s, 3),
                    "model_load_s": round(load_s, 3), "compile_s": m["compile_s"]},
        "source": "validate --calibrate", "host": os.uname().nodename,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "measured_at_unix": time.time(),
    }
    entry["path"] = str(write_entry(entry))
    return entry
