"""Driver footprint: the driver's peak RSS for a 5,000-row job vs a 100,000-row one (tiny model).

    python bench/driver_memory.py [--small 5000] [--large 100000] [--batch-size 256]

Each job runs in a fresh driver process (its own local Ray; the Ray processes are not the
driver) on a corpus written beforehand; the driver reports its own peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`) after `run_job` returned. The workers write the parts and
compact them, so the driver's memory should not grow with the rows: target growth <= 20%.
Prints both peaks, their ratio, the CPU, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import machine, machine_line  # noqa: E402


def child(inp: str, out: str, batch: int) -> None:
    from pipeline.run import run_job
    from pipeline.spec import build_spec

    t0 = time.perf_counter()
    summary = run_job(build_spec({
        "input": inp, "output": out, "model": "tiny-gemma3", "task": "raw", "id_column": "id",
        "batch_size": batch, "sampling": {"max_new_tokens": 2},
        "resources": {"num_actors": 1}}), progress=False)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": summary["rows_out"], "peak_rss_mib": round(peak_kib / 1024, 1),
                      "wall_s": round(time.perf_counter() - t0, 1)}))


def corpus(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"d{i:07d}" for i in range(rows)],
                             "text": [f"Row {i} of the corpus." for i in range(rows)]}),
                   path, row_group_size=2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.batch_size)
    mach = machine()
    print(machine_line(mach), flush=True)
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        for rows in (a.small, a.large):
            inp, out = Path(tmp) / f"in-{rows}.parquet", Path(tmp) / f"out-{rows}"
            corpus(inp, rows)
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
            env.pop("RAY_ADDRESS", None)
            p = subprocess.run([sys.executable, __file__, "--batch-size", str(a.batch_size),
                                "--child", str(inp), str(out)], env=env, capture_output=True,
                               text=True)
            if p.returncode != 0:
                sys.exit(f"the {rows}-row job failed: {p.stderr[-2000:]}")
            res[rows] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{rows} rows: driver peak RSS {res[rows]['peak_rss_mib']} MiB "
                  f"({res[rows]['wall_s']} s)", flush=True)
    growth = res[a.large]["peak_rss_mib"] / res[a.small]["peak_rss_mib"]
    print(f"peak RSS {a.large} rows / {a.small} rows: {growth:.3f} (target <= 1.2); "
          f"{machine_line(mach)}")
    print(json.dumps({"bench": "driver_memory", **mach, "small_rows": a.small,
                      "large_rows": a.large, "batch_size": a.batch_size,
                      "small_peak_rss_mib": res[a.small]["peak_rss_mib"],
                      "large_peak_rss_mib": res[a.large]["peak_rss_mib"],
                      "growth": round(growth, 3)}))


if __name__ == "__main__":
    main()
