"""The plan of a job, as preflight makes it and every later stage reads it: the read units
(row groups of a shard per read task), the ids and carried columns, and the output schema."""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

from pipeline.output import CONTRACT_FIELDS
from pipeline.storage import Shard


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """Row groups of one shard read by one task; `first_row` numbers derived ids."""

    url: str
    name: str
    row_groups: tuple[int, ...]
    first_row: int
    num_rows: int
    rows: tuple[int, ...] | None = None  # incremental: offsets in the unit to read; None = all


@dataclasses.dataclass
class Plan:
    """What preflight found: the work to do and the output schema."""

    shards: list[Shard]
    units: list[ReadUnit]
    total_rows: int
    id_type: pa.DataType  # int64 or string (derived ids are strings)
    derived_ids: bool
    read_columns: list[str]  # columns read from the shards
    carry: dict[str, str]  # input column -> output column name
    carry_schema: pa.Schema  # types of carried columns (output names)
    done_ids: set = dataclasses.field(default_factory=set)
    resumed: bool = False
    increment: Any = None  # pipeline.ledger.Increment of an incremental run
    id_column: str | None = None  # the input's id column (None: ids derived from shard and row)
    param_columns: dict[str, str] = dataclasses.field(default_factory=dict)  # setting -> column
    output_format: Any = None  # pipeline.formats.JobFormat (None: text, no extra columns)

    def output_schema(self) -> pa.Schema:
        """id, the contract columns, the output format's columns, then the carried ones."""
        fields = [pa.field("id", self.id_type)] + [pa.field(n, t) for n, t in CONTRACT_FIELDS]
        extra = self.output_format.fields() if self.output_format is not None else []
        return pa.schema(fields + extra + list(self.carry_schema))
