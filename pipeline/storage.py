"""Storage through fsspec: filesystems per URL (gs://, s3://, file://, paths, memory://), the
worker environment that reaches the same storage, and listing input shards.

Credentials come from the environment (each library's own conventions) and never enter a URL,
a log line or an output. `STORAGE_EMULATOR_HOST` points gs:// at an emulator, anonymously, as it
does for Google's own clients; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` point s3:// elsewhere.
Filesystems are built with those endpoints as explicit arguments, so a pickled filesystem works
the same in a Ray worker whose environment differs.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Any

from pipeline.errors import InputError, JobError

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
