"""The incremental ledger: which rows earlier runs produced (id, content hash, settings hash, run,
output), what a new run must generate (new or changed rows), and its atomic update after publish.

Layout: `<ledger>/ledger.parquet`, one row per id that some earlier run produced; by default the
ledger lives in `_LEDGER/` beside the outputs (the output template's parent directory). Rules:
  - a row is redone when its id is new, its content (text, question, context) changed, or the
    settings that shape outputs (model, task, instruction, sampling, ...) changed;
  - ids in the ledger that the input no longer has are reported as deleted and dropped from it;
  - the ledger is rewritten (atomically) only after a run's output is published, so a killed run
    marks nothing done; rows whose generation failed (error_kind 'generation') stay undone, while
    input errors (empty, too long) are recorded: the same content and settings give the same error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError, JobError
from pipeline.output import OutputDir
from pipeline.plan import Plan, ReadUnit
from pipeline.spec import JobSpec
from pipeline.storage import Dir, get_fs

LEDGER_DIR = "_LEDGER"
FILE = "ledger.parquet"
SAMPLE = 10  # deleted ids listed in the summary
# Output-shaping fields (JobSpec.output_shaping) that say where rows come from, not how they are
# answered: the content hash covers the values they point at.
_NOT_SETTINGS = ("input", "id_column", "text_column", "question_column", "context_column")
# Fields that shape outputs besides those --resume checks.
_MORE_SETTINGS = ("dtype", "max_prompt_tokens", "sampling")


def default_ledger(output: str) -> str:
    """`_LEDGER` in the directory above the output's first templated segment (`{date}`, ...),
    else above the output itself: `gs://b/sums/{date}/` -> `gs://b/sums/_LEDGER`."""
    proto, sep, rest = output.rstrip("/").rpartition("://")
    segments = rest.split("/")
    first = next((i for i, s in enumerate(segments) if "{" in s), len(segments) - 1)
    parent = "/".join(segments[:first])
    if first == 0 and not sep:
        return LEDGER_DIR  # a relative output: beside it, in the current directory
    if first == 0 or (sep and not parent.strip("/")):
        raise InputError(f"incremental: output {output!r} has no parent directory to keep the "
                         "ledger in; set incremental.ledger (--ledger URL)")
    return f"{proto}{sep}{parent}/{LEDGER_DIR}"


def ledger_url(spec: JobSpec) -> str:
    assert spec.incremental is not None
    return spec.incremental.ledger or default_ledger(spec.output)


def settings_of(spec: JobSpec) -> dict[str, Any]:
    """The spec fields whose change redoes every row."""
    dump = json.loads(spec.model_dump_json())
    settings = {k: v for k, v in spec.output_shaping().items() if k not in _NOT_SETTINGS}
    settings.update({k: dump[k] for k in _MORE_SETTINGS})
    return settings


def settings_hash(spec: JobSpec) -> str:
    text = json.dumps(settings_of(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def content_hashes(text: list, question: list | None, context: list | None) -> list[str]:
    """One hash per row of its prompt's inputs (null and empty kept apart)."""
    n = len(text)
    cols = [text, question or [None] * n, context or [None] * n]
    out = []
    for values in zip(*cols):
        h = hashlib.blake2b(digest_size=16)
        for v in values:
            if v is None:
                h.update(b"\x00")
            else:
                b = v.encode("utf-8", "surrogatepass")
                h.update(b"\x01" + len(b).to_bytes(8, "little"))
                h.update(b)
        out.append(h.hexdigest())
    return out


def schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema([("id", id_type), ("content_hash", pa.string()),
                      ("settings_hash", pa.string()), ("run", pa.string()),
                      ("output", pa.string())])


def load(url: str, id_type: pa.DataType) -> pa.Table:
    """The ledger at `url` (empty when there is none yet); InputError when unreadable."""
    d = Dir(url)
    if not d.exists(FILE):
        return schema(id_type).empty_table()
    try:
        t = d.read_table(FILE)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"ledger {url}/{FILE} is unreadable ({str(e)[:120]}); remove it to "
                         "redo every row, or point incremental.ledger elsewhere") from None
    missing = [f.name for f in schema(id_type) if f.name not in t.column_names]
    if missing:
        raise InputError(f"ledger {url}/{FILE} lacks column {missing[0]!r}; it is not a "
                         "gemma-batch ledger: point incremental.ledger elsewhere")
    if t.schema.field("id").type != id_type:  # the ids changed type: none of them match
        return t.select(schema(id_type).names)
    return t.select(schema(id_type).names).cast(schema(id_type))


