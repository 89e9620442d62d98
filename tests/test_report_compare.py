"""Reports that answer "did it help?": an experiment compared on the objective its runs log, a
managed run beside its unmanaged baseline, plots on a scale where overfitting shows, the
final objective of the weights a run ends with, and the run's health said first.

The runs are written through the tracker seam (the in-memory tracker for the logic, the real
MLflow server for one case of each report) and, where decisions matter, by the real client
and ``atm set``.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from integrations.health import objective_missing
from integrations.protocol import (
    TAG_HEALTH,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    Health,
    HealthState,
    Objective,
)
from integrations.trackers import memory as memory_tracker
from manager_daemon.cli import app
from manager_daemon.daemon import Daemon
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.report import build_experiment_report, build_run_report, wandb_report
from manager_daemon.report.plots import Axis, focus
from tests import report_scenario
from tests.conftest import Backend
from tests.helpers import overfitting_run
from tests.test_report import (  # noqa: F401  (wide_console: a fixture)
    Page,
    _wandb_spec,
    check_page,
    wide_console,
)

runner = CliRunner()

# The demo's unmanaged run (a tiny GPT-2 on an overfitting recipe): eval loss every 20 steps,
# best at step 120, then rising to the end.
DEMO_EVALS = [4.019, 2.319, 1.898, 1.691, 1.487, 1.395, 1.43, 1.488, 1.536, 1.611, 1.629,
              1.651, 1.707, 1.73, 1.75, 1.777]  # fmt: skip
DEMO_STEPS = list(range(20, 340, 20))


def text_of(page_html: str) -> str:
    """The page's text as a reader sees it: no markup, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page_html)).split())


def said(result: object) -> str:
    """What a command printed, as one line (the console wraps long lines)."""
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def started_at(monkeypatch: pytest.MonkeyPatch, backend: Backend, name: str, ms: int) -> str:
    """A new run of ``backend`` (the in-memory tracker) whose start time is ``ms``."""
    with monkeypatch.context() as patch:
        patch.setattr(memory_tracker, "_now_ms", lambda: ms)
        return backend.new_run(name)


def managed_run(backend: Backend, name: str, objective: str) -> str:
    run_id = backend.new_run(name)
    backend.tracker.set_tags(run_id, {TAG_MANAGED: "true", TAG_OBJECTIVE: objective})
    return run_id


def cells(page: Page, attribute: str) -> dict[str, str]:
    """Run id → the value of ``attribute`` in that run's row of the experiment table."""
    found: dict[str, str] = {}
    run = None
    for tag, attrs in page.tags:
        if tag == "tr":
            run = attrs.get("data-run")
        elif tag == "td" and attribute in attrs and run is not None:
            found[run] = attrs[attribute] or ""
    return found


def axis(report_plots: list, name: str) -> Axis:
    (plot,) = [p for p in report_plots if p.name == name]
    return plot.axes[0]


# ---- an experiment, compared on one objective ----------------------------------------------


def test_unmanaged_runs_are_read_on_the_objective_the_managed_runs_share(
    memory: Backend,
) -> None:
    managed = managed_run(memory, "managed", "minimize:val_loss")
    plain = memory.new_run("plain")
    for run_id, values in ((managed, [2.0, 1.5, 1.4]), (plain, [2.1, 1.6, 1.7])):
        memory.log_history(run_id, [(10 * (i + 1), {"val_loss": v}) for i, v in enumerate(values)])

    report = build_experiment_report(memory.tracker, memory.experiment)
    read = {d.run.run_id: (str(d.objective), s.best, s.final) for d, s in report.runs}
    assert read[plain] == ("minimize:val_loss", (20, 1.6), (30, 1.7))
    assert read[managed] == ("minimize:val_loss", (30, 1.4), (30, 1.4))
    assert report.plot.axes[0].series == ("managed (managed)", "plain (unmanaged)")


def test_atm_report_experiment_takes_the_objective_and_says_when_a_run_lacks_it(
    memory: Backend, tmp_path: Path
) -> None:
    first, second = memory.new_run("first"), memory.new_run("second")
    memory.log_history(first, [(10, {"val_loss": 2.0, "train_loss": 2.2}), (20, {"val_loss": 1.5})])
    memory.log_history(second, [(10, {"val_loss": 2.4}), (20, {"val_loss": 1.9})])
    base = ["report", "--experiment", memory.experiment, "--tracking-uri", memory.uri]

    result = runner.invoke(app, [*base, "--out", str(tmp_path / "default")])
    assert result.exit_code == 0, result.output
    missing = "eval_loss never logged; the run logs train_loss, val_loss; closest: val_loss"
    assert f"first: {missing}" in said(result), "the user is told what the report lacks"
    page_html = (tmp_path / "default" / "index.html").read_text()
    assert missing in text_of(page_html)
    assert set(cells(Page(page_html), "data-best").values()) == {""}, "nothing to compare"

    result = runner.invoke(
        app, [*base, "--objective", "minimize:val_loss", "--out", str(tmp_path / "val")]
    )
    assert result.exit_code == 0, result.output
    assert "never logged" not in result.output
    page = check_page((tmp_path / "val" / "index.html").read_text(), {})
    assert cells(page, "data-best") == {first: "1.5", second: "1.9"}
    assert cells(page, "data-final") == {first: "1.5", second: "1.9"}

    result = runner.invoke(app, [*base, "--objective", "val_loss"])
    assert result.exit_code == 2 and "objective 'val_loss'" in result.output


