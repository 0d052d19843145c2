"""Actors that span several devices: a local Ray cluster whose custom `chip` resource stands in
for accelerator chips (8 on the node), two actors of 4 chips each, every actor's model on a 2x2
mesh over its 4 (simulated CPU) devices. The output must be complete and equal to what the same
generator computes on one device."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import pyarrow as pa, pyarrow.parquet as pq, ray
    from pipeline.storage import worker_env
    from pipeline.spec import build_spec
    from pipeline.run import run_job
    from pipeline.predictor import GenSettings, Predictor, TEXT
    from pipeline.preflight import preflight

    tmp = sys.argv[1]
    ids = [f"doc-{i}" for i in range(16)]
    texts = [f"Document {i}: " + "word " * (3 + 5 * i) for i in range(16)]
    pq.write_table(pa.table({"id": ids, "text": texts}), f"{tmp}/in.parquet", row_group_size=4)
    env = {**worker_env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                               "--xla_force_host_platform_device_count=4"]))}
    ray.init(num_cpus=2, resources={"chip": 8}, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env}, logging_level="ERROR")
    data = {"input": f"{tmp}/in.parquet", "output": f"{tmp}/out", "model": "tiny-gemma3",
            "task": "raw", "id_column": "id", "batch_size": 4, "mesh": {"data": 2, "model": 2},
            "sampling": {"max_new_tokens": 6},
            "resources": {"num_actors": 2, "num_cpus_per_actor": 0.5,
                          "extra_resources": {"chip": 4}}}
    summary = run_job(build_spec(data), progress=False)
    got = pq.read_table(f"{tmp}/out").to_pylist()
    # The same generator in this process, which sees one device.
    spec = build_spec({**data, "output": f"{tmp}/ref", "mesh": None})
    plan, _, _ = preflight(spec)
    pred = Predictor(GenSettings.of(spec, plan))
    ref = pred.rows(pa.table({"id": ids, TEXT: texts})).to_pylist()
    ref_info = pred.model.info
    print(json.dumps({"summary": summary, "got": got, "ref": ref,
                      "ref_mesh": ref_info.get("mesh")}, default=str))
""")


def test_two_actors_each_on_a_four_device_mesh(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    s = res["summary"]
    assert s["rows_in"] == s["rows_out"] == 16 and s["errors"] == 0
    assert s["mesh"] == {"data": 2, "model": 2}  # every actor built the 2x2 mesh
    assert s["param_bytes_per_device"] > 0
    assert res["ref_mesh"] == {"data": 1, "model": 1}
    cols = ("output", "finish_reason", "prompt_tokens", "output_tokens")
    got = {row["id"]: tuple(row[c] for c in cols) for row in res["got"]}
    ref = {row["id"]: tuple(row[c] for c in cols) for row in res["ref"]}
    assert len(got) == 16 and got == ref
    assert sum(v[3] for v in got.values()) > 16  # real generation, not empty rows