@dataclasses.dataclass
class Increment:
    """What the ledger says about this run's input, and the rows this run generates."""

    ledger: str
    output: str  # this run's output URL, as recorded in the ledger
    settings_hash: str
    input_rows: int
    new: int
    changed: int  # content changed
    settings_changed: int  # same content, other settings
    unchanged: int
    deleted: int
    deleted_sample: list
    todo: pa.Table  # id, content_hash: the rows this run generates
    previous: pa.Table  # ledger rows whose ids the input still has

    def summary_fields(self) -> dict[str, Any]:
        """The `incremental` section of `_SUMMARY.json` (and a note when there is nothing new)."""
        fields: dict[str, Any] = {"incremental": {
            "ledger": self.ledger, "input_rows": self.input_rows,
            "rows_to_generate": self.todo.num_rows, "new": self.new, "changed": self.changed,
            "settings_changed": self.settings_changed, "unchanged": self.unchanged,
            "deleted": self.deleted, "deleted_sample": self.deleted_sample,
            "settings_hash": self.settings_hash, "nothing_new": self.todo.num_rows == 0}}
        if self.todo.num_rows == 0:
            gone = f", {self.deleted} deleted" if self.deleted else ""
            fields["note"] = (f"nothing new since the last run: {self.unchanged} rows unchanged"
                              f"{gone} (ledger {self.ledger})")
        return fields

    def record(self, out: OutputDir, names: list[str], run: str) -> None:
        """Marks this run's rows done, drops deleted ids; call only after the output is
        published. Rows whose generation failed are left to the next run."""
        try:
            id_type = self.todo.schema.field("id").type
            failed_ids = pa.array([], id_type)
            for name in names:
                t = out.read_table(name, columns=["id", "error_kind"])
                gen = pc.fill_null(pc.equal(t.column("error_kind"), "generation"), False)
                failed_ids = pa.concat_arrays([failed_ids,
                                               _flat(t.filter(gen).column("id")).cast(id_type)])
            done = self.todo.filter(pc.invert(pc.is_in(self.todo.column("id"),
                                                       value_set=_flat(failed_ids))))
            n = done.num_rows
            done = done.append_column("settings_hash", pa.array([self.settings_hash] * n,
                                                                pa.string()))
            done = done.append_column("run", pa.array([run] * n, pa.string()))
            done = done.append_column("output", pa.array([self.output] * n, pa.string()))
            keep = self.previous.filter(pc.invert(pc.is_in(self.previous.column("id"),
                                                           value_set=_flat(done.column("id")))))
            table = pa.concat_tables([keep.cast(schema(id_type)),
                                      done.select(schema(id_type).names).cast(schema(id_type))])
            Dir(self.ledger).write_table(FILE, table)  # atomic: temp file, then moved in place
        except (OSError, pa.ArrowException) as e:
            raise JobError(f"the output is published but the ledger {self.ledger} could not be "
                           f"updated ({str(e)[:160]}); the next run will redo these rows") from e


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return pc.sum(pc.cast(mask, pa.int64())).as_py() or 0