def test_on_mlflow_a_managed_run_is_reported_beside_its_baseline_and_compared(
    mlflow_backend: Backend, tmp_path: Path
) -> None:
    backend = mlflow_backend
    plain = backend.new_run("plain")
    managed = managed_run(backend, "managed", "minimize:val_loss")
    rows = list(zip(DEMO_STEPS, DEMO_EVALS, strict=True))
    backend.log_history(plain, [(s, {"val_loss": v}) for s, v in rows])
    backend.log_history(managed, [(s, {"val_loss": min(v, 1.45)}) for s, v in rows])

    result = runner.invoke(
        app, ["report", managed, "--out", str(tmp_path / "run"), "--tracking-uri", backend.uri]
    )
    assert result.exit_code == 0, result.output
    assert f"baseline plain ({plain}), the unmanaged run closest in start time" in said(result)
    assert "final 1.45 against 1.777, ×0.816 (-18.4%)" in said(result)
    page = check_page((tmp_path / "run" / "index.html").read_text(), {})
    roles = {a.get("data-role"): a.get("data-run") for t, a in page.tags if "data-role" in a}
    assert roles == {"run": managed, "baseline": plain, "ratio": None}

    result = runner.invoke(
        app,
        ["report", "--experiment", backend.experiment, "--objective", "minimize:val_loss",
         "--out", str(tmp_path / "cmp"), "--tracking-uri", backend.uri],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    page = check_page((tmp_path / "cmp" / "index.html").read_text(), {})
    assert cells(page, "data-final") == {plain: "1.777", managed: "1.45"}


# ---- a run beside its baseline --------------------------------------------------------------


def test_the_baseline_is_the_unmanaged_run_closest_in_start_time_that_logs_the_objective(
    memory: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = 1_800_000_000_000
    with monkeypatch.context() as patch:
        patch.setattr(memory_tracker, "_now_ms", lambda: t0)
        managed = overfitting_run(memory)
        detached = overfitting_run(memory)  # managed once: decisions, then detached
    far = started_at(monkeypatch, memory, "far", t0 - 3_600_000)
    near = started_at(monkeypatch, memory, "near", t0 + 5_000)
    silent = started_at(monkeypatch, memory, "silent", t0 + 1_000)
    # A script's trailing evaluate() logged as a run of its own: one point is no training.
    trailing = started_at(monkeypatch, memory, "trailing", t0 + 2_000)
    elsewhere = memory.tracker.create_run("elsewhere", "another experiment")
    for run_id in (far, near, elsewhere):
        rows = [(10, {"eval_loss": 3.0}), (40, {"eval_loss": 2.9}), (70, {"eval_loss": 2.8})]
        memory.log_history(run_id, rows)
    memory.log_history(silent, [(10, {"loss": 3.0})])
    memory.log_history(trailing, [(70, {"eval_loss": 1.0})])
    Daemon(memory.tracker, RulesPolicy(), experiments=[memory.experiment]).run_once()
    memory.tracker.set_tags(detached, {TAG_MANAGED: "false"})

    report = build_run_report(memory.tracker, managed)
    assert report.baseline is not None
    assert report.baseline.data.run.run_id == near
    assert report.baseline.chosen == (
        "the unmanaged run closest in start time (started 5 s after this run)"
    )
    assert report.summary.final == (70, 2.4) and report.baseline.summary.final == (70, 2.8)
    page = check_page(report.html, {})
    ratios = [a["data-ratio"] for t, a in page.tags if "data-ratio" in a]
    assert [float(r or 0) for r in ratios] == [2.1 / 2.8, 2.4 / 2.8], "best, final"
    assert axis(report.plots, "objective").series[:2] == ("eval_loss", "baseline: near")
    assert build_run_report(memory.tracker, near).baseline is None, "unmanaged: no baseline"

    base = ["report", managed, "--tracking-uri", memory.uri, "--baseline"]
    result = runner.invoke(app, [*base, far])
    assert result.exit_code == 0, result.output
    assert f"baseline far ({far}), given with --baseline" in said(result)
    assert "(-14.3%): better than the baseline" in said(result)
    result = runner.invoke(app, [*base, silent])
    assert result.exit_code == 2
    assert "cannot be compared: eval_loss never logged; the run logs loss" in said(result)
    result = runner.invoke(app, [*base, managed])
    assert result.exit_code == 2 and "is the run reported" in result.output
    result = runner.invoke(app, [*base, "no-such-run"])
    assert result.exit_code == 1 and "no-such-run" in result.output


def test_the_wandb_report_plots_the_baseline_beside_the_run_and_compares_them(
    memory: Backend,
) -> None:
    managed = overfitting_run(memory)
    plain = memory.new_run("plain")
    rows = [(10, {"eval_loss": 3.0}), (40, {"eval_loss": 3.1}), (70, {"eval_loss": 3.2})]
    memory.log_history(plain, rows)
    report = build_run_report(memory.tracker, managed)
    spec = _wandb_spec(
        wandb_report.build(
            [report.data], "atm-tests", "atm-reports", title="run", baseline=report.baseline
        )
    )
    blocks = spec["spec"]["blocks"]
    (grid,) = [b for b in blocks if b["type"] == "panel-grid"]
    (runset,) = grid["metadata"]["runSets"]
    assert runset["filters"]["filters"][0]["value"] == [managed, plain]
    summary = next(b["content"] for b in blocks if b["type"] == "markdown-block")
    assert f"- baseline: plain ({plain}), the unmanaged run closest in start time" in summary
    assert "- this run ÷ baseline: best ×0.700 (-30.0%); final ×0.750 (-25.0%)" in summary


def test_metrics_logged_without_steps_are_numbered_in_the_order_logged(memory: Backend) -> None:
    run_id = memory.new_run("no-steps")
    values = [3.0, 2.0, 1.5, 1.6, 1.8]
    for value in values:  # as mlflow.log_metrics({...}) without step= logs them
        memory.log_history(run_id, [(0, {"val_loss": value, "train_loss": value / 2})])
    report = build_run_report(
        memory.tracker, run_id, objective=Objective.parse("minimize:val_loss")
    )
    assert report.data.objective_series == list(enumerate(values))
    assert (report.summary.best, report.summary.final) == ((2, 1.5), (4, 1.8))
    note = "train_loss, val_loss logged without steps (every point at one step): numbered here"
    assert note in text_of(report.html)


# ---- plots ------------------------------------------------------------------------------------


def test_throughput_counters_are_left_out_of_the_metrics_plot(memory: Backend) -> None:
    run_id = memory.new_run()
    counters = {
        "eval_runtime": 1.2,
        "eval_samples_per_second": 800.0,
        "eval_steps_per_second": 25.0,
        "eval_model_preparation_time": 0.01,
        "eval/mem_gb": 3.1,
        "total_flos": 1e12,
        "time/fps": 900.0,
    }
    memory.log_history(
        run_id,
        [(s, {"eval_loss": 3.0 / s, "eval_accuracy": 0.2 * s, **counters}) for s in (1, 2, 3)],
    )
    report = build_run_report(memory.tracker, run_id)
    (metrics,) = [p for p in report.plots if p.name == "metrics"]
    assert [a.series for a in metrics.axes] == [("eval_accuracy",)]


def test_an_overfitting_curve_fills_the_objective_axis(memory: Backend) -> None:
    run_id = memory.new_run()
    train = [(s, {"loss": 6.0 * 0.985**s}) for s in range(10, 330, 10)]
    evals = [(s, {"eval_loss": v}) for s, v in zip(DEMO_STEPS, DEMO_EVALS, strict=True)]
    memory.log_history(run_id, sorted(train + evals, key=lambda r: r[0]))

    drawn = axis(build_run_report(memory.tracker, run_id).plots, "objective")
    low, high = drawn.ylim
    rise = max(DEMO_EVALS[5:]) - min(DEMO_EVALS)  # from the best to the last evaluation
    assert drawn.yscale == "linear"
    assert rise / (high - low) > 0.5, "the rise after the best fills most of the axis"
    assert rise / (max(DEMO_EVALS) - min(DEMO_EVALS)) < 0.15, "it would not on the full range"
    assert low <= min(DEMO_EVALS) and high >= max(DEMO_EVALS[4:]), "the later ones all show"
    assert high < DEMO_EVALS[0], "the first evaluation is off the axis"


def test_values_spanning_orders_of_magnitude_go_on_a_log_scale() -> None:
    # A regression loss falling from 1 to 1e-6, then rising tenfold: on a linear axis the
    # rise is a millionth of it.
    steps = range(10, 210, 10)
    values = [10 ** -(i * 0.5) for i in range(13)] + [10 ** (-6 + i / 7) for i in range(1, 8)]
    chosen = focus([list(zip(steps, values, strict=True))])
    assert chosen.yscale == "log"
    low, high = chosen.ylim or (min(values), max(values))
    assert low <= min(values) and high >= values[-1]
    assert math.log10(values[-1] / min(values)) / math.log10(high / low) > 0.15


def test_a_curve_without_far_off_first_values_keeps_its_whole_range() -> None:
    assert focus([[(s, 1.0 - 0.01 * s) for s in range(0, 50, 5)]]).ylim is None
    assert focus([[(10, 2.0), (20, 1.0)]]).ylim is None, "too few points to judge"


# ---- the final objective after a rollback ----------------------------------------------------


def test_after_a_rollback_the_final_objective_is_the_best_state_restored(
    memory: Backend,
) -> None:
    run_id = memory.new_run("rolled-back")
    training = report_scenario.Training(memory.tracker, run_id)
    training.train([3.0, 2.5, 2.2, 2.4, 2.6])  # best 2.2 at step 30, last 2.6 at step 50
    result = runner.invoke(
        app, ["set", run_id, "rollback_to_best", "stop", "--tracking-uri", memory.uri]
    )
    assert result.exit_code == 0, result.output
    training.steps(5)  # applied at step 52; no evaluation after it

    report = build_run_report(memory.tracker, run_id)
    s = report.summary
    assert (s.final, s.restored_at, s.last, s.best) == ((30, 2.2), 52, (50, 2.6), (30, 2.2))
    page_text = text_of(report.html)
    assert (
        "final eval_loss 2.2 @ 30 the best state, restored at step 52; last evaluation 2.6 @ 50"
        in page_text
    )
    markdown = wandb_report.summary_markdown(report.data, s)
    assert "final: 2.2 at step 30, the best state restored at step 52" in markdown

    training.train([2.25])  # evaluated after the rollback: that is the final value
    s = build_run_report(memory.tracker, run_id).summary
    assert (s.final, s.restored_at) == ((65, 2.25), None)


def test_a_rollback_counts_once_applied_and_until_the_next_evaluation(memory: Backend) -> None:
    run_id = memory.new_run()
    training = report_scenario.Training(memory.tracker, run_id)
    training.train([3.0, 2.2, 2.6])
    set_ = ["--cooldown-steps", "0", "--tracking-uri", memory.uri]
    assert runner.invoke(app, ["set", run_id, "rollback_to_best", *set_]).exit_code == 0
    s = build_run_report(memory.tracker, run_id).summary
    assert (s.final, s.restored_at) == ((30, 2.6), None), "issued, not applied yet"

    training.steps(2)  # the rollback applied at step 32
    assert runner.invoke(app, ["set", run_id, "stop", *set_]).exit_code == 0
    training.steps(10)  # the stop applied at step 42: it leaves the weights as they were
    s = build_run_report(memory.tracker, run_id).summary
    assert (s.final, s.restored_at) == ((20, 2.2), 32)


# ---- the run's health -----------------------------------------------------------------------


def test_the_report_says_first_when_the_manager_is_not_deciding(memory: Backend) -> None:
    run_id = memory.new_run("typo")
    memory.log_history(run_id, [(10, {"val_loss": 2.0, "train_loss": 2.5})])
    reason = objective_missing("val_los", ["val_loss", "train_loss"])
    waiting = Health(state=HealthState.WAITING_OBJECTIVE, reason=reason)
    memory.tracker.set_tags(
        run_id,
        {TAG_MANAGED: "true", TAG_OBJECTIVE: "minimize:val_los", TAG_HEALTH: waiting.tag_value()},
    )
    line = (
        "Not deciding: waiting_objective — val_los never logged; the run logs train_loss, "
        "val_loss; closest: val_loss"
    )

    report = build_run_report(memory.tracker, run_id)
    page = check_page(report.html, {})
    assert [a["data-health"] for _, a in page.tags if "data-health" in a] == ["waiting_objective"]
    summary = text_of(report.html).split(" Summary ", 1)[1]
    assert summary.startswith(line), "the first thing the summary says"
    assert text_of(report.html).count("val_los never logged") == 1, "said once"
    markdown = wandb_report.summary_markdown(report.data, report.summary)
    assert markdown.splitlines()[0] == (
        r"**Not deciding: waiting\_objective — val\_los never logged; the run logs "
        r"train\_loss, val\_loss; closest: val\_loss**"
    )
    result = runner.invoke(app, ["report", run_id, "--tracking-uri", memory.uri])
    assert result.exit_code == 0 and line in said(result)

    deciding = Health(state=HealthState.DECIDING)
    memory.tracker.set_tags(run_id, {TAG_HEALTH: deciding.tag_value()})
    memory.log_history(run_id, [(20, {"val_los": 1.9})])
    report = build_run_report(memory.tracker, run_id)
    assert not [a for _, a in check_page(report.html, {}).tags if "data-health" in a]
    assert "Not deciding" not in wandb_report.summary_markdown(report.data, report.summary)
