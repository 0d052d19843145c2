"""Launcher YAMLs beyond Ray's schema: each worker type declares what its machine gives Ray (TPU
chips, the slice's TPU-<type>-head, accelerator_type, GPUs) in Ray's own names, runs Ray's
official image of this Ray version with the right JAX, installs this checkout, and holds no
secret; the checks fail on a node type that claims what its machine lacks."""

from __future__ import annotations

import copy

import pytest
import yaml
from cluster_checks import (
    CLUSTER,
    check_installs_checkout,
    check_launcher_accelerators,
    plain_text_secrets,
)

LAUNCHER = sorted(p for p in CLUSTER.glob("*.yaml") if not p.name.startswith("kuberay"))


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text(encoding="utf-8"))


def test_launchers_cover_tpu_v5e_v6e_and_l4_a100_h100_on_gcp_and_aws():
    tpus, gpus = set(), set()
    for p in LAUNCHER:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
        for nt in cfg["available_node_types"].values():
            acc = nt["node_config"].get("acceleratorType")
            if acc:
                tpus.add(acc)
            for key in nt["resources"]:
                if key.startswith("accelerator_type:") and "GPU" in nt["resources"]:
                    gpus.add((cfg["provider"]["type"], key.split(":", 1)[1]))
    assert {"v5litepod-8", "v6e-8"} <= tpus
    assert {(c, g) for c in ("gcp", "aws") for g in ("L4", "A100", "H100")} <= gpus


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_worker_types_claim_what_their_machines_give(path):
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    check_launcher_accelerators(cfg)
    check_installs_checkout(cfg)
    assert plain_text_secrets([cfg]) == []


@pytest.mark.parametrize("name, broken, match", [
    ("gcp-tpu.yaml", lambda c: c["available_node_types"]["tpu_v5e_8"]["resources"].update(TPU=4),
     r"tpu_v5e_8: resource 'TPU' is 4, expected 8"),
    ("gcp-tpu.yaml", lambda c: c["available_node_types"]["tpu_v5e_8"]["resources"].pop(
        "TPU-v5litepod-8-head"), r"'TPU-v5litepod-8-head' is None, expected 1"),
    ("gcp-tpu-v6e.yaml", lambda c: c["available_node_types"]["tpu_v6e_8"]["node_config"].update(
        runtimeVersion="v2-alpha-tpuv5-lite"), r"is not 'v2-alpha-tpuv6e'"),
    ("gcp-tpu.yaml", lambda c: c["available_node_types"]["tpu_v5e_8"]["node_config"].update(
        acceleratorType="v5litepod-16"), r"v5litepod-16 spans several hosts"),
    ("gcp-gpu.yaml", lambda c: c["available_node_types"]["gpu_h100"]["resources"].update(GPU=1),
     r"gpu_h100: resource 'GPU' is 1, expected 8"),
    ("aws-gpu.yaml", lambda c: c["available_node_types"]["gpu_a100"]["resources"].pop(
        "accelerator_type:A100"), r"'accelerator_type:A100' is None"),
    ("aws-gpu.yaml", lambda c: c["available_node_types"]["gpu_l4"]["docker"].update(
        worker_image="rayproject/ray:2.59.0-py311-gpu"), r"is not rayproject/ray:.*-py311-gpu"),
    ("gcp-gpu.yaml", lambda c: c["available_node_types"]["gpu_l4"].update(
        worker_setup_commands=["pip install /tmp/gemma-batch jax"]),
     r"do not install jax\[cuda12\]"),
], ids=["half-a-host", "no-head-resource", "wrong-runtime", "multi-host-slice",
        "one-of-eight-gpus", "no-accelerator-type", "old-ray-image", "cpu-jax-on-gpu"])
def test_accelerator_check_rejects_a_broken_node_type(name, broken, match):
    cfg = copy.deepcopy(_load(name))
    broken(cfg)
    with pytest.raises(ValueError, match=match):
        check_launcher_accelerators(cfg)


@pytest.mark.parametrize("broken, match", [
    (lambda c: c["file_mounts"].update({"~/gemma-batch": "~/src"}), r"not the repository root"),
    (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), r"must carry the cluster token"),
    (lambda c: c.update(setup_commands=["pip install gemma-batch"]),
     r"setup_commands: does not pip-install the synced checkout"),
], ids=["other-source", "no-token", "installs-from-index"])
def test_install_check_rejects_a_launcher_that_does_not_install_this_checkout(broken, match):
    cfg = copy.deepcopy(_load("gcp-tpu.yaml"))
    broken(cfg)
    with pytest.raises(ValueError, match=match):
        check_installs_checkout(cfg)


def test_secret_check_flags_a_token_in_a_start_command():
    cfg = copy.deepcopy(_load("aws-gpu.yaml"))
    cfg["head_start_ray_commands"][1] = cfg["head_start_ray_commands"][1].replace(
        "export RAY_AUTH_MODE=token", "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=" + "ab12" * 16)
    assert any("head_start_ray_commands[1]: holds what looks like a credential" in f
               for f in plain_text_secrets([cfg]))
