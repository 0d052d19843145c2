"""_REPORT.html (the run report) in a real headless Chromium (Debian's `chromium`, driven over the DevTools
protocol): a screenshot is taken, no console errors, nothing loaded from the network, and the
numbers on the page equal `_SUMMARY.json`; `gemma-batch report` re-renders it on gs:// and s3://."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pl_helpers import read_output, tiny_spec, write_shard

from jobs.cli import main
from pipeline.report import HEADLINE
from pipeline.run import run_job
from pipeline.spec import build_spec
from pipeline.storage import get_fs, join

_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:")


class Browser:
    """One headless Chromium with a DevTools websocket to its page; every request that is not a
    local file goes to a closed port (and host names resolve nowhere), so none can succeed."""

    def __init__(self, tmp: Path):
        import websocket  # websocket-client

        exe = shutil.which("chromium")
        if exe is None:
            pytest.fail("chromium is not installed; install Debian's package: "
                        "apt-get install -y chromium")
        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp))
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,2000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        targets = json.loads(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Sends one command and returns its result; events that arrive meanwhile are kept."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            assert time.monotonic() < deadline, f"no {method} within {timeout} s"
            self.events.append(json.loads(self.ws.recv()))

    def eval(self, expr: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _open_report(page: Path, tmp: Path) -> tuple[dict[str, str], list[str], list[str], bytes]:
    """Loads `page` in Chromium; returns (headline texts by id and errors-by-kind texts, console
    errors, non-local request URLs, screenshot PNG)."""
    b = Browser(tmp)
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable")
        b.send("Page.navigate", url=page.as_uri())
        b.wait_event("Page.loadEventFired")
        charts = b.eval("document.querySelectorAll('.chart > div > div').length")
        # Plotly draws asynchronously: wait until every chart has its SVG.
        b.eval(f"""new Promise((ok, fail) => {{ const t0 = Date.now(); (function poll() {{
            if (document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}) ok(1);
            else if (Date.now() - t0 > 30000) fail('charts not drawn');
            else setTimeout(poll, 50); }})(); }})""")
        texts = b.eval("JSON.stringify(Object.fromEntries([...document.querySelectorAll('[id]')]"
                       ".map(e => [e.id, e.textContent])))")
        shot = base64.b64decode(b.send("Page.captureScreenshot", format="png",
                                       captureBeyondViewport=True)["data"])
        b.send("Runtime.evaluate", expression="1")  # drain events logged while drawing
    finally:
        b.close()
    errors = []
    for e in b.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            errors.append(json.dumps(p["exceptionDetails"])[:300])
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(p["entry"]["text"])
        elif m == "Network.loadingFailed":
            errors.append(f"load failed: {p.get('errorText')}")
    remote = [e["params"]["request"]["url"] for e in b.events
              if e.get("method") == "Network.requestWillBeSent"
              and not e["params"]["request"]["url"].startswith(_LOCAL_SCHEMES)]
    return json.loads(texts), errors, remote, shot


def _number(text: str) -> int:
    return int(text.replace(",", "").strip())


def test_report_in_headless_chromium(ray_cluster, tmp_path):
    """A run with error rows of two kinds: its report renders, offline, with the summary's
    numbers; `gemma-batch report` re-renders the same numbers from gs:// and s3://."""
    texts = [f"Row {i} says hello to the report." for i in range(9)] + [None, "word " * 300]
    write_shard(str(tmp_path / "in" / "s0.parquet"),
                pa.table({"id": [f"d{i}" for i in range(11)], "text": texts}))
    out = tmp_path / "out"
    summary = run_job(build_spec(tiny_spec(str(tmp_path / "in"), str(out), id_column="id",
                                           max_prompt_tokens=64)), progress=False)
    assert summary["errors_by_kind"] == {"empty": 1, "too_long": 1}
    assert summary["report"] == "_REPORT.html" and (out / "_REPORT.html").stat().st_size > 0
    errors = read_output(str(out / "_ERRORS.parquet"))
    assert sorted(errors.column("id").to_pylist()) == ["d10", "d9"]
    assert sorted(errors.column("error_kind").to_pylist()) == ["empty", "too_long"]
    assert all(errors.column("error").to_pylist())

    on_page, console, remote, shot = _open_report(out / "_REPORT.html", tmp_path)
    (tmp_path / "report.png").write_bytes(shot)
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
    assert console == [], console
    assert remote == [], remote
    written = json.loads((out / "_SUMMARY.json").read_text())
    for eid, key in HEADLINE.items():
        assert _number(on_page[eid]) == written[key], (eid, on_page[eid], written[key])
    for kind, n in written["errors_by_kind"].items():
        assert _number(on_page[f"errors-kind-{kind}"]) == n
    assert _number(on_page["latency-batches"]) == len(
        (out / "_BATCHES.jsonl").read_text().splitlines())
    assert "Row 0 says hello" in on_page["sample"]  # inputs beside their outputs
    assert "text is null" in on_page["error-rows"] and "d10" in on_page["error-rows"]
    assert json.loads(on_page["spec"])["output"] == str(out)

    # Re-render from the output directory alone on object stores.
    for base in ("gs://test-bucket/report", "s3://test-bucket/report"):
        fs, path = get_fs(base)
        for f in out.iterdir():
            if f.name != "_REPORT.html":
                fs.put_file(str(f), join(path, f.name))
        assert main(["report", base]) == 0
        fs.invalidate_cache()
        local = tmp_path / f"{base.split(':')[0]}-report.html"
        fs.get_file(join(path, "_REPORT.html"), str(local))
        again, console, remote, _ = _open_report(local, tmp_path)
        assert console == [] and remote == []
        assert {k: again[k] for k in HEADLINE} == {k: on_page[k] for k in HEADLINE}


def test_report_command_refuses_a_non_output(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no _SUMMARY.json" in capsys.readouterr().err
