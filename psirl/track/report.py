"""Self-contained HTML reports of runs: one file, no external assets, readable offline.

`write_report(run_dir)` -> run_dir/report.html, read top-down in thirty seconds: a verdict with
its reason (the worst of psirl.track.diagnostics' checks), one large smoothed chart of the gold
metric against the training reward with the best evaluation marked, the diagnostics table, key
metrics; every other chart and the config folded away. `write_compare_report(run_dirs, out_path)`
overlays several runs' curves (legend = run folder name) and tabulates their final values and
config differences.

Plots are matplotlib figures rendered with the Agg canvas (no GUI, no global backend switch) and
embedded as base64 PNG data URIs. One figure per group keeps it fast with many metrics.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from psirl.track import diagnostics
from psirl.track.metrics import read_metrics

REPORT_FILE = "report.html"
DEFAULT_COMPARE_METRICS = (
    "reward/mean",
    "eval/accuracy",
    "kl/mean",
    "entropy/mean",
    "response/length_mean",
)
# Group order after "eval": the quantities one reads first; other groups follow alphabetically.
GROUP_ORDER = ("eval", "reward", "kl", "loss", "entropy", "response", "clip", "advantage")
# Multi-turn runs (an `env:` section): what the "Episodes" table shows, in this order, with the
# meaning of each name (psirl/rollout/episode.py, psirl/envs/__init__.py evaluate_env).
EPISODE_METRICS = {
    "eval/env_success": "held-out success (greedy): episodes ended by a rewarded answer",
    "eval/env_success_sampled": "held-out success (sampled, temperature 1)",
    "eval/env_turns": "held-out model turns per episode (greedy)",
    "eval/env_tool_call": "held-out share of model turns calling the tool (greedy)",
    "eval/env_tool_ok": "held-out tool-call success rate: calls that ran (greedy)",
    "episode/turns_mean": "training: model turns per episode",
    "env/tool_call": "training: share of model turns calling the tool",
    "env/tool_ok": "training: tool-call success rate (calls that ran)",
    "episode/env_tokens_mean": "training: environment tokens per episode",
    "time/env_s": "training: seconds per step inside the environment",
    "time/generate_s": "training: seconds per step generating episodes",
}
UNGROUPED = "other"

_PANEL_W, _PANEL_H, _DPI, _NCOLS = 3.4, 2.3, 80, 3


# --------------------------------------------------------------------------- series


def numeric_series(
    records: Sequence[Mapping[str, Any]],
) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) for every numeric metric (bools, strings and None skipped).

    Non-finite values are kept (plotted as gaps). The "time" key (wall clock) is not a metric.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        step = rec["step"]
        for key, value in rec.items():
            if (
                key in ("step", "time")
                or isinstance(value, bool)
                or not isinstance(value, int | float)
            ):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def group_of(name: str) -> str:
    """The prefix before the first '/', e.g. 'reward/mean' -> 'reward'; 'loss' -> 'other'."""
    return name.split("/", 1)[0] if "/" in name else UNGROUPED


def group_metrics(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(group, sorted names)] with 'eval' first, then GROUP_ORDER, then the rest alphabetically
    ('other' — names without a prefix — last)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)

    def rank(g: str) -> tuple[int, str]:
        if g in GROUP_ORDER:
            return (GROUP_ORDER.index(g), g)
        return (len(GROUP_ORDER) + (1 if g == UNGROUPED else 0), g)

    return [(g, sorted(groups[g])) for g in sorted(groups, key=rank)]


def best_direction(name: str) -> str | None:
    """'max' for gold metrics (held-out eval/*, task accuracy) and the mean reward; None for
    everything else (a "best" loss, KL or entropy means nothing on its own)."""
    lower = name.lower()
    if group_of(name) == "eval" or "accuracy" in lower or lower in ("reward/mean", "reward"):
        return "max"
    return None


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


# --------------------------------------------------------------------------- plotting


def _png_data_uri(panels: Sequence[tuple[str, Sequence[tuple[str | None, list, list]]]]) -> str:
    """Render a grid of small line plots to a base64 PNG data URI.

    panels: [(title, [(label or None, steps, values), ...])]; one colour per line index, so
    the same run has the same colour in every panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    ncols = min(_NCOLS, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(_PANEL_W * ncols, _PANEL_H * nrows), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    has_labels = False
    for ax, (title, lines) in zip(axes, panels, strict=False):
        for i, (label, steps, values) in enumerate(lines):
            style = {"marker": "o", "markersize": 3} if len(steps) <= 30 else {}
            ax.plot(steps, values, color=f"C{i % 10}", linewidth=1.2, label=label, **style)
            has_labels = has_labels or label is not None
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    legend_h = 0.0
    if has_labels:
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:n]:  # a metric missing from the first panel's runs
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(
            handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8, frameon=False
        )
        legend_h = 0.25 * math.ceil(len(labels) / 4) + 0.1
    # Fixed margins in inches (tight_layout costs as much as drawing).
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + legend_h)
    height += legend_h
    fig.subplots_adjust(
        left=0.55 / width,
        right=1 - 0.15 / width,
        bottom=0.35 / height,
        top=1 - (0.3 + legend_h) / height,
        wspace=0.3,
        hspace=0.45,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- HTML pieces

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; }
.note { color: #888; font-style: italic; }
td.finding { text-align: left; max-width: 36em; } td.numbers { text-align: left; font-size: 0.9em; }
.sev-ok { background: #e6f4ea; } .sev-watch { background: #fff4d6; }
.sev-alarm { background: #fbe0e0; font-weight: bold; } .sev-skipped { color: #888; }
.verdict { border-radius: 6px; padding: 0.8em 1.1em; margin: 0.8em 0 1.2em; font-size: 1.05em; }
.verdict b { font-size: 1.35em; display: block; margin-bottom: 0.25em; }
.verdict.sev-ok { border: 2px solid #2e7d32; } .verdict.sev-watch { border: 2px solid #b8860b; }
.verdict.sev-alarm { border: 2px solid #c62828; font-weight: normal; }
.verdict.sev-skipped { border: 2px solid #bbb; color: #444; }
.findings th, .findings td { text-align: left; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(c if isinstance(c, str) else _fmt(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def _summary_rows(
    series: Mapping[str, tuple[list[int], list[float]]], names: Sequence[str]
) -> list[list]:
    rows = []
    for name in names:
        steps, values = series[name]
        finite = _finite(values)
        direction = best_direction(name)
        best = "—"
        if direction and finite:
            pick = min if direction == "min" else max
            i = pick((i for i, v in enumerate(values) if math.isfinite(v)), key=lambda i: values[i])
            best = f"{_fmt(values[i])} (step {steps[i]})"
        rows.append(
            [
                name,
                values[-1],
                min(finite) if finite else None,
                max(finite) if finite else None,
                best,
            ]
        )
    return rows


def _episodes_section(series: Mapping[str, tuple[list[int], list[float]]]) -> list[str]:
    """The "Episodes" table of a multi-turn run: turns per episode, tool-call rate and success
    rate, environment time, held-out success (first and final value: before and after
    training); nothing for a run without episode metrics."""
    names = [n for n in EPISODE_METRICS if n in series]
    if not any(n.startswith(("episode/", "eval/env_")) for n in names):
        return []
    rows = []
    for name in names:
        steps, values = series[name]
        finite = _finite(values)
        rows.append([name, EPISODE_METRICS[name], values[0], values[-1],
                     sum(finite) / len(finite) if finite else None])
    return ["<h2>Episodes (multi-turn)</h2>",
            _table(["metric", "meaning", "first", "final", "mean"], rows)]


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


# --------------------------------------------------------------------------- diagnostics


def _numbers_text(numbers: Mapping[str, Any]) -> str:
    return "; ".join(f"{k} = {_fmt(v)}" for k, v in numbers.items())


def _findings_table(findings: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("check", "severity", "numbers", "finding"))
    rows = []
    for f in findings:
        sev = html.escape(f["severity"])
        rows.append(
            f'<tr><td>{html.escape(f["title"])}</td><td class="sev-{sev}">{sev}</td>'
            f'<td class="numbers">{html.escape(_numbers_text(f["numbers"]))}</td>'
            f'<td class="finding">{html.escape(f["explanation"])}</td></tr>'
        )
    return (f'<table class="findings"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


MAIN_W, MAIN_H, MAIN_DPI = 10.0, 4.6, 100  # the gold-vs-reward chart: 1000 x 460 px


def gold_names(series: Mapping[str, Any]) -> list[str]:
    """Gold metrics present: every eval/* accuracy or pass@k and a multi-turn run's held-out
    success eval/env_success* (a curve identical to an earlier one left out), else
    task/accuracy."""
    held_out = sorted(n for n in series if group_of(n) == "eval"
                      and ("accuracy" in n or "pass@" in n))
    # pass@1_greedy repeats accuracy_greedy for a 0/1 reward: one line, not two on top.
    distinct: list[str] = []
    for name in held_out:
        if not any(series[name] == series[kept] for kept in distinct):
            distinct.append(name)
    if distinct:
        return distinct
    return [n for n in ("task/accuracy",) if n in series]


def main_chart_png(series: Mapping[str, tuple[list[int], list[float]]],
                   best: tuple[str, int, float] | None) -> str | None:
    """The one large chart: gold metrics against the training reward, smoothed.

    Each curve is drawn raw (thin, faint) and smoothed (diagnostics.smooth with
    default_window of its length); the reward goes on a right axis when it leaves [0, 1] (a
    learned reward model); a dashed line marks `best` = (gold metric, step, value). The legend
    sits below the axes, never over the data. None when there is neither gold nor reward.
    """
    golds = gold_names(series)
    reward = series.get(diagnostics.PROXY_METRIC)
    if not golds and reward is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(MAIN_W, MAIN_H), dpi=MAIN_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()

    def draw(axis, steps, values, color, label, width):
        pairs = [(x, v) for x, v in zip(steps, values, strict=True) if math.isfinite(v)]
        if not pairs:
            return
        xs, vs = [x for x, _ in pairs], [v for _, v in pairs]
        smoothed = diagnostics.smooth(vs, diagnostics.default_window(len(vs)))
        if smoothed != vs:
            axis.plot(xs, vs, color=color, linewidth=0.8, alpha=0.25)
        style = {"marker": "o", "markersize": 4} if len(xs) <= 30 else {}
        axis.plot(xs, smoothed, color=color, linewidth=width, label=label, **style)

    for i, name in enumerate(golds):
        draw(ax, *series[name], f"C{(i + 1) % 10}", f"{name} (gold)", 2.6)
    reward_axis = ax
    if reward is not None:
        finite = _finite(reward[1])
        if finite and (min(finite) < -0.05 or max(finite) > 1.05):
            reward_axis = ax.twinx()
            reward_axis.set_ylabel("training reward", fontsize=10)
        draw(reward_axis, *reward, "C0", "reward/mean (training reward)", 1.8)
    if best is not None:
        name, step, value = best
        ax.axvline(step, color="0.3", linestyle="--", linewidth=1.2,
                   label=f"best by {name}: step {step} ({value:.3g})")
    ax.set_xlabel("step", fontsize=10)
    ax.set_ylabel("gold metric" + ("" if reward_axis is not ax else " / reward"), fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if reward_axis is not ax:
        h, lab = reward_axis.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=10,
               frameon=False)
    rows = math.ceil(len(labels) / 3)
    fig.subplots_adjust(left=0.07, right=0.93 if reward_axis is not ax else 0.98, top=0.96,
                        bottom=0.14 + 0.055 * rows)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def best_by_gold(series: Mapping[str, tuple[list[int], list[float]]]
                 ) -> tuple[str, int, float] | None:
    """(gold metric, step, value) of the best evaluation (first maximum of the raw values)."""
    for name in gold_names(series):
        steps, values = series[name]
        finite = [i for i, v in enumerate(values) if math.isfinite(v)]
        if finite:
            i = max(finite, key=lambda i: (values[i], -i))
            return name, steps[i], values[i]
    return None


def is_control(config_text: str | None) -> bool:
    """True when the run's config has `reward.shuffle: true` (the shuffled-reward control)."""
    if not config_text:
        return False
    import yaml

    try:
        data = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return False
    reward = data.get("reward") if isinstance(data, dict) else None
    return isinstance(reward, dict) and reward.get("shuffle") is True


def _verdict_html(report: Mapping[str, Any], control: bool) -> str:
    found = diagnostics.verdict(report)
    sev = html.escape(found["severity"])
    note = ""
    if control:
        note = ("<br><i>This run is a shuffled-reward control: its gold metric must not improve. "
                "A gold-progress alarm here is the expected result and shows that the real "
                "run's gain comes from its reward.</i>")
    return (f'<div class="verdict sev-{sev}"><b>{html.escape(found["headline"])}</b>'
            f'{html.escape(found["reason"])}{note}</div>')


def _diagnostics_section(report: Mapping[str, Any]) -> list[str]:
    """Findings table of every diagnostic (the verdict above already names the worst)."""
    parts = ["<h2>Diagnostics</h2>"]
    if report["overall"] == diagnostics.SKIPPED:
        parts.append(f'<p class="note">no diagnostics: none of the metrics they read has '
                     f"{diagnostics.MIN_POINTS} steps</p>")
        return parts
    parts.append(_findings_table([f for f in report["findings"]
                                  if f["severity"] != diagnostics.SKIPPED]))
    skipped = [f["title"] for f in report["findings"] if f["severity"] == diagnostics.SKIPPED]
    if skipped:
        parts.append(f'<p class="note">not enough data for: {html.escape(", ".join(skipped))}</p>')
    return parts


def _is_flat(values: Sequence[float]) -> bool:
    finite = _finite(values)
    return len(finite) < 2 or max(finite) - min(finite) <= 1e-12 * max(1.0, abs(finite[0]))


# --------------------------------------------------------------------------- single run


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write a self-contained HTML report of one run; return its path (default run_dir/report.html).

    Read top-down in thirty seconds: the verdict (the worst diagnostic and its reason; a note
    when the config marks a shuffled-reward control), one large chart of the gold metric against
    the training reward (smoothed, best evaluation marked), the diagnostics table, a table of the
    key metrics (best only for gold metrics and the reward), then, folded: every other metric's
    chart (flat ones listed, not drawn) and the config.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_path = Path(out) if out is not None else run_dir / REPORT_FILE
    series = numeric_series(records)
    name = run_dir.resolve().name
    config = _read_text(run_dir / "config.yaml")
    report = diagnostics.reward_hacking_report(records)

    parts = [f"<h1>{html.escape(name)}</h1>"]
    meta = [f"run folder: {html.escape(str(run_dir))}", f"records: {len(records)}"]
    if records:
        meta.append(f"steps: {records[0]['step']} – {records[-1]['step']}")
        times = [r["time"] for r in records if isinstance(r.get("time"), int | float)]
        if len(times) >= 2:
            meta.append(f"wall time: {_duration(times[-1] - times[0])}")
    meta.append(f"generated: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
    parts.append(f'<p class="meta">{" · ".join(meta)}</p>')
    parts.append(_verdict_html(report, is_control(config)))

    best = best_by_gold(series)
    uri = main_chart_png(series, best)
    if uri is not None:
        parts.append("<h2>Gold metric vs training reward</h2>")
        parts.append(f'<img src="{uri}" alt="gold metric vs training reward">')
        if best is not None:
            parts.append(f'<p class="meta">best evaluation by {html.escape(best[0])}: step '
                         f"{best[1]} ({_fmt(best[2])})</p>")
    parts.extend(_diagnostics_section(report))

    groups = group_metrics(list(series))
    key = gold_names(series) + [n for n in (diagnostics.PROXY_METRIC, diagnostics.KL_METRIC,
                                            diagnostics.ZERO_SIGNAL_METRIC) if n in series]
    parts.append("<h2>Key metrics</h2>")
    if not series:
        parts.append('<p class="note">no numeric metrics recorded yet</p>')
    else:
        parts.append(_table(["metric", "final", "min", "max", "best"],
                            _summary_rows(series, [n for n in key if n in series])))

    parts.extend(_episodes_section(series))

    charted = [(g, [n for n in names if not _is_flat(series[n][1])]) for g, names in groups]
    flat = sorted(n for _, names in groups for n in names if _is_flat(series[n][1]))
    n_charts = sum(len(names) for _, names in charted)
    inner = []
    for group, names in charted:
        if not names:
            continue
        title = "eval (held-out)" if group == "eval" else group
        panels = [(n, [(None, *series[n])]) for n in names]
        inner.append(f"<h3>{html.escape(title)}</h3>")
        alt = f"{group} metrics: {', '.join(names)}"  # the names stay searchable text
        inner.append(f'<img src="{_png_data_uri(panels)}" alt="{html.escape(alt)}">')
    if flat:
        inner.append(f'<p class="note">constant over the run (not drawn): '
                     f'{html.escape(", ".join(flat))}</p>')
    if series:
        parts.append(f"<details><summary>All metrics ({n_charts} charts)</summary>"
                     f"{''.join(inner)}</details>")

    if config is None:
        parts.append('<p class="note">no config.yaml in the run folder</p>')
    else:
        parts.append(f"<details><summary>Config</summary><pre>{html.escape(config)}</pre>"
                     "</details>")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(_page(f"psirl report: {name}", "\n".join(parts)), encoding="utf-8")
    return out_path


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{seconds:.1f}s")


# --------------------------------------------------------------------------- several runs


def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Legend labels: each run folder's name, or parent/name where names repeat."""
    paths = [Path(d).resolve() for d in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_differences(run_dirs: Sequence[str | os.PathLike]) -> list[list[str]]:
    """[[dotted key, value in run 1, value in run 2, ...]] for config keys that differ between
    runs (from each run_dir/config.yaml; output_dir ignored; '—' where a run lacks the key)."""
    import yaml

    flats = []
    for d in run_dirs:
        text = _read_text(Path(d) / "config.yaml")
        data = yaml.safe_load(text) if text else {}
        flats.append(_flatten(data if isinstance(data, dict) else {}))
    keys = sorted({k for f in flats for k in f} - {"output_dir"})
    missing = object()
    rows = []
    for key in keys:
        vals = [f.get(key, missing) for f in flats]
        if any(v != vals[0] for v in vals[1:]):
            rows.append([key, *("—" if v is missing else str(v) for v in vals)])
    return rows


def write_compare_report(
    run_dirs: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    metrics: Sequence[str] = DEFAULT_COMPARE_METRICS,
) -> Path:
    """Overlay several runs' curves of `metrics` (legend = run folder name) in one self-contained
    HTML file; add a table of final values and one of the config keys that differ. Returns out_path.
    A metric no run recorded is listed, not plotted.
    """
    if not run_dirs:
        raise ValueError("write_compare_report: no run folders given")
    out_path = Path(out_path)
    labels = run_labels(run_dirs)
    all_series = [numeric_series(read_metrics(d)) for d in run_dirs]

    present = [m for m in metrics if any(m in s for s in all_series)]
    absent = [m for m in metrics if m not in present]

    parts = [f"<h1>psirl comparison: {len(labels)} runs</h1>"]
    parts.append(
        '<p class="meta">'
        + " · ".join(html.escape(f"{lab} ({d})") for lab, d in zip(labels, run_dirs, strict=True))
        + f" · generated: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}</p>"
    )
    links = []
    for lab, d in zip(labels, run_dirs, strict=True):
        report = Path(d) / REPORT_FILE
        if report.is_file():
            rel = os.path.relpath(report.resolve(), out_path.parent.resolve())
            links.append(f'<a href="{html.escape(Path(rel).as_posix())}">{html.escape(lab)}</a>')
    if links:
        parts.append(f"<p>run reports: {' · '.join(links)}</p>")

    parts.append("<h2>Final values</h2>")
    rows = []
    for lab, s in zip(labels, all_series, strict=True):
        rows.append([lab, *(s[m][1][-1] if m in s else None for m in present)])
    parts.append(
        _table(["run", *present], rows)
        if present
        else '<p class="note">none of the metrics was recorded</p>'
    )

    if present:
        parts.append("<h2>Curves</h2>")
        panels = [
            (
                m,
                [
                    (lab, *s[m]) if m in s else (lab, [], [])
                    for lab, s in zip(labels, all_series, strict=True)
                ],
            )
            for m in present
        ]
        parts.append(f'<img src="{_png_data_uri(panels)}" alt="comparison curves">')
    if absent:
        parts.append(
            f'<p class="note">not recorded by any run: {html.escape(", ".join(absent))}</p>'
        )

    diffs = config_differences(run_dirs)
    parts.append("<h2>Config differences</h2>")
    parts.append(
        _table(["key", *labels], diffs) if diffs else '<p class="note">none (or no config.yaml)</p>'
    )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(_page("psirl comparison", "\n".join(parts)), encoding="utf-8")
    return out_path
