"""The house's rules: no import runs upward (model <- pipeline <- jobs), and the CLI's light
paths (`--help`, status, logs, the scheduler) never import JAX."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import only the packages listed for it (besides itself).
ALLOWED = {"model": set(), "pipeline": {"model"}, "jobs": {"model", "pipeline"}}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_runs_upward(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for dep in _imported_packages(path) - ALLOWED[package] - {package}:
            bad.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert bad == []


def test_light_entry_points_do_not_import_jax():
    code = ("import sys, jobs.schedule, jobs.cli, jobs.remote, pipeline.spec, model\n"
            "from model import DEFAULT_MODEL\n"
            "from jobs.cli import build_parser\n"
            "build_parser().format_help()\n"
            "heavy = sorted(m for m in ('jax', 'ray', 'pyarrow') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_job_flag_sets_a_spec_field():
    from jobs.flags import add_job_flags, section_of
    import argparse

    p = argparse.ArgumentParser()
    add_job_flags(p)
    not_fields = {"spec", "progress", "help"}  # the spec file itself and run-time switches
    stray = [a.dest for a in p._actions if a.dest not in not_fields and section_of(a.dest) is None]
    assert stray == []
    assert section_of("max_new_tokens") == "sampling" and section_of("num_actors") == "resources"
    assert section_of("output") == "" and section_of("address") is None
