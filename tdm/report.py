"""The `report` stage: one self-contained HTML page (and a markdown twin) of what the pipeline produced.

Reads what the stages wrote (metrics/<stage>.json, the evaluation rows and their sample grids, the loss logs)
and, when present, the recorded ablation benchmark (benchmarks/results/distill_ablations.json). Images and
plots are embedded as data URIs, so the page renders offline (no CDN, unlike `dvc plots show`).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from tdm.artifacts import atomic_folder
from tdm.evaluation.table import cells, html_table, markdown

STAGE = "report"
STAGES = ("teacher_ft", "distill", "lora_transfer", "evaluate")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _render(header: list[str], body: list[list[str]]) -> tuple[str, str]:
    """(html, markdown) of one table of string cells."""
    return html_table(header, body), markdown(header, body)


def _table(header: list[str], rows: list[list]) -> tuple[str, str]:
    """(html, markdown) of one table of values (numbers to 4 significant digits, None blank)."""
    return _render(header, [[_fmt(v) for v in row] for row in rows])


def ablation_table(bench: dict) -> tuple[list[str], list[list]]:
    """The recorded distillation ablations: FID / accuracy of each variant at each K it was sampled with."""
    body = []
    for r in bench.get("rows", []):
        ks = sorted({int(k.split("_")[1][1:]) for k in r if k.startswith("eval_k") and k.endswith("_fid")})
        if not ks:  # a teacher baseline row
            body.append([r["name"], "teacher", r.get("nfe"), r.get("fid"), r.get("accuracy")])
        for k in ks:
            body.append([r["name"], " ".join(r.get("overrides", [])) or "defaults", k,
                         r.get(f"eval_k{k}_fid"), r.get(f"eval_k{k}_accuracy")])
    return ["variant", "overrides", "NFE", "FID (digits)", "class accuracy"], body


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def curve_rows(rows: list[dict]) -> list[dict]:
    """The rows a quality-vs-NFE plot shows: whole sample sets (no group) and protocol averages, not per-style
    rows."""
    return [r for r in rows if r.get("group") in (None, "average")]


def plot_metric_vs_nfe(rows: list[dict], metric: str) -> bytes | None:
    """`metric` against NFE (log axis): the teacher's curve (its DDIM at each `evaluate.teacher_curve` count,
    CFG counted in NFE) as a line, the student's points on it (a unify student's 1/2/4-step curve dashed), and
    any other model (LoRA-transfer rows) as points. None when no row has the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, int]]] = {}
    protocols = set()
    for r in curve_rows(rows):
        value = (r.get("metrics") or {}).get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and r.get("nfe"):
            series.setdefault(str(r.get("model")), []).append((int(r["nfe"]), float(value), int(r.get("steps") or 0)))
            if r.get("protocol") not in (None, "prompts"):
                protocols.add(f"{r['protocol']} {r.get('protocol_version') or ''}".strip())
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    order = sorted(series, key=lambda name: (name != "teacher", name != "student", name))
    for name in order:
        points = sorted(series[name])
        x, y = [p[0] for p in points], [p[1] for p in points]
        if name == "teacher":
            ax.plot(x, y, "-o", color="0.35", lw=1.6, ms=5, label="teacher (DDIM, CFG in NFE)", zorder=2)
            for xi, yi, steps in points:  # labelled with the DDIM step count
                ax.annotate(f"{steps}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=7, color="0.35")
        elif name == "student":
            ax.plot(x, y, "--*", color="tab:red", lw=1.4, ms=11, label="student (TDM)", zorder=3)
        else:
            ax.plot(x, y, ":^", lw=1, ms=7, label=name, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs NFE" + (f" ({', '.join(sorted(protocols))})" if protocols else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _figure_png(fig)


def protocol_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """One line per distinct protocol the rows follow: name, version, n (of whole sets / averages), resolution,
    metric model, seed."""
    seen: dict[tuple, list] = {}
    for r in rows:
        key = (r.get("protocol") or "-", r.get("protocol_version") or "", r.get("resolution") or "",
               r.get("metric_model") or "", r.get("seed"))
        ns = seen.setdefault(key, [])
        if r.get("group") in (None, "average") and r.get("n") is not None and r["n"] not in ns:
            ns.append(r["n"])
    body = [[name, version, "/".join(map(str, ns)), res, model, seed]
            for (name, version, res, model, seed), ns in seen.items()]
    return ["protocol", "version", "n", "resolution", "metric model", "seed"], body


def external_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """One line per external student (a row with a `recipe`: `tdm evaluate` with `evaluate.lora`): what
    reproduces its samples in a stock pipeline (teacher, LoRA, scale, steps, guidance, scheduler class and its
    flow shift / timestep spacing / prediction type)."""
    body, seen = [], set()
    for r in rows:
        recipe = r.get("recipe")
        if not recipe or r.get("samples") in seen:
            continue  # a protocol's group rows share their sample set's recipe
        seen.add(r.get("samples"))
        sched = recipe.get("scheduler") or {}
        settings = ", ".join(f"{k}={sched[k]}" for k in ("flow_shift", "shift", "use_flow_sigmas", "timestep_spacing",
                                                          "prediction_type") if k in sched)
        body.append([r.get("model"), recipe.get("teacher"), recipe.get("lora"), recipe.get("lora_scale"),
                     recipe.get("steps"), recipe.get("guidance"), sched.get("_class_name"), settings])
    return ["model", "teacher", "LoRA", "scale", "steps", "guidance", "scheduler", "scheduler settings"], body


def read_losses(root: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Loss curves from the training stages' per-step logs (`metrics.jsonl`, written by tdm.training.run_loop):
    the teacher's loss, distillation's fake-score and generator losses."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for stage, keys in (("teacher_ft", ("loss",)), ("distill", ("loss_fake", "loss_gen"))):
        log = root / "outputs" / stage / "metrics.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                curves[f"{stage} {key}"] = ([p[0] for p in pts], [p[1] for p in pts])
    return curves


def plot_losses(curves: dict[str, tuple[list[int], list[float]]]) -> bytes | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.0), squeeze=False)
    for ax, (name, (x, y)) in zip(axes[0], curves.items()):
        ax.plot(x, y, lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log" if min(y) > 0 else "linear")
        ax.grid(alpha=0.3)
    return _figure_png(fig)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.grids{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figcaption{font-size:.85em;color:#555}img.grid{max-width:100%;height:auto}"""


def build(root: str | Path = ".") -> tuple[str, str, dict[str, bytes]]:
    """(html, markdown, {file name: png bytes}) of the report for the project at `root`."""
    root = Path(root)
    metrics = {s: _read_json(root / "metrics" / f"{s}.json") for s in STAGES}
    evaluation = metrics["evaluate"] or {}
    rows = evaluation.get("rows", [])
    parts_html, parts_md, images = [], [], {}

    def section(title: str, body_html: str, body_md: str) -> None:
        parts_html.append(f"<h2>{html.escape(title)}</h2>{body_html}")
        parts_md.append(f"## {title}\n\n{body_md}\n")

    def figure(name: str, png: bytes | None, caption: str) -> tuple[str, str]:
        if png is None:
            return "", ""
        images[name] = png
        return (f"<figure><img src='{_png_data_uri(png)}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>", f"![{caption}]({name})\n")

    if rows:
        h, md = _render(*cells(rows))
        section("Teacher vs student by NFE (evaluate stage)", h, md)
        h, md = _table(*protocol_table(rows))
        section("Evaluation protocol", h, md)
        header, body = external_table(rows)
        if body:
            h, md = _table(header, body)
            section("External students (a LoRA on the teacher, sampled by the stock pipeline's loop)", h, md)
        plots_h, plots_md = "", ""
        for metric in ("fid_digits", "fid", "hps", "clip_score", "aesthetic", "vbench_total", "vbench_quality"):
            fh, fm = figure(f"{metric}_vs_nfe.png", plot_metric_vs_nfe(rows, metric), f"{metric} vs NFE")
            plots_h, plots_md = plots_h + fh, plots_md + fm
        if plots_h:
            section("Quality vs NFE", plots_h, plots_md)
        grids_h, grids_md, shown = [], [], set()
        for r in rows:
            grid = Path(r.get("grid") or "")
            path = grid if grid.is_file() else root / grid
            if not r.get("grid") or not path.is_file() or str(path) in shown:
                continue  # a protocol's group rows share their sample set's grid
            shown.add(str(path))
            data = path.read_bytes()
            caption = f"{r.get('model')}, {r.get('steps')} steps (NFE {r.get('nfe')})"
            if r.get("protocol") not in (None, "prompts"):
                caption += f", {r['protocol']}"
            name = f"grid_{len(shown) - 1:02d}.png"
            images[name] = data
            grids_h.append(f"<figure><img class='grid' src='{_png_data_uri(data)}'>"
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            grids_md.append(f"![{caption}]({name})")
        if grids_h:
            section("Samples side by side", "<div class='grids'>" + "".join(grids_h) + "</div>",
                    "\n".join(grids_md) + "\n")
    transfer = metrics["lora_transfer"]
    if transfer:
        # Its rows are scored against each custom style's held-out set with a classifier of that style.
        h, md = _render(*cells(transfer["rows"])) if transfer.get("rows") else ("", "")
        flat = [[k, v] for k, v in _flatten(transfer).items() if isinstance(v, (int, float, str))]
        h2, md2 = _table(["lora_transfer", "value"], flat)
        section("LoRA transfer to custom models (lora_transfer stage, per-style metrics)", h + h2, md + "\n" + md2)
    student = student_rows(root / "outputs" / "distill" / "student")
    if student:
        h, md = _table(["student", "value"], student)
        section("The distilled student (outputs/distill/student)", h, md)
    stage_rows = []
    for stage in ("teacher_ft", "distill"):
        m = metrics[stage] or {}
        for key in ("train_time_s", "steps", "iterations", "parameters", "loss", "loss_fake", "loss_gen"):
            if key in m:
                stage_rows.append([stage, key, m[key]])
    if stage_rows:
        h, md = _table(["stage", "quantity", "value"], stage_rows)
        section("Training", h, md)
    fh, fm = figure("losses.png", plot_losses(read_losses(root)), "training losses vs step")
    if fh:
        section("Losses", fh, fm)
    bench = _read_json(root / "benchmarks" / "results" / "distill_ablations.json")
    if bench:
        h, md = _table(*ablation_table(bench))
        section("Distillation ablations (recorded: benchmarks/distill_ablations.py)", h, md)
    if not parts_html:
        raise FileNotFoundError(f"report: nothing to report under {root.resolve()}: run the stages first "
                                f"(metrics/*.json missing)")
    title = "TDM pipeline report"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
            f"<body><h1>{title}</h1>" + "".join(parts_html) + "</body></html>")
    return page, f"# {title}\n\n" + "\n".join(parts_md), images


def student_rows(folder: Path) -> list[list]:
    """What the distilled student is, from its record (tdm.student): family, K and grid, baked guidance, mode."""
    from tdm.student import StudentRecord

    r = StudentRecord.find(folder)
    if r is None:
        return []
    rows = [["family", r.family], ["K (steps)", ", ".join(map(str, r.sampling_ks))],
            ["timesteps", "; ".join(" ".join(map(str, r.timesteps(k).tolist())) for k in r.sampling_ks)],
            ["total_steps", r.total_steps], ["TDM-unify", r.unify], ["guidance baked in", r.guidance_label],
            ["mode", r.mode], ["teacher", r.teacher]]
    return [row for row in rows if row[1] is not None]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def run(cfg=None, root: str | Path = ".", progress: bool = True) -> dict:
    """Write outputs/report/{index.html, report.md, *.png} atomically."""
    root = Path(root)
    page, markdown, images = build(root)
    out = root / "outputs" / STAGE
    with atomic_folder(out) as tmp:
        (tmp / "index.html").write_text(page)
        (tmp / "report.md").write_text(markdown)
        for name, data in images.items():
            (tmp / name).write_bytes(data)
    return {"report": str(out / "index.html"), "markdown": str(out / "report.md"), "images": len(images)}
