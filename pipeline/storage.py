"""Storage through fsspec: filesystems per URL (gs://, s3://, file://, paths, memory://), the
worker environment that reaches the same storage, whether a store can be reached at all (one
line with the cause), listing input shards, and directories with atomic writes.

Credentials come from the environment (each library's own conventions) and never enter a URL,
a log line or an output. `STORAGE_EMULATOR_HOST` points gs:// at an emulator, anonymously, as it
does for Google's own clients; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` point s3:// elsewhere.
Filesystems are built with those endpoints as explicit arguments, so a pickled filesystem works
the same in a Ray worker whose environment differs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import posixpath
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlsplit

from pipeline.errors import InputError, JobError

if TYPE_CHECKING:
    import pyarrow as pa

# gcsfs probes hierarchical-namespace buckets with a call emulators do not serve; it must be
# switched off before gcsfs is first imported, in the driver and in every Ray worker.
ENV_DEFAULTS = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
# Non-secret variables that Ray workers need to reach the same storage as the driver.
FORWARDED_ENV = ("STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "JAX_PLATFORMS", "GEMMA_BATCH_JAX_CACHE", "GEMMA_BATCH_CACHE")

for _k, _v in ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

_GLOB_CHARS = set("*?[")
# Libraries that log a traceback per failed request (gcsfs: "out of retries"); we report one line.
_CHATTY_LOGGERS = ("gcsfs", "s3fs", "aiobotocore", "botocore", "fsspec", "aiohttp", "urllib3",
                   "google.auth")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable: set[tuple[str, int]] = set()  # endpoints this process has reached


def worker_env() -> dict[str, str]:
    """Environment variables (never credentials) to set in Ray workers."""
    env = {k: os.environ.get(k, v) for k, v in ENV_DEFAULTS.items()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url` taken from the environment (endpoints only, never secrets)."""
    proto = _protocol(url)
    if proto in ("gs", "gcs"):
        host = os.environ.get("STORAGE_EMULATOR_HOST")
        if host:
            if "://" not in host:
                host = "http://" + host
            return {"token": "anon", "endpoint_url": host.rstrip("/")}
        return {}
    if proto in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"endpoint_url": endpoint} if endpoint else {}
    return {}


class StorageUnreachable(InputError):
    """The storage behind a URL could not be reached at all (network, endpoint, DNS); exit 2."""


def quiet_library_logs(debug: bool = False) -> None:
    """Storage libraries' per-request tracebacks stay off the terminal unless --debug."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)


def endpoint_of(url: str) -> tuple[str, str, int, str] | None:
    """(storage name, host, port, the variable that sets the endpoint) of a remote URL; None for
    local paths, memory:// and schemes without a known endpoint."""
    proto = _protocol(url)
    if proto in ("gs", "gcs"):
        name, var = "gs://", "STORAGE_EMULATOR_HOST"
        where = storage_options(url).get("endpoint_url") or "https://storage.googleapis.com"
    elif proto in ("s3", "s3a"):
        name, var = "s3://", "AWS_ENDPOINT_URL_S3"
        where = storage_options(url).get("endpoint_url") or "https://s3.amazonaws.com"
    else:
        return None
    parts = urlsplit(where if "://" in where else "http://" + where)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return name, parts.hostname or "", port, var


def unreachable_message(url: str, cause: str) -> str:
    """One line: which storage could not be reached, why, and what to check."""
    ep = endpoint_of(url)
    name, host, port, var = ep if ep else (url.split("://", 1)[0] + "://", "?", 0, "")
    check = f"the network, your credentials and {var}" if var else "the network and credentials"
    return (f"{name} storage at {host}:{port} could not be reached for {url} ({cause}); "
            f"check {check}")


def connection_cause(e: BaseException) -> str | None:
    """A short cause when `e` (or what it wraps) means the storage was not reached, else None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host: {e.strerror or e}"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, (socket.timeout, TimeoutError)):
            return "connection timed out"
        if isinstance(e, ConnectionError):
            return f"{type(e).__name__}: {e}"
        name = type(e).__name__
        if name in ("ClientConnectorError", "ServerDisconnectedError", "EndpointConnectionError",
                    "ConnectTimeoutError", "ConnectionClosedError"):
            return " ".join(str(e).split())[:200] or name
        e = e.__cause__ or e.__context__
    return None


def check_reachable(url: str, attempts: int = 3, timeout_s: float = 3.0) -> None:
    """Refuses a remote URL whose storage endpoint takes no connection (a few bounded tries).

    gcsfs and botocore retry a refused connection for tens of seconds and then report a missing
    file; this answers in about a second with the real cause. With an HTTP(S) proxy configured
    the probe is skipped (the connection would not go direct).
    """
    if (target := _probe_target(url)) is None or target in _reachable:
        return
    host, port = target
    cause = "no attempt"
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.25 * attempt)
        if (e := _connect(host, port, timeout_s)) is None:
            _reachable.add((host, port))
            return
        cause = _cause(e)
        if isinstance(e, socket.gaierror) and e.errno != socket.EAI_AGAIN:
            break  # an unknown host stays unknown
    raise StorageUnreachable(unreachable_message(url, cause))


def unreachable_now(url: str, timeout_s: float = 2.0) -> str | None:
    """Why the storage endpoint of a remote URL takes no connection now (one try), else None
    (it does, or the URL is local, its endpoint unknown, or a proxy is in the way).

    For cleanup after a failure: whether touching the store can work at all, answered at once
    instead of after the storage library's retries (gcsfs: 30-60 s per call).
    """
    if (target := _probe_target(url)) is None:
        return None
    e = _connect(*target, timeout_s)
    return None if e is None else _cause(e)


def _probe_target(url: str) -> tuple[str, int] | None:
    """(host, port) a probe of `url`'s storage connects to; None for a local path, an unknown
    endpoint, or with an HTTP(S) proxy configured (the connection would not go direct)."""
    ep = endpoint_of(url)
    if ep is None or any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    return ep[1], ep[2]


def _cause(e: OSError) -> str:
    return connection_cause(e) or f"{type(e).__name__}: {e}"


def _connect(host: str, port: int, timeout_s: float) -> OSError | None:
    """Opens and closes one TCP connection; the error, or None."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return e
    return None


