"""Cluster definitions: launcher YAMLs pass Ray's own validation; KubeRay manifests are coherent."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER = sorted(p for p in CLUSTER.glob("*.yaml") if not p.name.startswith("kuberay"))
KUBERAY = sorted(CLUSTER.glob("kuberay-*.yaml"))


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_definitions_exist():
    names = {p.name for p in LAUNCHER + KUBERAY}
    assert {"gcp-tpu.yaml", "gcp-tpu-v6e.yaml", "gcp-gpu.yaml", "aws-gpu.yaml",
            "kuberay-gpu.yaml", "kuberay-tpu.yaml", "kuberay-job-tpu.yaml",
            "kuberay-job-gpu.yaml"} <= names


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_validates(path):
    cfg = yaml.safe_load(path.read_text())
    _validate(cfg)
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    accel = [w["resources"] for w in workers.values()]
    assert any("GPU" in r or "TPU" in r for r in accel), "no accelerator worker type"
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"] == 0
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd  # auth stays on for what users run
    assert any("gemma-batch" in c for c in cfg["setup_commands"])


def test_validation_rejects_a_broken_launcher_yaml():
    cfg = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    cfg["available_node_types"]["gpu_l4"]["min_wrkers"] = 1  # typo'd key
    msg = r"Additional properties are not allowed \('min_wrkers' was unexpected\)"
    with pytest.raises(jsonschema.ValidationError, match=msg):
        _validate(cfg)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    # A RayJob file also holds its ConfigMap; its spec.rayClusterSpec obeys the same rules.
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d["apiVersion"] == "ray.io/v1"]
    assert len(docs) == 1
    doc = docs[0]
    kind = "RayJob" if path.name.startswith("kuberay-job-") else "RayCluster"
    assert doc["kind"] == kind
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    groups = spec["workerGroupSpecs"]
    assert groups
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]:
        for c in pod["spec"]["containers"]:
            assert ray.__version__ in c["image"]
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert "KUBERAY_GEN_RAY_START_CMD" in " ".join(c["args"])
            r = c["resources"]
            assert r["requests"] == r["limits"]
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in lim:
            assert g["rayStartParams"]["num-gpus"] == lim["nvidia.com/gpu"]
        else:
            chips = lim["google.com/tpu"]
            assert f'\\"TPU\\": {chips}' in g["rayStartParams"]["resources"]
            sel = g["template"]["spec"]["nodeSelector"]
            assert "cloud.google.com/gke-tpu-topology" in sel
