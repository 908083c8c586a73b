"""The evaluation table: rows -> (header, cells) once, rendered as markdown or HTML.

One line per (model, steps): the row's model, steps, NFE, guidance and n, then the metrics any row has (the
paper's order first, then the others by name). Extra leading columns (e.g. an ablation's variant and
overrides) go in front. Used by the evaluate stage (table.md), `tdm evaluate` / `tdm score`, the report and
the Prefect flow's artifacts.
"""
from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from tdm.evaluation.rows import as_rows

# (metric key, column label, format): the known metrics in the paper's order.
COLUMNS = (("fid_digits", "FID (digits)", "{:.2f}"), ("fid_digits_floor", "FID floor", "{:.2f}"),
           ("class_accuracy", "class acc.", "{:.3f}"), ("hps", "HPS", "{:.2f}"), ("aesthetic", "AeS", "{:.2f}"),
           ("clip_score", "CLIP", "{:.2f}"), ("fid", "FID", "{:.2f}"))
OTHER_FORMAT = "{:.4g}"
MISSING = "-"


def _cell(value, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    return fmt.format(value)


def cells(rows: Sequence, lead: Mapping[str, Sequence] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, body) of `rows` (EvalRows or their dicts), every cell a string; `lead` maps extra leading
    column names to one value per row. A metric a row lacks shows as "-"."""
    rows = as_rows(rows)
    lead = dict(lead or {})
    for name, values in lead.items():
        if len(values) != len(rows):
            raise ValueError(f"column {name!r}: {len(values)} values for {len(rows)} rows")
    metrics = [r.metrics or {} for r in rows]
    names = {k for m in metrics for k in m}
    present = [c for c in COLUMNS if c[0] in names]
    # "n" is the sample count (the n column), not a metric column.
    other = sorted(names - {c[0] for c in COLUMNS} - {"n"})
    header = [*lead, "model", "steps", "NFE", "guidance", "n", *(c[1] for c in present), *other]
    body = []
    for i, (r, m) in enumerate(zip(rows, metrics)):
        n = r.n if r.n is not None else m.get("n")
        body.append([*(str(values[i]) for values in lead.values()), str(r.model), str(r.steps), str(r.nfe),
                     f"{r.guidance:g}", _cell(n, "{}"), *(_cell(m.get(key), fmt) for key, _, fmt in present),
                     *(_cell(m.get(k), OTHER_FORMAT) for k in other)])
    return header, body


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A markdown table of string cells."""
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |\n"

    return line(header) + "|" + "---|" * len(header) + "\n" + "".join(line(row) for row in body)


def html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """An HTML table of string cells (escaped)."""
    def line(tag: str, values: Sequence[str]) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values) + "</tr>"

    return "<table>" + line("th", header) + "".join(line("td", row) for row in body) + "</table>"


def markdown_table(rows: Sequence, skipped: Mapping[str, str] | None = None,
                   lead: Mapping[str, Sequence] | None = None) -> str:
    """The rows as markdown, with a line per metric that was skipped (and why)."""
    notes = "".join(f"\nSkipped `{name}`: {why}\n" for name, why in (skipped or {}).items())
    return markdown(*cells(rows, lead)) + notes