def get_fs(url: str):
    """Returns (fsspec filesystem, path without protocol) for a URL or local path."""
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    except ImportError as e:
        raise InputError(
            f"{url!r}: no filesystem for this scheme ({e}); install its fsspec package") from None
    except ValueError as e:
        raise InputError(f"{url!r}: {e}") from None
    return fs, path


def join(url: str, *parts: str) -> str:
    """Joins path parts onto a URL with '/'."""
    return posixpath.join(url.rstrip("/"), *parts) if url else posixpath.join(*parts)


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


@dataclasses.dataclass(frozen=True)
class Shard:
    """One input file: its full URL and a stable short name used for derived ids."""

    url: str
    name: str


def list_shards(inputs: str | list[str]) -> list[Shard]:
    """Expands a directory, glob, file or list of files into sorted shards.

    Files whose name starts with '.' or '_' (markers such as _SUCCESS) are skipped in
    directories and globs. Raises InputError when a path matches nothing.
    """
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    urls: list[str] = []
    for item in items:
        check_reachable(item)
        fs, path = get_fs(item)
        try:
            if _GLOB_CHARS & set(path):
                found = [p for p in fs.glob(path) if fs.isfile(p)]
                found = [p for p in found if not _is_hidden(posixpath.basename(p))]
            elif fs.isdir(path):
                found = [
                    p for p in fs.find(path)
                    if not any(_is_hidden(s) for s in posixpath.relpath(p, path).split("/"))
                ]
            elif fs.isfile(path):
                found = [path]
            else:
                found = []
        except (PermissionError, ConnectionError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                found = []
            elif (cause := connection_cause(e)) is not None:
                raise StorageUnreachable(unreachable_message(item, cause)) from None
            else:
                raise JobError(
                    f"input {item!r}: storage is unreachable or refused access: {e}") from None
        if not found:
            raise InputError(f"input {item!r} matches no files; check the path or glob")
        urls.extend(fs.unstrip_protocol(p) for p in sorted(found))
    if len(set(urls)) != len(urls):
        dup = next(u for u in urls if urls.count(u) > 1)
        raise InputError(f"input lists the file {dup!r} more than once")
    names = _short_names(urls)
    return [Shard(u, n) for u, n in zip(urls, names)]


def _short_names(urls: list[str]) -> list[str]:
    """Shortest distinct trailing path of each URL (base name when unique)."""
    parts = [u.split("://", 1)[-1].split("/") for u in urls]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


class Dir:
    """A directory at any fsspec URL, with atomic file writes (readers never see a partial
    file) and small read helpers; paths are relative to it."""

    def __init__(self, url: str):
        self.given = url  # as the user wrote it, for messages
        self.url = url.rstrip("/")
        self.fs, self.path = get_fs(url)

    def _p(self, *rel: str) -> str:
        return posixpath.join(self.path, *rel) if rel else self.path

    def refresh(self) -> None:
        self.fs.invalidate_cache()

    def exists(self, *rel: str) -> bool:
        try:
            return bool(self.fs.exists(self._p(*rel)))
        except FileNotFoundError:
            return False

    def ls(self, *rel: str) -> list[str]:
        """Base names under a folder (empty when missing)."""
        self.refresh()
        try:
            entries = self.fs.ls(self._p(*rel), detail=False)
        except FileNotFoundError:
            return []
        base = self._p(*rel).rstrip("/")
        names = {posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != base}
        return sorted(n for n in names if n)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Writes a file so that readers never see a partial one (temp name, then move)."""
        final = self._p(rel)
        tmp = posixpath.join(posixpath.dirname(final), f".tmp-{uuid.uuid4().hex}")
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)

    def write_table(self, rel: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, default=str) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self._p(rel), "rb") as f:
            return json.loads(f.read().decode())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        with self.fs.open(self._p(rel), "rb") as f:
            return pq.read_table(f, columns=columns)

    def move(self, src_rel: str, dst_rel: str) -> None:
        self.fs.mv(self._p(src_rel), self._p(dst_rel))

    def remove(self, rels: Iterable[str]) -> None:
        for rel in rels:
            p = self._p(rel)
            try:
                if self.fs.isdir(p):
                    self.fs.rm(p, recursive=True)
                else:
                    self.fs.rm(p)
            except FileNotFoundError:
                pass
        self.refresh()
