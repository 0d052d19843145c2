"""How good is `gemma-batch validate`'s forecast? Runs `validate --calibrate --json` on the
bundled demo corpus (summarize, the embedded Gemma 3 270M unless --model), then the same job for
real, and prints forecast / measured wall time (the issue's bar: within 2x either way), the
prompt and output tokens forecast vs produced, the CPU, and a final JSON line.

    python bench/forecast.py [--model gemma3-270m] [--batch-size 10] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import machine, machine_line  # noqa: E402


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    a = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.cli import demo_corpus_rows

    with tempfile.TemporaryDirectory(prefix="gemma-batch-forecast-") as tmp:
        shard = Path(tmp) / "demo.parquet"
        pq.write_table(pa.Table.from_pylist(demo_corpus_rows()), shard)
        env = {**os.environ, "GEMMA_BATCH_CACHE": str(Path(tmp) / "cache")}  # a cold calibration
        job = ["--input", str(shard), "--output", str(Path(tmp) / "out"), "--task", "summarize",
               "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens)]
        if a.model:
            job += ["--model", a.model]
        t0 = time.perf_counter()
        v = _cli("validate", *job, "--calibrate", "--json", env=env)
        if v.returncode != 0:
            raise SystemExit(f"validate --calibrate failed: {v.stderr.strip()[-400:]}")
        est = json.loads(v.stdout)["estimate"]
        t1 = time.perf_counter()
        r = _cli("run", *job, "--no-progress", env=env)
        t2 = time.perf_counter()
        if r.returncode != 0:
            raise SystemExit(f"run failed: {r.stderr.strip()[-400:]}")
        summary = json.loads((Path(tmp) / "out" / "_SUMMARY.json").read_text())
    fc = est["forecast"]
    res = {"bench": "forecast", **machine(), "model": a.model or "gemma3-270m",
           "rows": summary["rows_in"], "calibrate_s": round(t1 - t0, 1),
           "forecast_wall_s": fc["wall_s"], "measured_wall_s": summary["wall_s"],
           "measured_process_s": round(t2 - t1, 1),
           "ratio": round(fc["wall_s"] / summary["wall_s"], 3),
           "prompt_tokens_forecast": est["prompt_tokens"]["total"],
           "prompt_tokens_measured": summary["prompt_tokens"],
           "output_tokens_forecast": est["output_tokens"]["expected"],
           "output_tokens_measured": summary["output_tokens"]}
    res["within_2x"] = 0.5 <= res["ratio"] <= 2.0
    print(machine_line())
    print(f"forecast {res['forecast_wall_s']:.1f} s vs measured {res['measured_wall_s']:.1f} s "
          f"(ratio {res['ratio']:.2f}, within 2x: {res['within_2x']}); prompt tokens "
          f"{res['prompt_tokens_forecast']} vs {res['prompt_tokens_measured']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
