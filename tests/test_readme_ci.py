"""CI runs exactly the README's quick-start commands, and the package is laid out as promised."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_readme_has_two_commands_and_ci_runs_them_verbatim():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("pip install .") and "gemma-batch demo" in cmds[0]
    assert "[test]" in cmds[1] and "pytest" in cmds[1]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for c in cmds:
        assert c in ci, f".ci/run does not run the README command: {c}"


def test_ci_does_not_hide_pytest_exit_codes():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "|| true" not in ci and "exit $rc" in ci
    assert "-eq 5" not in ci  # exit 5 (no tests) is never turned into success


def test_layout_and_pyproject():
    for p in ["pyproject.toml", "README.md", "pipeline", "model", "jobs", "cluster", "tests",
              "bench", ".ci/run"]:
        assert (ROOT / p).exists(), p
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj = meta["project"]
    assert proj["name"] == "gemma-batch"
    assert proj["scripts"]["gemma-batch"] == "jobs.cli:main"
    deps = " ".join(proj["dependencies"])
    for dep in ["ray[data,default]", "jax", "flax", "pyarrow", "sentencepiece", "fsspec",
                "gcsfs", "pydantic"]:
        assert dep in deps, dep
    assert "torch==2.13.0" in proj["optional-dependencies"]["test"]
