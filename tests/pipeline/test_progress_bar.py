"""Progress as users see it: `gemma-batch run` under a pseudo-terminal draws a bar that ends at
100%; with stderr not a terminal it prints plain lines, and the phases before the first row
(Ray, actors, model load, compiles) come in order."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from pl_helpers import write_corpus

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _argv(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "run", "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--model", "tiny-gemma3", "--task", "raw",
            "--batch-size", "4", "--max-new-tokens", "4"]


def _env(ray_cluster: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_cluster, "COLUMNS": "200", "TERM": "xterm-256color",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Runs argv with stdin/stdout/stderr on a new pseudo-terminal; returns (rc, all output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                            close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError as e:  # EIO: every holder of the slave side has closed it
            if e.errno != errno.EIO:
                raise
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


def test_bar_under_a_terminal_finishes_at_100(ray_cluster, tmp_path):
    ids = write_corpus(str(tmp_path / "in"), shards=3, rows=4)
    rc, raw = _run_in_pty(_argv(tmp_path), _env(ray_cluster))
    text = ANSI.sub("", raw).replace("\r", "\n")
    assert rc == 0, text[-3000:]
    bar_lines = [ln for ln in text.splitlines() if "tokens/s" in ln and "ETA" in ln]
    assert bar_lines, text[-3000:]  # the rich bar was drawn, not the plain line
    final = bar_lines[-1]
    assert f"{len(ids)}/{len(ids)} rows" in final and "100%" in final and "errors" in final
    assert "━" in final  # the bar itself
    assert not re.search(r"gemma-batch: \d+/\d+ rows \(", text)  # no plain lines on a terminal
    assert "MapBatches" not in text and "Running Dataset" not in text  # Ray Data's bars off
    assert f"done: {len(ids)} rows" in text


def test_plain_lines_and_phases_off_a_terminal(ray_cluster, tmp_path):
    ids = write_corpus(str(tmp_path / "in"), shards=3, rows=4)
    proc = subprocess.run(_argv(tmp_path), env=_env(ray_cluster), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gemma-batch: ")]
    assert "━" not in proc.stderr and "\x1b[" not in proc.stderr  # no bar off a terminal
    assert lines[-1].startswith(f"gemma-batch: {len(ids)}/{len(ids)} rows (100%) | ")
    phases = [ln.split(": ", 1)[1].split(" | ")[0] for ln in lines if " rows (" not in ln]
    # Each phase in order, all before the first row.
    want = ["connecting to Ray", "starting 1 actor", "loading the model", "compiling about "]
    at = [next(i for i, p in enumerate(phases) if p.startswith(w)) for w in want]
    assert at == sorted(at), phases
    first_row = next(i for i, ln in enumerate(lines) if " rows (" in ln)
    assert all(" rows (" not in ln for ln in lines[:first_row]) and first_row >= len(want)
    assert any(p.startswith("first batch: ") and p.endswith(" programs compiled")
               for p in phases), phases
