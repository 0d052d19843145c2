"""The run report: `_REPORT.html` of an output directory, drawn with Plotly and self-contained
(plotly.js inlined, a Content-Security-Policy that forbids any fetch), from the output alone.

It shows the spec, rows and errors by kind, prompt/output token histograms, throughput over
time and per actor, batch latency percentiles, a sample of inputs with outputs and the error
rows. The headline numbers carry element ids (`rows-out`, `errors`, `output-tokens`, ...).
"""

from __future__ import annotations

import html
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output import OutputDir
from pipeline.storage import get_fs, list_shards

log = logging.getLogger(__name__)

SAMPLE_ROWS = 8  # inputs shown with their outputs
ERROR_ROWS = 200  # error rows listed (all are in _ERRORS.parquet)
_TEXT_CHARS = 600  # longest input/output text shown in a table cell
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src data: blob:; font-src data:")
# Headline numbers: element id -> summary key.
HEADLINE = {"rows-in": "rows_in", "rows-out": "rows_out", "errors": "errors",
            "prompt-tokens": "prompt_tokens", "output-tokens": "output_tokens",
            "rows-generated": "rows_generated_this_run"}


def write_report(url: str, to: str | None = None) -> str:
    """Re-renders the report of the output at `url` (local, gs://, s3://) from its files alone;
    writes it to `to` (default: `_REPORT.html` inside the output) and returns where it went."""
    from pipeline.errors import InputError

    out = OutputDir(url)
    if not out.exists(OutputDir.SUMMARY):
        raise InputError(f"{url} holds no {OutputDir.SUMMARY}; point at a finished gemma-batch "
                         "output directory")
    summary = out.read_json(OutputDir.SUMMARY)
    batches = read_batches(out)
    if out.exists(OutputDir.ERRORS):
        errors = out.read_table(OutputDir.ERRORS)
    else:  # an output older than _ERRORS.parquet: take the error rows from the shards
        errors = _read_shards(out, summary, ["id", "error_kind", "error", "prompt_tokens",
                                             "finish_reason"])
        errors = errors.filter(pc.equal(errors.column("finish_reason"), "error"))
    page = render_report(out, summary, batches, errors)
    if to is None:
        out.write_bytes(OutputDir.REPORT, page)
        return f"{out.url}/{OutputDir.REPORT}"
    fs, path = get_fs(to)
    with fs.open(path, "wb") as f:
        f.write(page)
    return to


def read_batches(out: OutputDir) -> list[dict[str, Any]]:
    """The batch records of `_BATCHES.jsonl` (empty when absent)."""
    if not out.exists(OutputDir.BATCHES):
        return []
    with out.fs.open(out._p(OutputDir.BATCHES), "rb") as f:
        return [json.loads(ln) for ln in f.read().decode().splitlines() if ln.strip()]