def _flat(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def plan_increment(spec: JobSpec, plan: Plan, out: OutputDir, mode: str) -> None:
    """Narrows `plan` to the rows no earlier run produced with this content and these settings
    (read tasks then read only those rows) and sets `plan.increment`.

    Reads the id and prompt columns of the input once (no other columns); raises InputError
    for a ledger that cannot be used.
    """
    url = ledger_url(spec).rstrip("/")
    out_url = out.fs.unstrip_protocol(out.path).rstrip("/")
    lfs, lpath = get_fs(url)
    if (lfs.unstrip_protocol(lpath).rstrip("/") + "/").startswith(out_url + "/"):
        raise InputError(f"incremental: the ledger {url} lies inside the output {spec.output}; "
                         "keep it beside the outputs (the default) or elsewhere")
    ledger = load(url, plan.id_type)
    ids, hashes, unit_of, offset = _hash_input(spec, plan)
    inp = pa.table({"id": pa.array(ids, plan.id_type), "content_hash": pa.array(hashes,
                                                                                pa.string()),
                    "unit": pa.array(unit_of, pa.int32()), "offset": pa.array(offset, pa.int32())})
    sh = settings_hash(spec)
    if ledger.schema.field("id").type != plan.id_type:
        ledger_same = schema(plan.id_type).empty_table()
        deleted_ids = ledger.column("id")
    else:
        ledger_same = ledger
        deleted_ids = ledger.join(inp.select(["id"]), keys="id", join_type="left anti") \
            .column("id")
    old = ledger_same.select(["id", "content_hash", "settings_hash"]).rename_columns(
        ["id", "old_content", "old_settings"])
    j = inp.join(old, keys="id", join_type="left outer")
    known = pc.is_valid(j.column("old_content"))
    same_content = pc.fill_null(pc.equal(j.column("old_content"), j.column("content_hash")),
                                False)  # null (a new id) -> False
    same_settings = pc.fill_null(pc.equal(j.column("old_settings"), pa.scalar(sh)), False)
    unchanged = pc.and_(same_content, same_settings)
    todo = j.filter(pc.invert(unchanged))
    if mode == "overwrite":
        here = ledger_same.filter(pc.equal(ledger_same.column("output"), out_url))
        lost = here.num_rows - _count(pc.is_in(here.column("id"),
                                              value_set=_flat(todo.column("id"))))
        if lost > 0:
            raise InputError(f"incremental: the ledger counts {lost} rows of {spec.output} as "
                             "done; overwriting it would lose their outputs; write each run to "
                             "a new directory (e.g. {date} in the output)")
    plan.units = _narrow(plan.units, todo)
    plan.total_rows = todo.num_rows
    deleted_sorted = sorted(deleted_ids.to_pylist(), key=str)
    plan.increment = Increment(
        ledger=url, output=out_url, settings_hash=sh, input_rows=inp.num_rows,
        new=_count(pc.invert(known)), changed=_count(pc.and_(known, pc.invert(same_content))),
        settings_changed=_count(pc.and_(same_content, pc.invert(same_settings))),
        unchanged=_count(unchanged), deleted=len(deleted_sorted),
        deleted_sample=deleted_sorted[:SAMPLE], todo=todo.select(["id", "content_hash"]),
        previous=ledger_same.filter(pc.is_in(ledger_same.column("id"),
                                             value_set=_flat(inp.column("id")))))


def _hash_input(spec: JobSpec, plan: Plan) -> tuple[list, list[str], list[int], list[int]]:
    """Id, content hash, unit index and row offset in the unit of every input row."""
    idc = spec.id_column
    want = [c for c in (idc, spec.text_column, spec.question_column, spec.context_column) if c]
    by_url: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(plan.units):
        by_url[u.url].append(i)
    ids: list = []
    hashes: list[str] = []
    unit_of: list[int] = []
    offset: list[int] = []
    for url, idxs in by_url.items():
        fs, path = get_fs(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            present = [c for c in dict.fromkeys(want) if c in pf.schema_arrow.names]
            for i in idxs:
                u = plan.units[i]
                t = pf.read_row_groups(list(u.row_groups), columns=present)
                n = t.num_rows
                ids += ([f"{u.name}:{u.first_row + k}" for k in range(n)] if idc is None
                        else t.column(idc).cast(plan.id_type).to_pylist())
                hashes += content_hashes(_texts(t, spec.text_column) or [None] * n,
                                         _texts(t, spec.question_column),
                                         _texts(t, spec.context_column))
                unit_of += [i] * n
                offset += range(n)
    return ids, hashes, unit_of, offset


def _texts(t: pa.Table, name: str | None) -> list | None:
    if not name or name not in t.column_names:
        return None
    return t.column(name).cast(pa.string()).to_pylist()


def _narrow(units: list[ReadUnit], todo: pa.Table) -> list[ReadUnit]:
    """The units that hold rows to do, each told which of its rows (None = all)."""
    rows: dict[int, list[int]] = defaultdict(list)
    for u, o in zip(todo.column("unit").to_pylist(), todo.column("offset").to_pylist()):
        rows[u].append(o)
    out = []
    for i, unit in enumerate(units):
        if i not in rows:
            continue
        keep = tuple(sorted(rows[i]))
        out.append(unit if len(keep) == unit.num_rows else dataclasses.replace(unit, rows=keep))
    return out
