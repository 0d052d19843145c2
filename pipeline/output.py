"""The output directory and its rules: what is ours, the run's mode, committed parts (what
--resume trusts), the run record, publish moves and the final markers; every write is atomic.

Layout of a finished run: `part-NNNNN.parquet` shards, `_ERRORS.parquet` (the error rows),
`_BATCHES.jsonl` (one record per generate batch), `_REPORT.html`, `_SUMMARY.json`, then `_SUCCESS`
last.
While a run goes: `_parts/` holds one committed Parquet part per batch plus `_RUN.json` (the
spec that started it); `_staging/` holds shards being published; `_LEASE.json` names the one run
writing here (pipeline/lease.py).
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any, Callable, Iterator, Literal, NoReturn

import pyarrow as pa

from pipeline.errors import InputError, JobError
from pipeline.lease import LEASE, refuse_if_held
from pipeline.storage import (
    Dir,
    StorageUnreachable,
    check_reachable,
    connection_cause,
    unreachable_message,
)

Mode = Literal["new", "overwrite", "resume", "finished"]

# Output columns every row has besides `id` (the output contract), in order.
CONTRACT_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("task", pa.string()),
    ("output", pa.string()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
    ("error_kind", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("output_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("chunks", pa.int32()),  # map-reduce: the document's chunks (1: it fit; null: not generated)
    ("input_tokens", pa.int64()),  # prompt tokens of every call the row took
    ("model", pa.string()),
)
RESERVED = {"id", *(n for n, _ in CONTRACT_FIELDS)}
# A committed part's Parquet metadata key holding its generate batches' records (JSON list).
_BATCHES_KEY = b"gemma_batch.batches"


class OutputDir(Dir):
    """One output directory (any fsspec URL)."""

    PARTS = "_parts"
    STAGING = "_staging"
    SUMMARY = "_SUMMARY.json"
    SUCCESS = "_SUCCESS"
    RUN = "_RUN.json"
    ERRORS = "_ERRORS.parquet"
    BATCHES = "_BATCHES.jsonl"
    REPORT = "_REPORT.html"  # "_": Parquet dataset readers (pandas, pyarrow, Spark) skip it

    # -- what is ours, and the run's mode ---------------------------------------------------

    def is_ours(self, name: str) -> bool:
        """Whether `name` at the top level is something a run of ours writes (the lease and
        the temp files of atomic writes included)."""
        return name in (self.PARTS, self.STAGING, self.SUMMARY, self.SUCCESS, self.ERRORS,
                        self.BATCHES, self.REPORT, LEASE) or name.startswith(".tmp-") or (
            name.startswith("part-") and name.endswith(".parquet"))

    def is_finished(self) -> bool:
        self.refresh()
        return self.exists(self.SUCCESS)

    def clear_ours(self) -> None:
        """Removes everything a previous run of ours left (never foreign files, never the
        lease: the overwriting run holds it)."""
        self.remove([n for n in self.ls() if self.is_ours(n) and n != LEASE])

    def mode(self, *, overwrite: bool, resume: bool) -> Mode:
        """What a new run does here: 'new', 'overwrite', 'resume' or 'finished' (nothing to do).

        Raises InputError for foreign files, a live lease of another run, or an existing run
        the flags do not address, and JobError when the storage cannot be listed. A stale lease
        alone (a run killed before it wrote anything) counts as empty.
        """
        check_reachable(self.url)
        try:
            names = self.ls()
        except (PermissionError, ConnectionError) as e:
            if (cause := connection_cause(e)) is not None:
                raise StorageUnreachable(unreachable_message(self.given, cause)) from None
            raise JobError(
                f"output {self.given}: storage unreachable or refused access: {e}") from None
        foreign = [n for n in names if not self.is_ours(n)]
        if foreign:
            raise InputError(
                f"output {self.given} holds files that are not a gemma-batch output (e.g. "
                f"{foreign[0]!r}); choose an empty or new output directory")
        if LEASE in names:
            refuse_if_held(self)
            names = [n for n in names if n != LEASE]
        if not names:
            return "new"
        if overwrite:
            return "overwrite"
        finished = self.SUCCESS in names
        if resume:
            return "finished" if finished else "resume"
        if finished:
            raise InputError(
                f"output {self.given} already holds a finished run; pass --overwrite to replace it")
        raise InputError(
            f"output {self.given} holds an unfinished run; pass --resume to continue it or "
            "--overwrite to start over")

    def confirm_mode(self, mode: Mode, *, overwrite: bool, resume: bool) -> None:
        """Refuses (InputError) when, with the lease now held, the output is no longer in the
        mode preflight found: another run wrote here in between."""
        if mode != "overwrite" and self.mode(overwrite=overwrite, resume=resume) != mode:
            raise InputError(f"output {self.given} changed while this run started (another run "
                             "wrote to it); check it and rerun")

    def probe_writable(self) -> None:
        """Writes and removes a small file the way the run writes (`write_bytes`), so that an
        output that cannot be written is refused before any model loads; folders the probe had
        to create are removed again (only when still empty). Raises InputError."""
        created = self.missing_folders()
        name = f".probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(name, b"gemma-batch write probe\n")
        except Exception as e:  # noqa: BLE001 - every filesystem raises its own types
            if (cause := connection_cause(e)) is not None:
                raise StorageUnreachable(unreachable_message(self.given, cause)) from None
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            raise InputError(
                f"output {self.given} cannot be written ({type(e).__name__}: {reason}); choose "
                "a location you can write to, or fix its permissions") from None
        finally:
            try:
                self.fs.rm(self._p(name))
            except (OSError, ValueError):
                pass
            self.remove_empty(created)

    def remove_empty(self, folders: list[str]) -> None:
        """Removes these folders (deepest first) where they are empty."""
        for folder in folders:
            try:
                if not self.fs.ls(folder, detail=False):
                    self.fs.rmdir(folder)
            except (OSError, ValueError):
                pass
        self.refresh()

    def missing_folders(self) -> list[str]:
        """The output folder and its ancestors that do not exist yet, deepest first (what a
        first write creates)."""
        missing: list[str] = []
        path = self.path.rstrip("/")
        while path and path not in ("/", "."):
            try:
                if self.fs.exists(path):
                    break
            except (OSError, ValueError):
                break
            missing.append(path)
            parent = posixpath.dirname(path)
            if parent == path:
                break
            path = parent
        return missing

    # -- the run record and committed parts -------------------------------------------------

    def write_run_record(self, spec_json: dict[str, Any], attempt: str) -> None:
        """Records the spec that started this run (first write of a new run)."""
        self.write_json(f"{self.PARTS}/{self.RUN}", {"spec": spec_json, "started": attempt})

    def check_resume(self, shaping: dict[str, Any]) -> None:
        """Refuses --resume when the interrupted run's spec differs in these fields."""
        rel = f"{self.PARTS}/{self.RUN}"
        if not self.exists(rel):
            return
        try:
            before = self.read_json(rel).get("spec", {})
        except (ValueError, OSError):
            return
        diff = [k for k, v in shaping.items() if before.get(k) != v]
        if diff:
            raise InputError(
                f"--resume: this spec differs from the interrupted run in {', '.join(diff)}; "
                "use the same spec, or --overwrite to start over")

    def commit(self, attempt: str, seq: int, table: pa.Table,
               batches: list[dict[str, Any]] | None = None) -> None:
        """Commits one finished batch as a part (atomic: a part is whole or absent); `batches`
        (its generate batches' records) ride in the part's metadata."""
        if batches:
            meta = {**(table.schema.metadata or {}), _BATCHES_KEY: json.dumps(batches).encode()}
            table = table.replace_schema_metadata(meta)
        self.write_table(f"{self.PARTS}/{attempt}-{seq:06d}.parquet", table)

    def commit_part(self, name: str, table: pa.Table, batches: list[dict[str, Any]]) -> None:
        """Commits a worker's finished batch as `_parts/<name>` (atomic; a retried batch of the
        same rows has the same name and replaces it); `batches` ride in its metadata."""
        meta = {**(table.schema.metadata or {}), _BATCHES_KEY: json.dumps(batches).encode()}
        self.write_table(f"{self.PARTS}/{name}", table.replace_schema_metadata(meta))

    @staticmethod
    def part_batches(part: pa.Table) -> list[dict[str, Any]]:
        """The batch records a committed part carries (empty when none)."""
        raw = (part.schema.metadata or {}).get(_BATCHES_KEY)
        return json.loads(raw) if raw else []

    def committed_parts(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The committed parts in name order; unreadable leftovers are skipped."""
        for name in self.ls(self.PARTS):
            if not name.endswith(".parquet"):
                continue
            try:
                yield self.read_table(f"{self.PARTS}/{name}", columns=columns)
            except (pa.ArrowException, OSError, KeyError):
                continue

    def done_ids(self) -> set:
        """Ids already committed (what --resume skips)."""
        done: set = set()
        for t in self.committed_parts(columns=["id"]):
            done.update(t.column("id").to_pylist())
        return done

    # -- publish ----------------------------------------------------------------------------

    def shards(self) -> list[str]:
        """Names of the output shards at the top level (published or half-published)."""
        return [n for n in self.ls() if n.startswith("part-") and n.endswith(".parquet")]

    def clear_staging(self) -> None:
        """Removes shards of an earlier, unfinished publish (staged or already moved)."""
        self.remove(self.shards() + [self.STAGING])

    def stage(self, name: str, table: pa.Table) -> None:
        self.write_table(f"{self.STAGING}/{name}", table)

    def publish(self, names: list[str], summary: dict[str, Any],
                side_files: Callable[[], None] | None = None,
                rows: dict[str, int] | None = None) -> None:
        """Moves staged shards in place, verifies them, writes the side files, `_SUMMARY.json`,
        then `_SUCCESS` last, and drops the parts.

        Args:
          names: the staged shards (`_staging/<name>`), published as `<name>`.
          summary: the run summary; its `rows_out` must equal the rows the shards hold.
          side_files: writes the errors, batch records and report (after the check).
          rows: optional rows expected per shard name, each checked against its footer.

        Raises JobError, with neither `_SUMMARY.json` nor `_SUCCESS` written, when a listed
        shard is missing or unreadable, holds other rows than stated, or the top level holds a
        shard that `names` does not list.
        """
        for name in names:
            try:
                self.move(f"{self.STAGING}/{name}", name)
            except FileNotFoundError:
                pass  # already moved by an earlier publish, or gone: the check below says
        self.verify_shards(names, summary.get("rows_out"), rows)
        if side_files is not None:
            side_files()
        self.write_json(self.SUMMARY, summary)
        self.write_bytes(self.SUCCESS, b"")
        self.remove([self.PARTS, self.STAGING])

    def verify_shards(self, names: list[str], rows_out: int | None,
                      rows: dict[str, int] | None = None) -> None:
        """Checks that the top-level shards are exactly `names`, from their Parquet footers,
        with `rows[name]` rows each and `rows_out` in all; raises JobError (one line)."""
        import pyarrow.parquet as pq

        def fail(problem: str) -> NoReturn:
            raise JobError(f"output {self.given}: publish check failed: {problem}; no "
                           f"{self.SUCCESS} was written; rerun with --resume")

        extra = sorted(set(self.shards()) - set(names))
        if extra:
            fail(f"{extra[0]} is not one of the {len(names)} shards this run published")
        total = 0
        for name in names:
            try:
                with self.fs.open(self._p(name), "rb") as f:
                    n = pq.read_metadata(f).num_rows
            except FileNotFoundError:
                fail(f"shard {name} is missing")
            except (pa.ArrowException, OSError) as e:
                fail(f"shard {name} is unreadable ({str(e)[:120]})")
            if rows is not None and name in rows and rows[name] != n:
                fail(f"shard {name} holds {n} rows, not {rows[name]}")
            total += n
        if rows_out is not None and total != rows_out:
            fail(f"the shards hold {total} rows but the summary states {rows_out}")