def render_report(out: OutputDir, summary: dict[str, Any], batches: list[dict[str, Any]],
                  errors: pa.Table) -> bytes:
    """The report page (UTF-8 HTML) of a published output: `summary` is its `_SUMMARY.json`,
    `batches` its batch records, `errors` its error rows; shards are read from `out`."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    tokens = _read_shards(out, summary, ["prompt_tokens", "output_tokens", "finish_reason"])
    ok = pc.not_equal(tokens.column("finish_reason"), "error")
    figs: list[tuple[str, Any]] = []
    kinds = summary.get("errors_by_kind") or {}
    if kinds:
        figs.append(("errors by kind", go.Figure(go.Bar(x=list(kinds), y=list(kinds.values())))))
    figs.append(("prompt tokens per row", _histogram(
        tokens.column("prompt_tokens").to_numpy(zero_copy_only=False), "prompt tokens")))
    figs.append(("output tokens per row (rows without error)", _histogram(
        tokens.filter(ok).column("output_tokens").to_numpy(zero_copy_only=False),
        "output tokens")))
    if batches:
        figs.append(("output tokens/s over time, per actor", _throughput(batches)))
        figs.append(("per actor: output tokens/s in generate", _per_actor(batches)))
        figs.append(("batch latency (s in generate)", _histogram(
            np.array([b["latency_s"] for b in batches], dtype=float), "seconds")))
    charts = []
    for i, (title, fig) in enumerate(figs):
        fig.update_layout(title=title, height=340, margin={"l": 50, "r": 20, "t": 50, "b": 40},
                          template="plotly_white")
        charts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{i}",
                                  config={"displaylogo": False, "responsive": True}))
    body = "\n".join([
        _headline(summary),
        _section("Errors by kind", _kv_table({k: v for k, v in kinds.items()}, "errors-kind")
                 if kinds else "<p>No row failed.</p>"),
        _section("Charts", "\n".join(f'<div class="chart">{c}</div>' for c in charts)),
        _section("Batch latency percentiles", _latency_table(batches)),
        _section("Sample of inputs and outputs", f'<div id="sample">{_sample(out, summary)}</div>'),
        _section(f"Error rows ({errors.num_rows})",
                 f'<div id="error-rows">{_errors_table(errors)}</div>'),
        _section("Run", _kv_table(_run_facts(summary), "run")),
        _section("Spec", f"<pre id=\"spec\">{_esc(json.dumps(summary.get('spec'), indent=2))}"
                         "</pre>"),
    ])
    title = f"gemma-batch report: {summary.get('spec', {}).get('output', out.given)}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_STYLE}</style>
<script>{get_plotlyjs()}</script>
</head><body>
<h1>{_esc(title)}</h1>
{body}
</body></html>
"""
    return page.encode("utf-8")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.card .v { font-size: 22px; font-weight: 600; } .card .k { font-size: 12px; color: #666; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.text { max-width: 480px; white-space: pre-wrap; word-break: break-word; }
.chart { display: inline-block; width: 49%; min-width: 420px; }
pre { background: #f6f6f6; padding: 10px; font-size: 12px; overflow-x: auto; }
"""


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _section(title: str, inner: str) -> str:
    return f"<h2>{_esc(title)}</h2>\n{inner}"


def _headline(summary: dict[str, Any]) -> str:
    labels = {"rows-in": "rows in", "rows-out": "rows out", "errors": "error rows",
              "prompt-tokens": "prompt tokens", "output-tokens": "output tokens",
              "rows-generated": "rows generated this run"}
    cards = [f'<div class="card"><div class="v" id="{eid}">{_esc(summary.get(key, 0))}</div>'
             f'<div class="k">{labels[eid]}</div></div>' for eid, key in HEADLINE.items()]
    for key, label in (("tokens_per_s", "tokens/s end to end"), ("wall_s", "wall s")):
        cards.append(f'<div class="card"><div class="v">{_esc(summary.get(key))}</div>'
                     f'<div class="k">{label}</div></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _kv_table(d: dict[str, Any], prefix: str) -> str:
    rows = "".join(f'<tr><th>{_esc(k)}</th><td id="{prefix}-{_esc(k)}">{_esc(v)}</td></tr>'
                   for k, v in d.items())
    return f"<table>{rows}</table>"


def _run_facts(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "mode", "mesh", "param_bytes_per_device", "wall_s", "generation_wall_s",
            "tokens_per_s", "generate_tokens_per_s", "batches", "rows_resumed", "finish_reasons",
            "output_files", "versions")
    facts = {k: summary[k] for k in keys if k in summary}
    for i, r in enumerate(summary.get("retries") or []):
        facts[f"retry {i + 1}"] = json.dumps(r)
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in facts.items()}


def _histogram(values: np.ndarray, unit: str) -> Any:
    """Binned in Python (at most 40 bars), so the page size does not grow with the rows."""
    import plotly.graph_objects as go

    values = values[~np.isnan(values.astype(float))] if values.size else values
    if not values.size:
        return go.Figure()
    lo, hi = float(values.min()), float(values.max())
    bins = max(1, min(40, int(hi - lo) + 1)) if values.dtype.kind in "iu" else 30
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1))
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts,
                           width=np.diff(edges), hovertemplate="%{x}: %{y} rows<extra></extra>"))
    fig.update_xaxes(title=unit)
    fig.update_yaxes(title="count")
    return fig


def _throughput(batches: list[dict[str, Any]]) -> Any:
    """Output tokens/s in time bins (by batch end), one line per actor."""
    import plotly.graph_objects as go

    t0 = min(b["end"] - b["latency_s"] for b in batches)
    span = max(b["end"] for b in batches) - t0
    nbins = max(1, min(60, len(batches)))
    width = max(span / nbins, 1e-3)
    fig = go.Figure()
    for actor in sorted({b["actor"] for b in batches}):
        tok = np.zeros(nbins)
        for b in batches:
            if b["actor"] == actor:
                tok[min(nbins - 1, int((b["end"] - t0) / width))] += b["output_tokens"]
        fig.add_trace(go.Scatter(x=(np.arange(nbins) + 1) * width, y=tok / width,
                                 mode="lines+markers", name=actor))
    fig.update_xaxes(title="s since the first batch started")
    fig.update_yaxes(title="output tokens/s")
    return fig


def _per_actor(batches: list[dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    actors = sorted({b["actor"] for b in batches})
    tps, rows = [], []
    for a in actors:
        mine = [b for b in batches if b["actor"] == a]
        lat = sum(b["latency_s"] for b in mine)
        tps.append(round(sum(b["output_tokens"] for b in mine) / lat, 3) if lat > 0 else 0.0)
        rows.append(sum(b["rows"] for b in mine))
    return go.Figure(go.Bar(x=actors, y=tps, text=[f"{r} rows" for r in rows]))


def _latency_table(batches: list[dict[str, Any]]) -> str:
    if not batches:
        return "<p>No batch records.</p>"
    lat = np.array([b["latency_s"] for b in batches], dtype=float)
    pct = {f"p{q}": round(float(np.percentile(lat, q)), 4) for q in (50, 90, 95, 99)}
    pct["max"] = round(float(lat.max()), 4)
    pct["batches"] = len(batches)
    return _kv_table(pct, "latency")


def _table(header: list[str], rows: list[list[Any]], text_cols: set[int]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            s = "" if v is None else str(v)
            s = s if len(s) <= _TEXT_CHARS else s[:_TEXT_CHARS] + " …"
            cls = ' class="text"' if i in text_cols else ""
            cells.append(f"<td{cls}>{_esc(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _errors_table(errors: pa.Table) -> str:
    if errors.num_rows == 0:
        return "<p>No error rows.</p>"
    shown = errors.slice(0, ERROR_ROWS).to_pylist()
    more = (f"<p>First {ERROR_ROWS} of {errors.num_rows}; all are in "
            f"{OutputDir.ERRORS}.</p>") if errors.num_rows > ERROR_ROWS else ""
    return more + _table(["id", "error_kind", "error", "prompt_tokens"],
                         [[r["id"], r["error_kind"], r["error"], r["prompt_tokens"]]
                          for r in shown], {2})


def _sample(out: OutputDir, summary: dict[str, Any]) -> str:
    """The first input rows (of the first shard) beside their outputs; outputs alone when the
    input can no longer be read."""
    spec = summary.get("spec") or {}
    texts, note = {}, ""
    try:
        texts = _first_inputs(spec, SAMPLE_ROWS)
    except Exception as e:  # noqa: BLE001 - a moved or unreachable input only loses the sample
        note = f"<p>Input not readable ({_esc(type(e).__name__)}: {_esc(e)}); outputs only.</p>"
    cols = ["id", "output", "finish_reason", "error", "output_tokens"]
    found: list[dict[str, Any]] = []
    for name in _shard_names(out, summary):
        t = out.read_table(name, columns=cols)
        if texts:
            ids = pa.array(list(texts), t.schema.field("id").type)
            t = t.filter(pc.is_in(t.column("id"), value_set=ids))
        found.extend(t.slice(0, SAMPLE_ROWS - len(found)).to_pylist())
        if len(found) >= SAMPLE_ROWS:
            break
    rows = [[r["id"], texts.get(r["id"], ""), r["output"] if r["output"] is not None
             else f"[error] {r['error']}", r["finish_reason"], r["output_tokens"]] for r in found]
    return note + _table(["id", "input", "output", "finish_reason", "output_tokens"], rows,
                         {1, 2})


def _first_inputs(spec: dict[str, Any], n: int) -> dict[Any, str]:
    """id -> text of the first `n` rows of the first non-empty input shard."""
    text_col, id_col = spec.get("text_column", "text"), spec.get("id_column")
    for shard in list_shards(spec["input"]):
        fs, path = get_fs(shard.url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows == 0:
                continue
            names = pf.schema_arrow.names
            use_id = id_col if id_col and id_col in names else None
            cols = [c for c in (text_col, use_id) if c and c in names]
            t = pf.read_row_group(0, columns=cols).slice(0, n)
        ids = (t.column(use_id).to_pylist() if use_id
               else [f"{shard.name}:{i}" for i in range(t.num_rows)])
        texts = (t.column(text_col).to_pylist() if text_col in t.column_names
                 else [None] * t.num_rows)
        return dict(zip(ids, texts))
    return {}


def _shard_names(out: OutputDir, summary: dict[str, Any]) -> list[str]:
    return list(summary.get("output_files") or out.shards())


def _read_shards(out: OutputDir, summary: dict[str, Any], columns: list[str]) -> pa.Table:
    tables = [out.read_table(n, columns=columns) for n in _shard_names(out, summary)]
    return pa.concat_tables(tables) if tables else pa.table(
        {c: pa.array([], pa.int32() if c.endswith("tokens") else pa.string()) for c in columns})
