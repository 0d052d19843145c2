"""Storage through fsspec: filesystems per URL (gs://, s3://, file://, paths, memory://), the
worker environment that reaches the same storage, listing input shards, and directories with
atomic writes.

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
import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Any, Iterable

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
