"""The plain progress line printed when stderr is not a terminal."""

from __future__ import annotations

import io

from pipeline.errors import root_cause
from pipeline.progress import Progress


def test_progress_line_counts_rows_tokens_errors():
    buf = io.StringIO()
    p = Progress(total=40, enabled=True, interval=3600, stream=buf)
    p.start()
    p.add(rows=10, tokens=80, errors=1)
    p.add(rows=10, tokens=80, errors=2)
    p.stop()  # prints the final line
    line = buf.getvalue().strip().splitlines()[-1]
    assert line.startswith("gemma-batch: 20/40 rows (50%) | ") and "| 3 errors |" in line
    assert "tokens/s" in line


def test_progress_disabled_prints_nothing():
    buf = io.StringIO()
    p = Progress(total=5, enabled=False, stream=buf)
    p.start()
    p.add(5, 10, 0)
    p.stop()
    assert buf.getvalue() == ""


def test_root_cause_unwraps_chained_errors():
    class Wrapper(Exception):
        pass

    try:
        try:
            raise FileNotFoundError("weights.bin missing\nmore detail")
        except FileNotFoundError as inner:
            raise Wrapper("") from inner
    except Wrapper as e:
        assert root_cause(e) == "FileNotFoundError: weights.bin missing"
