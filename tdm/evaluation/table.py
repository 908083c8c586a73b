"""The evaluation table: rows -> (header, cells) once, rendered as markdown or HTML.

One line per (model, steps): the row's model, steps, NFE, guidance and n, then (when a row follows a published
protocol, `tdm.evaluation.protocols`) its protocol and group (an HPSv2 style, "average"), then the metrics any row
has (the paper's order first, then the others by name). `protocol_lines` states each protocol once (name,
version, n, resolution, metric model, seed); `markdown_table` puts them under the table. Extra leading columns (e.g. an ablation's variant and
overrides) go in front. Used by the evaluate stage (table.md), `tdm evaluate` / `tdm score`, the report and
the Prefect flow's artifacts.
"""
from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from tdm.evaluation.rows import as_rows

# (metric key, column label, format): the known metrics in the paper's order.
COLUMNS = (("fid_digits", "FID (digits)", "{:.2f}"), ("fid_digits_floor", "FID floor", "{:.2f}"),
           ("class_accuracy", "class acc.", "{:.3f}"), ("kid_digits", "KID (digits)", "{:.3f}"),
           ("fid_digits_mlp", "FID (view 2)", "{:.2f}"), ("fid_digits_mlp_floor", "FID floor (view 2)", "{:.2f}"),
           ("kid_digits_mlp", "KID (view 2)", "{:.3f}"), ("class_accuracy_mlp", "class acc. (view 2)", "{:.3f}"),
           ("hps", "HPS", "{:.2f}"), ("aesthetic", "AeS", "{:.2f}"),
           ("clip_score", "CLIP", "{:.2f}"), ("fid", "FID", "{:.2f}"), ("vbench_total", "VBench total", "{:.4f}"),
           ("vbench_quality", "VBench quality", "{:.4f}"), ("vbench_semantic", "VBench semantic", "{:.4f}"))
PLAIN_PROTOCOLS = (None, "prompts")  # no protocol columns for these: the prompt set is the configured one
OTHER_FORMAT = "{:.4g}"
MISSING = "-"


def _cell(value, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    return fmt.format(value)


def guidance_text(row) -> str:
    """The guidance cell: the CFG scale, or a student's per-step baked-in schedule ("3/1/1/1")."""
    if row.guidance_schedule:
        return "/".join(f"{w:g}" for w in row.guidance_schedule)
    return f"{row.guidance:g}"


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
    with_protocol = any(r.protocol not in PLAIN_PROTOCOLS for r in rows)
    header = [*lead, "model", "steps", "NFE", "guidance", "n", *(("protocol", "group") if with_protocol else ()),
              *(c[1] for c in present), *other]
    body = []
    for i, (r, m) in enumerate(zip(rows, metrics)):
        n = r.n if r.n is not None else m.get("n")
        proto = (_label(r), r.group or MISSING) if with_protocol else ()
        body.append([*(str(values[i]) for values in lead.values()), str(r.model), str(r.steps), str(r.nfe),
                     guidance_text(r), _cell(n, "{}"), *proto, *(_cell(m.get(key), fmt) for key, _, fmt in present),
                     *(_cell(m.get(k), OTHER_FORMAT) for k in other)])
    return header, body


def _label(row) -> str:
    if row.protocol is None:
        return MISSING
    return row.protocol if row.protocol_version is None else f"{row.protocol} ({row.protocol_version})"


def protocol_lines(rows: Sequence) -> list[str]:
    """One line per distinct protocol among `rows`: "<protocol> (<version>): n=..., resolution ..., metric model
    ..., seed ..." (n: the samples of its ungrouped / average rows)."""
    seen: dict[tuple, list] = {}
    for r in as_rows(rows):
        if r.protocol is None:
            continue
        key = (r.protocol, r.protocol_version, r.resolution, r.metric_model, r.seed)
        ns = seen.setdefault(key, [])
        if r.group in (None, "average") and r.n is not None and r.n not in ns:
            ns.append(r.n)
    lines = []
    for (name, version, resolution, model, seed), ns in seen.items():
        parts = [f"n={'/'.join(map(str, ns)) or '?'}"]
        parts += [f"resolution {resolution}"] if resolution else []
        parts += [f"metric model {model}"] if model else []
        parts += [f"seed {seed}"] if seed is not None else []
        lines.append(f"{name}{f' ({version})' if version else ''}: " + ", ".join(parts))
    return lines


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
    """The rows as markdown, with a line per protocol (`protocol_lines`) and per metric that was skipped (and
    why)."""
    protocols = "".join(f"\nProtocol {line}\n" for line in protocol_lines(rows))
    notes = "".join(f"\nSkipped `{name}`: {why}\n" for name, why in (skipped or {}).items())
    return markdown(*cells(rows, lead)) + protocols + notes
