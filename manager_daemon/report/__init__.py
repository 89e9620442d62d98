"""Reports: what the manager did to a run, where the run's users look.

A run's report is a self-contained HTML page (summary, plots, every decision) and its plots
as PNG files, logged into the run under ``atm/report/`` through the ``Tracker`` seam, so it
reads the same on any tracker; ``wandb_report`` builds the same content as a W&B Report. A
managed run's report puts it beside its baseline (an unmanaged run of the same experiment
that logs the same objective, or one named). An experiment's report compares its managed and
unmanaged runs on one objective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from integrations.protocol import REPORT_DIR, REPORT_PAGE_PATH, Objective, report_plot_path
from integrations.trackers import Tracker
from manager_daemon.report import baseline as baselines
from manager_daemon.report.baseline import Baseline
from manager_daemon.report.data import RunData, collect_experiment, collect_run
from manager_daemon.report.decisions import Row, Summary, rows, summarize
from manager_daemon.report.page import experiment_page, run_page
from manager_daemon.report.plots import Plot, comparison_plot, run_plots

__all__ = [
    "Baseline",
    "ExperimentReport",
    "Plot",
    "Row",
    "RunData",
    "RunReport",
    "Summary",
    "build_experiment_report",
    "build_run_report",
    "publish_run_report",
    "report_from",
    "write_local",
]

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    """One run's report: what it was made from, and the page and plots made."""

    data: RunData
    rows: list[Row]
    summary: Summary
    plots: list[Plot]
    html: str
    baseline: Baseline | None = None

    def files(self) -> dict[str, bytes]:
        """Artifact path → content: the page and each plot."""
        found = {REPORT_PAGE_PATH: self.html.encode("utf-8")}
        found.update({report_plot_path(p.name): p.png for p in self.plots})
        return found


@dataclass
class ExperimentReport:
    """The runs of an experiment side by side."""

    experiment: str
    runs: list[tuple[RunData, Summary]]
    plot: Plot
    html: str

    def files(self) -> dict[str, bytes]:
        return {"index.html": self.html.encode("utf-8"), f"{self.plot.name}.png": self.plot.png}


def build_run_report(
    tracker: Tracker,
    run_id: str,
    *,
    budget: int | None = None,
    objective: Objective | None = None,
    baseline: str | None = None,
) -> RunReport:
    """Read a run and make its report; ``budget`` is the automatic interventions allowed,
    ``objective`` the one to read (default: the run's own), ``baseline`` the run to compare
    with (default: the unmanaged run ``baselines.choose`` finds, if any)."""
    data = collect_run(tracker, run_id, objective=objective)
    if baseline is not None:
        compared: Baseline | None = baselines.given(tracker, data, baseline)
    else:
        compared = baselines.choose(tracker, data)
    return report_from(data, budget=budget, baseline=compared)


def report_from(
    data: RunData, *, budget: int | None = None, baseline: Baseline | None = None
) -> RunReport:
    """Make a run's report from data already read."""
    table = rows(data)
    summary = summarize(data, table, budget)
    plots = run_plots(data, table, baseline.data if baseline else None)
    html = run_page(data, table, summary, plots, baseline)
    return RunReport(data, table, summary, plots, html, baseline)


def publish_run_report(
    tracker: Tracker,
    run_id: str,
    *,
    budget: int | None = None,
    out: Path | None = None,
    to_run: bool = True,
    objective: Objective | None = None,
    baseline: str | None = None,
) -> RunReport:
    """Make a run's report (see ``build_run_report``) and log it into the run (``to_run``)
    and/or write it under ``out``."""
    report = build_run_report(
        tracker, run_id, budget=budget, objective=objective, baseline=baseline
    )
    for path, content in report.files().items():
        if to_run:
            tracker.write_file(run_id, path, content)
        if out is not None:
            write_local(out, path.removeprefix(REPORT_DIR + "/"), content)
    log.info("run %s: report of %d decision(s) written", run_id, len(report.rows))
    return report


def build_experiment_report(
    tracker: Tracker,
    experiment: str,
    *,
    budget: int | None = None,
    objective: Objective | None = None,
) -> ExperimentReport:
    """Compare the runs of ``experiment`` on ``objective`` (see ``collect_experiment`` for
    the default); raises ValueError when it has none."""
    runs = collect_experiment(tracker, experiment, objective)
    if not runs:
        raise ValueError(f"no runs in experiment {experiment!r} (check the name and the tracker)")
    summaries = [(d, summarize(d, rows(d), budget)) for d in runs]
    plot = comparison_plot(runs)
    return ExperimentReport(
        experiment, summaries, plot, experiment_page(experiment, summaries, plot)
    )


def write_local(out: Path, name: str, content: bytes) -> Path:
    """Write one report file under ``out``."""
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path
