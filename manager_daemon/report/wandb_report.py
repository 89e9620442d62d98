"""The report as a W&B Report (``wandb_workspaces.reports.v2``), for runs on W&B.

Built from the same tracker-neutral data as the HTML page: line plots of the objective and
the knobs over the runs of the report, the decisions as a markdown table, the same summary.
The spec is made offline (the runsets name no entity or project, so they take the report's);
only ``save`` talks to W&B.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any

from integrations.protocol import METRIC_PARAMS_VERSION
from manager_daemon.report.baseline import Baseline, ratio, ratio_text
from manager_daemon.report.data import RunData
from manager_daemon.report.decisions import Row, Summary, rows, summarize

if TYPE_CHECKING:
    import wandb_workspaces.reports.v2 as wr

_SCHEME = "wandb://"
# Decisions a W&B Report lists in full; an older decision is counted, not listed.
MAX_TABLE_ROWS = 200


def target(uri: str) -> tuple[str, str] | None:
    """The entity and project of a ``wandb://ENTITY/PROJECT`` tracker, else None."""
    if not uri.startswith(_SCHEME):
        return None
    entity, _, project = uri.removeprefix(_SCHEME).strip("/").partition("/")
    if not entity or not project or "/" in project:
        raise ValueError(f"W&B tracking URI {uri!r} is not of the form wandb://ENTITY/PROJECT")
    return entity, project


def _reports() -> Any:
    with warnings.catch_warnings():
        # wandb_workspaces still declares pydantic v1-style validators.
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as module
    return module


def build(
    runs: list[RunData],
    entity: str,
    project: str,
    *,
    title: str,
    budget: int | None = None,
    baseline: Baseline | None = None,
) -> wr.Report:
    """A W&B Report of ``runs`` (one run, or an experiment's runs) in ``entity/project``; a
    ``baseline`` is plotted beside them and compared in the summary."""
    wr = _reports()
    plotted = runs + ([baseline.data] if baseline else [])
    runset = wr.Runset(name="runs", filters=_filter(plotted))
    blocks: list[Any] = [wr.H1(f"What the manager did: {title}")]
    metrics = sorted({d.objective.metric for d in runs})
    knobs = sorted({k for d in runs for k in d.knob_names})
    applied = any(d.applied for d in runs)
    panels = [wr.LinePlot(title=f"objective: {m}", x="Step", y=[m]) for m in metrics]
    panels += [wr.LinePlot(title=f"knob: {k}", x="Step", y=[k]) for k in knobs]
    if applied:
        panels.append(
            wr.LinePlot(title="params version applied", x="Step", y=[METRIC_PARAMS_VERSION])
        )
    blocks.append(wr.PanelGrid(runsets=[runset], panels=panels))
    for data in runs:
        table = rows(data)
        summary = summarize(data, table, budget)
        if len(runs) > 1:
            blocks.append(wr.H2(f"{data.name} ({'managed' if data.managed else 'unmanaged'})"))
        blocks.append(wr.H2("Summary") if len(runs) == 1 else wr.H3("Summary"))
        blocks.append(wr.MarkdownBlock(text=summary_markdown(data, summary, baseline)))
        if table:
            blocks.append(wr.H2("Decisions") if len(runs) == 1 else wr.H3("Decisions"))
            blocks.append(wr.MarkdownBlock(text=decisions_markdown(table)))
    return wr.Report(
        entity=entity,
        project=project,
        title=f"atm report: {title}",
        description="Every decision of the manager, its verdicts and measured outcome.",
        blocks=blocks,
    )


def save(report: wr.Report) -> str:
    """Save the report to its project (created if missing); its URL."""
    report.save()
    return str(report.url)


def _filter(runs: list[RunData]) -> str:
    ids = ", ".join(repr(d.run.run_id) for d in runs)
    return f"ID in [{ids}]"


def summary_markdown(data: RunData, summary: Summary, baseline: Baseline | None = None) -> str:
    """The summary as markdown: the run's health where it is not deciding, the objective
    (beside the baseline's), interventions by source and status, budget."""
    metric = _cell(data.objective.metric)
    lines = _notes(data)
    final = _point(summary.final)
    if summary.restored_at is not None:
        final += (
            f", the best state restored at step {summary.restored_at} "
            f"(last evaluation {_point(summary.last)})"
        )
    lines += [f"- best {metric}: {_point(summary.best)}; final: {final}"]
    if baseline is not None:
        lines += _comparison(data, summary, baseline)
    lines += [
        f"- decisions: {summary.decisions}; interventions issued: {summary.issued} "
        f"({summary.rollbacks} rollback(s), {summary.stops} stop(s))",
        f"- automatic interventions used: {summary.automatic_issued}"
        + (f" of {summary.budget}" if summary.budget is not None else ""),
        f"- model calls: {summary.llm_calls}, {summary.llm_seconds:.1f} s, "
        f"{summary.prompt_tokens} + {summary.completion_tokens} tokens",
    ]
    if summary.sources:
        statuses = sorted({s for _, s in summary.by_status})
        verdicts = sorted({v for _, v in summary.by_verdict})
        head = ["source", *statuses, *(f"changes {v}" for v in verdicts)]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for source in summary.sources:
            counts = [summary.by_status[(source, s)] for s in statuses]
            counts += [summary.by_verdict[(source, v)] for v in verdicts]
            lines.append(f"| {source} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)


def _notes(data: RunData) -> list[str]:
    return [*(f"**{_cell(note)}**" for note in data.notes), ""] if data.notes else []


def _comparison(data: RunData, summary: Summary, baseline: Baseline) -> list[str]:
    other = baseline.summary
    return [
        f"- baseline: {_cell(baseline.data.name)} ({baseline.data.run.run_id}), "
        f"{_cell(baseline.chosen)}: best {_point(other.best)}; final {_point(other.final)}",
        f"- this run ÷ baseline: best {ratio_text(ratio(summary.best, other.best))}; "
        f"final {ratio_text(ratio(summary.final, other.final))}",
    ]


def decisions_markdown(table: list[Row]) -> str:
    """Every decision (the latest ``MAX_TABLE_ROWS``) as a markdown table; run-provided text
    is escaped so that it cannot break the table or add markup."""
    head = "| decision | step | by | status | verdicts | reason | objective before → after |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    shown = table[-MAX_TABLE_ROWS:]
    for row in shown:
        by = row.source + (f" ({row.model})" if row.model else "")
        if row.tokens is not None:
            by += f", {row.latency_s or 0:.2f} s, {row.tokens} tokens"
        step = f"{row.step}" + (f" → {row.applied_step}" if row.applied_step is not None else "")
        status = row.status + (f" v{row.version}" if row.version else "")
        verdicts = "; ".join(
            f"{v.what} {v.verdict}"
            + (f" {v.change}" if v.change else "")
            + (f" ({v.reason})" if v.reason else "")
            for v in row.verdicts
        )
        outcome = f"{_g(row.before)} → " + (_g(row.after) if row.measured else "not measured")
        cells = [row.label, step, by, status, verdicts or "-", row.reason or "-", outcome]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if len(table) > len(shown):
        lines.append(
            f"\n{len(table) - len(shown)} earlier decision(s) are in the run's audit trail."
        )
    return "\n".join(lines)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def _cell(text: str) -> str:
    """Text made safe for a markdown table cell: one line, special characters escaped."""
    flat = " ".join(str(text).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", flat)


def _point(p: tuple[int, float] | None) -> str:
    return "-" if p is None else f"{p[1]:.4g} at step {p[0]}"


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"
