"""cluster/Dockerfile, read with Docker's own parser (no daemon here): official rayproject/ray base
at the installed Ray and Python 3.11, jax[tpu] or jax[cuda12] by the ACCELERATOR build argument,
and this project installed from the copied checkout."""

from __future__ import annotations

import importlib.metadata

import pytest
from cluster_checks import CLUSTER, check_dockerfile

DOCKERFILE = CLUSTER / "Dockerfile"


def test_dockerfile_builds_the_worker_image():
    check_dockerfile(DOCKERFILE)


def test_every_accelerator_is_an_extra_jax_publishes():
    extras = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
    assert {"tpu", "cuda12"} <= extras


@pytest.mark.parametrize("old, new, match", [
    ("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0",
     r"ARG RAY_VERSION='2.59.0' is not the installed Ray"),
    ("FROM rayproject/ray:${RAY_VERSION}-py311 AS base-tpu",
     "FROM python:3.11-slim AS base-tpu", r"is not rayproject/ray:\$\{RAY_VERSION\}-py3XX"),
    ("rayproject/ray:${RAY_VERSION}-py311-gpu AS", "rayproject/ray:${RAY_VERSION}-py310-gpu AS",
     r"py310-gpu is not Python 3.11"),
    ("FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-cuda12\n", "",
     r"base stages \['tpu'\] are not tpu, cuda12"),
    ("FROM base-${ACCELERATOR}", "FROM base-tpu", r"the final stage is \('base-tpu',\)"),
    ("ARG ACCELERATOR=tpu", "ARG ACCELERATOR=rocm", r"ACCELERATOR default 'rocm' is none of"),
    ("COPY --chown=ray:users pipeline ./pipeline\n", "", r"does not copy \['pipeline'\]"),
    ('pip install --no-cache-dir . "jax', 'pip install --no-cache-dir gemma-batch "jax',
     r"no `pip install \.`: the image does not install this project"),
    ('"jax[${ACCELERATOR}]" ', '"jax[tpu]" ', r"the install does not pin"),
], ids=["ray-version", "not-ray-image", "python-3.10", "no-cuda-stage", "accelerator-ignored",
        "unknown-accelerator", "package-not-copied", "installs-from-index", "jax-not-by-arg"])
def test_check_rejects_a_broken_dockerfile(tmp_path, old, new, match):
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        check_dockerfile(broken)
