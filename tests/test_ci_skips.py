"""Under CI=true a session that skips any test fails (the hook in tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

SKIPPING = '''
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("needs something not installed")
'''
MODULE_SKIP = '''
import pytest

pytest.importorskip("no_such_package_here")

def test_never():
    pass
'''


def _pytest(tmp_path: Path, test_file: str, ci: str | None) -> subprocess.CompletedProcess:
    """Runs one test file with our conftest.py in a fresh pytest process."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_file.py").write_text(test_file)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_skip_fails_the_session_under_ci(tmp_path, ci):
    res = _pytest(tmp_path, SKIPPING, ci)
    assert res.returncode == 1, res.stdout[-2000:]
    assert "1 passed, 1 skipped" in res.stdout
    assert "CI=true: 1 skipped test(s) fail this run" in res.stdout
    assert "SKIPPED test_file.py::test_skips: needs something not installed" in res.stdout


def test_a_skip_is_only_reported_outside_ci(tmp_path):
    res = _pytest(tmp_path, SKIPPING, None)
    assert res.returncode == 0, res.stdout[-2000:]
    assert "1 passed, 1 skipped" in res.stdout and "fail this run" not in res.stdout


def test_a_module_level_skip_fails_the_session_under_ci(tmp_path):
    res = _pytest(tmp_path, MODULE_SKIP, "true")
    assert res.returncode == 1, res.stdout[-2000:]
    assert "SKIPPED test_file.py: could not import 'no_such_package_here'" in res.stdout


def test_ci_script_turns_the_check_on():
    ci = (CONFTEST.parents[1] / ".ci" / "run").read_text().splitlines()
    assert "export CI=true" in [line.strip() for line in ci]
