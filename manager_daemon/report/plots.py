"""The report's plots, drawn with matplotlib's Agg canvas into PNG bytes of a fixed size.

Figures are made without pyplot, so reports can be drawn on worker threads. Every
intervention is marked where it was issued (dotted) and where the client applied it (solid),
in its source's colour; rollbacks and stops have their own markers, advisory decisions are
grey and dashed (nothing was applied), rejected proposals are crosses along the bottom.

Evaluated metrics are drawn on a scale set by their later evaluations (``focus``): the first
evaluations of a run are far from the rest, and an axis stretched to hold them squashes the
late rise that overfitting is.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass, field

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from integrations.protocol import Command, Scale, Source
from manager_daemon.report.data import RunData, Series
from manager_daemon.report.decisions import Row

DPI = 100
WIDTH = 1200
OBJECTIVE_HEIGHT = 440
PANEL_HEIGHT = 190
# Versions are labelled on the plot up to this many interventions; past it, labels would
# only hide the curve.
MAX_LABELS = 30

COLOURS = {
    Source.LLM.value: "#7b3fbf",
    Source.RULES.value: "#1f77b4",
    Source.HUMAN.value: "#e07b00",
}
ADVISORY = "#8a8a8a"
REJECTED = "#c62828"
STOP = "#c62828"
ROLLBACK = "#2e7d32"
BASELINE = "#d1495b"
CLIPPED = "#777777"
# The later evaluations that set an axis: those after this share of the steps evaluated.
EARLY_SHARE = 0.25
# How far past the later evaluations' range an axis reaches toward earlier ones, as a share
# of that range; and the stretch (full range ÷ the axis) below which the axis holds all.
REACH = 0.5
SQUASH = 1.5
# Values spanning this ratio or more (all positive) are drawn on a log scale.
LOG_RATIO = 100.0


@dataclass(frozen=True)
class Axis:
    """What one axis of a plot was drawn from: its series (by label) and its y scale."""

    label: str
    series: tuple[str, ...]
    ylim: tuple[float, float]
    yscale: str


@dataclass(frozen=True)
class Plot:
    """One PNG of the report and its size in pixels, and what its axes were drawn from."""

    name: str
    title: str
    png: bytes
    width: int
    height: int
    axes: tuple[Axis, ...] = field(default=())


@dataclass(frozen=True)
class Focus:
    """The y scale of evaluated series: linear or log, and the limits (None: all of it)."""

    yscale: str = "linear"
    ylim: tuple[float, float] | None = None


def focus(series: list[Series]) -> Focus:
    """The y scale on which the later evaluations of ``series`` fill the axis: a log scale
    where the values span orders of magnitude, and limits that reach only part of the way to
    earlier values far from the rest (a run's first evaluations)."""
    points = [(s, v) for one in series for s, v in one if math.isfinite(v)]
    values = [v for _, v in points]
    if len(points) < 4:
        return Focus()
    log = min(values) > 0 and max(values) / min(values) >= LOG_RATIO
    if log:
        points = [(s, math.log10(v)) for s, v in points]
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    cut = first + EARLY_SHARE * (last - first)
    late = [v for s, v in points if s >= cut]
    every = [v for _, v in points]
    low, high = min(late), max(late)
    span = (high - low) or abs(high) * 0.1 or 1.0
    low, high = max(min(every), low - REACH * span), min(max(every), high + REACH * span)
    pad = 0.05 * ((high - low) or span)
    low, high = low - pad, high + pad
    if max(every) - min(every) <= SQUASH * (high - low):
        return Focus("log" if log else "linear")
    if log:
        return Focus("log", (10**low, 10**high))
    return Focus("linear", (low, high))


def run_plots(data: RunData, table: list[Row], baseline: RunData | None = None) -> list[Plot]:
    """The objective (beside the baseline's, if any), the other evaluated metrics (if any)
    and the knobs (if any)."""
    plots = [_objective_plot(data, table, baseline)]
    if data.other_metrics:
        plots.append(_metrics_plot(data, table))
    if data.knob_names:
        plots.append(_knobs_plot(data, table))
    return plots


def comparison_plot(runs: list[RunData]) -> Plot:
    """The objective curves of several runs overlaid: managed solid, unmanaged dashed."""
    fig, canvas = _figure(WIDTH, OBJECTIVE_HEIGHT)
    ax = fig.add_subplot()
    for data in runs:
        steps, values = _xy(data.objective_series)
        ax.plot(
            steps,
            values,
            linestyle="-" if data.managed else "--",
            marker="o",
            markersize=3,
            label=f"{data.name} ({'managed' if data.managed else 'unmanaged'})",
        )
    _set_focus(ax, [d.objective_series for d in runs])
    metrics = sorted({str(d.objective) for d in runs})
    ax.set_title("objective: " + ", ".join(metrics))
    ax.set_xlabel(_steps_label(runs))
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(loc="best", fontsize=8)
    return _png(canvas, "comparison", "Objective of each run", WIDTH, OBJECTIVE_HEIGHT, [ax])


def _objective_plot(data: RunData, table: list[Row], baseline: RunData | None) -> Plot:
    fig, canvas = _figure(WIDTH, OBJECTIVE_HEIGHT)
    ax = fig.add_subplot()
    metric = data.objective.metric
    steps, values = _xy(data.objective_series)
    ax.plot(steps, values, color="black", marker="o", markersize=3, label=metric, zorder=3)
    evaluated = [data.objective_series]
    if baseline is not None:  # under the run's curve where the two are the same
        ax.plot(*_xy(baseline.objective_series), color=BASELINE, linestyle="--", marker="o",
                markersize=3, label=f"baseline: {baseline.name}", zorder=2)  # fmt: skip
        evaluated.append(baseline.objective_series)
    if data.train_key and data.objective.direction == "minimize" and "loss" in metric:
        train_steps, train_values = _xy(data.series.get(data.train_key, []))
        ax.plot(train_steps, train_values, color="#bbbbbb", linewidth=1, label=data.train_key)
    best = _best(data)
    if best is not None:
        ax.plot(*best, marker="*", markersize=14, color="#f2b705", ls="", label="best", zorder=4)
    _set_focus(ax, evaluated)
    _mark_interventions(ax, table, labels=True)
    ax.set_title(f"{data.objective.direction} {metric}", loc="left")
    ax.set_xlabel(_steps_label([data, *([baseline] if baseline else [])]))
    ax.grid(alpha=0.3)
    ax.legend(handles=_legend(ax, table), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _png(canvas, "objective", f"Objective: {metric}", WIDTH, OBJECTIVE_HEIGHT, [ax])


def _metrics_plot(data: RunData, table: list[Row]) -> Plot:
    keys = data.other_metrics
    height = PANEL_HEIGHT * len(keys) + 40
    fig, canvas = _figure(WIDTH, height)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        ax.plot(*_xy(data.series[key]), color="black", marker="o", markersize=3, label=key)
        _set_focus(ax, [data.series[key]])
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
        _mark_interventions(ax, table, labels=False)
    axes[-1].set_xlabel(_steps_label([data]))
    return _png(canvas, "metrics", "Other evaluated metrics", WIDTH, height, list(axes))


def _steps_label(runs: list[RunData]) -> str:
    if any(d.stepless for d in runs):
        return "step (metrics logged without steps: their order logged)"
    return "step"


def _set_focus(ax: Axes, series: list[Series]) -> None:
    """Scale ``ax`` by ``focus``; say how many points are off the axis and how far."""
    chosen = focus(series)
    ax.set_yscale(chosen.yscale)
    if chosen.ylim is None:
        return
    ax.set_ylim(*chosen.ylim)
    low, high = chosen.ylim
    values = [v for one in series for _, v in one if math.isfinite(v)]
    notes = [
        f"{len(off)} earlier point(s) {where} the axis, to {extreme(off):.4g}"
        for off, where, extreme in (
            ([v for v in values if v > high], "above", max),
            ([v for v in values if v < low], "below", min),
        )
        if off
    ]
    # Below the axis, left of the step label: where the clipped points are, the curve is.
    ax.text(0.0, -0.07, "; ".join(notes), transform=ax.transAxes, ha="left", va="top",
            fontsize=8, color=CLIPPED)  # fmt: skip


def _knobs_plot(data: RunData, table: list[Row]) -> Plot:
    names = data.knob_names
    height = PANEL_HEIGHT * len(names) + 40
    fig, canvas = _figure(WIDTH, height)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    last_step = max((s for s, _ in data.objective_series), default=0)
    last_step = max([last_step, *(r.step or 0 for r in table), *data.applied.values()])
    for ax, name in zip(axes, names, strict=True):
        line, changes, advisory = _knob_series(data, table, name)
        steps, values = _xy([*line, (last_step, line[-1][1])] if line else [])
        ax.step(steps, values, where="post", color="black", linewidth=1.5)
        for source in sorted({c[2] for c in changes}):
            mine = [(step, value) for step, value, by in changes if by == source]
            ax.plot(*_xy(mine), marker="o", color=COLOURS.get(source, "black"), linestyle="")
        if advisory:
            ax.plot(*_xy(advisory), marker="o", markerfacecolor="none", color=ADVISORY, ls="")
        knob = data.spec.knob(name) if data.spec else None
        if knob is not None and knob.scale is Scale.LOG and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
        _mark_interventions(ax, table, labels=False)
    axes[-1].set_xlabel("step")
    return _png(canvas, "knobs", "Knobs", WIDTH, height)


def _knob_series(
    data: RunData, table: list[Row], name: str
) -> tuple[Series, list[tuple[int, float, str]], Series]:
    """A knob's value over steps (from the spec's start value, changing where each version
    was applied, or issued when no application was acknowledged), the changes with their
    sources, and the values advisory decisions would have set."""
    records = {r.decision_id: r for r in data.records}
    start = data.spec.knob(name) if data.spec else None
    line: Series = [(0, start.value)] if start is not None else []
    changes: list[tuple[int, float, str]] = []
    advisory: Series = []
    for row in table:
        value = records[row.decision_id].values.get(name)
        if value is None or not row.intervention or row.superseded:
            continue  # a superseded version's values reached the run with the next one
        if row.status == "advisory":
            advisory.append((row.step or 0, value))
            continue
        step = row.applied_step if row.applied_step is not None else row.step or 0
        if not line or line[-1][1] != value:
            changes.append((step, value, row.source))
        line.append((step, value))
    line.sort(key=lambda p: p[0])
    return line, changes, advisory


def _mark_interventions(ax: Axes, table: list[Row], *, labels: bool) -> None:
    """Every intervention on ``ax``; with ``labels`` (the objective's plot) their versions and
    the rejected proposals too."""
    # Lines and markers of a kind are drawn as one collection each: a run with hundreds of
    # interventions draws as fast as one with a few.
    top = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    lines: dict[tuple[str, str], list[int]] = defaultdict(list)  # (colour, style) → steps
    marks: dict[str, list[int]] = defaultdict(list)  # command → steps
    interventions = [r for r in table if r.intervention]
    near = max(ax.dataLim.width, 1.0) / 40  # labels closer than this go on two levels
    last_label, level = -math.inf, 0
    for row in interventions:
        colour = ADVISORY if row.status == "advisory" else COLOURS.get(row.source, "black")
        issued = row.step or 0
        if row.status == "advisory":
            lines[(colour, "--")].append(issued)
            continue
        lines[(colour, ":")].append(issued)
        if row.applied_step is not None:
            lines[(colour, "-")].append(row.applied_step)
        at = row.applied_step if row.applied_step is not None else issued
        for command in row.commands:
            marks[command].append(at)
        if labels and len(interventions) <= MAX_LABELS and row.version:
            level = 1 - level if at - last_label < near else 0
            last_label = at
            ax.text(at, 1.01 + 0.04 * level, f"v{row.version}", transform=top, color=colour,
                    fontsize=8, ha="center", va="bottom")  # fmt: skip
    a = 0.8 if len(interventions) <= MAX_LABELS else 0.35  # with many lines, the curve shows
    for (colour, style), steps in lines.items():
        width = 1.2 if style == "-" else 1.0
        ax.vlines(steps, 0, 1, transform=top, colors=colour, linestyles=style, lw=width, alpha=a)
    for command, (shape, colour, size) in _COMMAND_MARKS.items():
        if marks[command]:
            ax.plot(marks[command], [0.96] * len(marks[command]), marker=shape, color=colour,
                    markersize=size, transform=top, ls="")  # fmt: skip
    rejected = [r.step or 0 for r in table if r.status == "rejected"]
    if rejected and labels:
        ax.plot(rejected, [0.03] * len(rejected), marker="x", color=REJECTED, ls="", ms=8,
                transform=top)  # fmt: skip


_COMMAND_MARKS = {
    Command.ROLLBACK_TO_BEST.value: ("<", ROLLBACK, 11),
    Command.STOP.value: ("s", STOP, 10),
}


def _legend(ax: Axes, table: list[Row]) -> list[Line2D]:
    handles, _ = ax.get_legend_handles_labels()
    sources = sorted({r.source for r in table if r.status == "issued"})
    handles += [Line2D([], [], color=COLOURS.get(s, "black"), label=s) for s in sources]
    statuses = {r.status for r in table}
    commands = {c for r in table if r.status == "issued" for c in r.commands}
    if "issued" in statuses:
        handles.append(Line2D([], [], color="black", linestyle=":", label="issued"))
        handles.append(Line2D([], [], color="black", linestyle="-", label="applied"))
    if "advisory" in statuses:
        handles.append(Line2D([], [], color=ADVISORY, linestyle="--", label="advisory"))
    if "rejected" in statuses:
        handles.append(_marker("x", REJECTED, "rejected"))
    if Command.ROLLBACK_TO_BEST.value in commands:
        handles.append(_marker("<", ROLLBACK, "rollback to best"))
    if Command.STOP.value in commands:
        handles.append(_marker("s", STOP, "stop"))
    return handles


def _marker(shape: str, colour: str, label: str) -> Line2D:
    return Line2D([], [], marker=shape, color=colour, linestyle="", label=label)


def _best(data: RunData) -> tuple[int, float] | None:
    best: tuple[int, float] | None = None
    for step, value in data.objective_series:
        if math.isfinite(value) and (best is None or data.objective.better(value, best[1])):
            best = (step, value)
    return best


def _xy(series: Series) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v for _, v in series]


def _figure(width: int, height: int) -> tuple[Figure, FigureCanvasAgg]:
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    return fig, FigureCanvasAgg(fig)


def _png(
    canvas: FigureCanvasAgg,
    name: str,
    title: str,
    width: int,
    height: int,
    axes: list[Axes] | None = None,
) -> Plot:
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    drawn = tuple(_axis(ax) for ax in axes or [])
    return Plot(name, title, buffer.getvalue(), width, height, drawn)


def _axis(ax: Axes) -> Axis:
    # Lines without a label of their own (markers of interventions) are not series.
    labels = tuple(
        str(ln.get_label()) for ln in ax.get_lines() if not ln.get_label().startswith("_")
    )
    low, high = ax.get_ylim()
    return Axis(ax.get_ylabel() or ax.get_title(loc="left") or ax.get_title(), labels,
                (float(low), float(high)), ax.get_yscale())  # fmt: skip
