"""``atm report``: the page, the plots and the W&B Report made from a run's audit trail.

The runs are made by the real writers (the client, supervisors with the rules and the LLM
policy against the loopback replay server, ``atm set``); the pages are parsed as HTML and
the plots checked as PNG files of the size the page states.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    REPORT_PAGE_PATH,
    TAG_CLIENT_HEARTBEAT,
    TAG_MANAGED,
    report_plot_path,
)
from integrations.trackers.memory import MemoryTracker
from manager_daemon import cli
from manager_daemon.cli import app
from manager_daemon.daemon import Daemon
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.report import build_run_report, publish_run_report, wandb_report
from manager_daemon.report.data import collect_run
from manager_daemon.report.keeper import ReportKeeper
from tests import report_scenario
from tests.conftest import Backend
from tests.helpers import overfitting_run, wait_for
from tests.openai_replay import ReplayServer
from tests.wandb_fixtures import wandb_server  # noqa: F401  (a fixture)
from tests.wandb_server import WandbServer

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "width", 250)


# ---- reading what a report wrote ----------------------------------------------------------


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: dict[int, dict[str, object]] = {}
        self.images: list[dict[str, str | None]] = []
        self._row: dict[str, object] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.images.append(a)
        if tag == "tr" and a.get("data-decision"):
            self._row = {"status": a["data-status"], "source": a["data-source"], "verdicts": {}}
            self._row["cells"] = []
            self.rows[int(a["data-decision"] or 0)] = self._row
        if self._row is None:
            return
        if tag == "td":
            self._cell = []
            if "data-before" in a:
                self._row["before"], self._row["after"] = a["data-before"], a["data-after"]
        if tag == "li" and a.get("data-what"):
            self._row["verdicts"][a["data-what"]] = a["data-verdict"]  # type: ignore[index]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append(" ".join("".join(self._cell).split()))  # type: ignore[union-attr]
            self._cell = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails for anything that is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def check_page(html: str, files: dict[str, bytes | None]) -> Page:
    """The page has no script and asks for nothing; each image is a PNG of its stated size,
    the same bytes as the plot file next to it."""
    page = Page(html)
    assert not [t for t, _ in page.tags if t in ("script", "iframe", "object", "embed", "link")]
    policy = [a for t, a in page.tags if t == "meta" and a.get("http-equiv")]
    assert policy and "default-src 'none'" in (policy[0]["content"] or "")
    assert page.images
    for image in page.images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,"), "every image is embedded"
        png = base64.b64decode(src.split(",", 1)[1])
        assert png_size(png) == (int(image["width"] or 0), int(image["height"] or 0))
        assert image.get("alt"), "each plot says what it shows"
    for path, data in files.items():
        if path.endswith(".png"):
            assert data is not None, f"{path} missing"
            png_size(data)
    return page


# ---- the tracker seam -----------------------------------------------------------------------


def test_a_file_written_to_a_run_reads_back_byte_for_byte(backend: Backend) -> None:
    run_id = backend.new_run()
    data = bytes(range(256)) * 3  # not text
    backend.tracker.write_file(run_id, "atm/report/plot.png", data)
    backend.tracker.write_file(run_id, "atm/report/index.html", "<p>é</p>".encode())
    assert backend.read_file(run_id, "atm/report/plot.png") == data
    assert backend.read_file(run_id, "atm/report/index.html") == "<p>é</p>".encode()
    assert backend.tracker.list_artifacts(run_id, "atm/report") == [
        "atm/report/index.html",
        "atm/report/plot.png",
    ]
    backend.tracker.write_file(run_id, "atm/report/plot.png", b"new")
    assert backend.read_file(run_id, "atm/report/plot.png") == b"new", "a write replaces"


def test_the_runs_of_an_experiment_are_listed_managed_or_not_ended_or_not(
    backend: Backend,
) -> None:
    managed, plain = backend.new_run("managed"), backend.new_run("plain")
    backend.tracker.set_tags(managed, {TAG_MANAGED: "true"})
    listed = {r.run_id: r for r in backend.tracker.list_runs(backend.experiment)}
    assert {managed, plain} <= set(listed)
    assert listed[managed].tags[TAG_MANAGED] == "true"
    assert backend.tracker.list_runs("no such experiment") == []


# ---- one run's report -----------------------------------------------------------------------


@pytest.mark.slow  # about 40 s: the run's history is written one step at a time
def test_atm_report_logs_a_page_with_every_decision_and_its_plots(
    mlflow_backend: Backend, replay: ReplayServer, tmp_path: Path
) -> None:
    tracker = mlflow_backend.tracker
    run_id = mlflow_backend.new_run("managed-run")
    scenario = report_scenario.build(tracker, run_id, replay)

    result = runner.invoke(
        app, ["report", run_id, "--out", str(tmp_path), "--tracking-uri", mlflow_backend.uri]
    )
    assert result.exit_code == 0, result.output
    assert "6 decision(s), 5 issued" in result.output

    html = mlflow_backend.read_file(run_id, REPORT_PAGE_PATH)
    assert html is not None
    plots = {
        report_plot_path(n): mlflow_backend.read_file(run_id, report_plot_path(n))
        for n in ("objective", "knobs")
    }
    page = check_page(html.decode(), plots)
    assert [a["alt"] for a in page.images] == ["Objective: eval_loss", "Knobs"]
    assert (tmp_path / "index.html").read_bytes() == html
    assert (tmp_path / "objective.png").read_bytes() == plots[report_plot_path("objective")]

    audit = {r.decision_id: r for r in collect_run(tracker, run_id).records}
    assert set(page.rows) == set(audit) == set(scenario.expected)
    for decision_id, expected in scenario.expected.items():
        row, record = page.rows[decision_id], audit[decision_id]
        assert row["source"] == expected["source"] and row["status"] == expected["status"]
        for what, verdict in dict(expected.get("verdicts", {})).items():  # type: ignore[call-overload]
            assert row["verdicts"][what] == verdict  # type: ignore[index]
        assert row["verdicts"] == {v.knob: v.verdict for v in record.verdicts} | {
            c.command: c.verdict for c in record.command_verdicts
        }
        if record.outcome is not None:
            assert float(row["before"]) == record.outcome.before  # type: ignore[arg-type]
            assert float(row["after"]) == record.outcome.after  # type: ignore[arg-type]
    issued = [d for d, e in scenario.expected.items() if e["status"] == "issued"]
    assert all(audit[d].outcome is not None for d in issued), "every issued version measured"
    # LLM decisions carry their model, latency and tokens; the others none.
    llm = [d for d, e in scenario.expected.items() if e["source"] == "llm"]
    for decision_id in llm:
        cells = page.rows[decision_id]["cells"]
        assert "replay-model" in cells[2] and "940 tokens" in cells[8]  # type: ignore[index]
    # The reason the model gave, markup and all, is shown as text.
    first = page.rows[llm[0]]["cells"]
    assert report_scenario.INJECTED in first[6]  # type: ignore[index]
    assert not [a for t, a in page.tags if t == "img" and "attacker" in (a.get("src") or "")]


def test_advisory_decisions_are_shown_as_advisory(memory: Backend) -> None:
    tracker = memory.tracker
    run_id = overfitting_run(memory)
    tracker.delete_tag(run_id, TAG_CLIENT_HEARTBEAT)
    Daemon(tracker, RulesPolicy(), experiments=[memory.experiment]).run_once()
    report = build_run_report(tracker, run_id)
    page = check_page(report.html, {})
    (row,) = page.rows.values()
    assert row["status"] == "advisory"
    assert report.summary.issued == 0 and report.summary.by_status[("rules", "advisory")] == 1
    assert "applied @" not in row["cells"][1]  # type: ignore[index]


def test_a_run_without_decisions_gets_a_report_that_says_so(memory: Backend) -> None:
    run_id = memory.new_run()
    memory.log_history(run_id, [(10, {"eval_loss": 2.0}), (20, {"eval_loss": 1.5})])
    report = publish_run_report(memory.tracker, run_id)
    assert "No decisions yet." in report.html
    assert report.summary.best == (20, 1.5) and report.summary.final == (20, 1.5)
    assert memory.read_file(run_id, REPORT_PAGE_PATH) == report.html.encode()


def test_other_evaluated_metrics_get_a_plot_and_run_text_is_escaped(memory: Backend) -> None:
    run_id = memory.new_run('<b onmouseover="x()">run</b>')
    memory.log_history(
        run_id,
        [(s, {"eval_loss": 3.0 / s, "eval_accuracy": 0.1 * s, "loss": 1.0}) for s in (1, 2, 3)]
        + [(s, {"grad_norm": 1.0}) for s in (1, 2, 3)],
    )
    report = build_run_report(memory.tracker, run_id)
    assert [p.name for p in report.plots] == ["objective", "metrics"]
    assert report.data.other_metrics == ["eval_accuracy"], "only evaluations, not grad_norm"
    page = check_page(report.html, {})
    assert [(a["width"], a["height"]) for a in page.images][1] == ("1200", "230")
    assert not [a for _, a in page.tags if "onmouseover" in a], "the run's name is text"
    assert "&lt;b onmouseover=&#34;x()&#34;&gt;run&lt;/b&gt;" in report.html


def test_the_summary_counts_interventions_by_source_and_verdict(
    memory: Backend, replay: ReplayServer
) -> None:
    run_id = memory.new_run()
    report_scenario.build(memory.tracker, run_id, replay)
    report = build_run_report(memory.tracker, run_id, budget=20)
    s = report.summary
    assert (s.decisions, s.issued, s.rollbacks, s.stops) == (6, 5, 1, 1)
    assert s.by_status[("human", "rejected")] == 1 and s.by_status[("llm", "issued")] == 2
    assert s.by_verdict[("human", "clamped")] == 1 and s.by_verdict[("human", "rejected")] == 1
    assert s.automatic_issued == 3 and s.budget == 20, "humans do not use the budget"
    assert s.llm_calls == 2 and s.prompt_tokens == 1800 and s.completion_tokens == 80
    assert s.best == (150, 1.87) and s.final == (150, 1.87)
    rows = {r.decision_id: r for r in report.rows}
    # v2 was issued and superseded by v3 before the client applied either: only v3 applied.
    assert [r.applied_step for r in report.rows if r.version] == [42, None, 82, 112, 132]
    assert [r.superseded for r in report.rows if r.version] == [False, True, False, False, False]
    assert rows[5].commands == ["rollback_to_best"] and rows[6].commands == ["stop"]


# ---- the daemon keeps reports current -------------------------------------------------------


def test_the_daemon_reports_every_n_decisions_without_holding_up_other_runs(
    memory: Backend,
) -> None:
    tracker = memory.tracker
    assert isinstance(tracker, MemoryTracker)
    release = threading.Event()
    writing: list[str] = []

    def slow_reports(operation: str, run_id: str | None) -> None:
        if operation == "write_file":
            writing.append(run_id or "")
            release.wait(30)

    first, second = overfitting_run(memory), overfitting_run(memory)
    tracker.fault = slow_reports
    keeper = ReportKeeper(tracker, every=1)
    daemon = Daemon(tracker, RulesPolicy(), experiments=[memory.experiment], reports=keeper)
    try:
        report = daemon.run_once()
        assert {r.run_id for r in report.decisions} == {first, second}
        wait_for(lambda: writing)  # a report is being written, and stays stuck
        for run_id in (first, second):  # v1 applied, and evaluated twice since
            memory.log_metrics(run_id, {METRIC_PARAMS_VERSION: 1}, 71)
            memory.log_metrics(run_id, {"eval_loss": 2.5}, 100)
            memory.log_metrics(run_id, {"eval_loss": 2.6}, 200)
        again = daemon.run_once()
        assert {r.run_id for r in again.decisions} == {first, second}, "decisions go on"
        assert not tracker.list_artifacts(first, "atm/report")
    finally:
        release.set()
        daemon.close()
    tracker.fault = None
    for run_id in (first, second):
        assert tracker.list_artifacts(run_id, "atm/report") == [
            REPORT_PAGE_PATH,
            report_plot_path("knobs"),
            report_plot_path("objective"),
        ]
        assert "d000002" in (memory.read_file(run_id, REPORT_PAGE_PATH) or b"").decode()


def test_the_daemon_reports_a_run_once_it_has_ended(memory: Backend) -> None:
    tracker = memory.tracker
    assert isinstance(tracker, MemoryTracker)
    ended, detached = overfitting_run(memory), overfitting_run(memory)
    keeper = ReportKeeper(tracker, at_end=True)
    daemon = Daemon(tracker, RulesPolicy(), experiments=[memory.experiment], reports=keeper)
    try:
        daemon.run_once()
        tracker.set_status(ended, "FINISHED")
        tracker.set_tags(detached, {TAG_MANAGED: "false"})  # still running: no report
        daemon.run_once()
    finally:
        daemon.close()
    assert memory.read_file(ended, REPORT_PAGE_PATH)
    assert memory.read_file(detached, REPORT_PAGE_PATH) is None


def test_atm_daemon_once_with_report_every_logs_the_report(memory: Backend) -> None:
    run_id = overfitting_run(memory)
    flags = ["--once", "--policy", "rules", "--report-every", "1", "--lease-settle", "0.1"]
    result = runner.invoke(
        app,
        ["daemon", *flags, "--experiment", memory.experiment, "--tracking-uri", memory.uri],
    )
    assert result.exit_code == 0, result.output
    page = Page((memory.read_file(run_id, REPORT_PAGE_PATH) or b"").decode())
    assert [row["status"] for row in page.rows.values()] == ["issued"]


def test_report_settings_reach_the_daemon_and_the_chart(monkeypatch: pytest.MonkeyPatch) -> None:
    from manager_daemon.settings import DaemonSettings

    monkeypatch.setenv("ATM_REPORT_EVERY", "5")
    settings = DaemonSettings(report_at_end=True)
    assert (settings.report_every, settings.report_at_end) == (5, True)
    values = Path(__file__).resolve().parents[1] / "helm/ai-training-manager/values.yaml"
    text = values.read_text()
    assert "reportEvery" in text and "reportAtEnd" in text


# ---- several runs ---------------------------------------------------------------------------


def test_atm_report_experiment_compares_managed_and_unmanaged_runs(
    mlflow_backend: Backend, tmp_path: Path
) -> None:
    managed = overfitting_run(mlflow_backend)
    Daemon(
        mlflow_backend.tracker, RulesPolicy(), experiments=[mlflow_backend.experiment]
    ).run_once()
    plain = mlflow_backend.new_run("plain")
    mlflow_backend.log_history(plain, [(10, {"eval_loss": 3.0}), (20, {"eval_loss": 2.5})])

    out = tmp_path / "cmp"
    result = runner.invoke(
        app,
        [
            "report",
            "--experiment",
            mlflow_backend.experiment,
            "--out",
            str(out),
            "--tracking-uri",
            mlflow_backend.uri,
        ],
    )
    assert result.exit_code == 0, result.output
    page = Page((out / "index.html").read_text())
    runs = {a["data-run"]: a["data-managed"] for t, a in page.tags if t == "tr" and "data-run" in a}
    assert runs == {managed: "true", plain: "false"}
    best = [a["data-best"] for t, a in page.tags if t == "td" and "data-best" in a]
    assert sorted(float(b or 0) for b in best) == [2.1, 2.5]
    (image,) = page.images
    assert png_size((out / "comparison.png").read_bytes()) == (
        int(image["width"] or 0),
        int(image["height"] or 0),
    )


def test_atm_report_needs_a_run_or_an_experiment(memory: Backend) -> None:
    result = runner.invoke(app, ["report", "--tracking-uri", memory.uri])
    assert result.exit_code == 2 and "name a run" in result.output
    result = runner.invoke(app, ["report", "--experiment", "nope", "--tracking-uri", memory.uri])
    assert result.exit_code == 2 and "no runs in experiment 'nope'" in result.output
    result = runner.invoke(app, ["report", "no-such-run", "--tracking-uri", memory.uri])
    assert result.exit_code == 1 and "no-such-run" in result.output


# ---- W&B ------------------------------------------------------------------------------------


def _wandb_spec(report: object) -> dict:
    return report._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")  # type: ignore[attr-defined]


def test_the_wandb_report_spec_is_built_offline(memory: Backend, replay: ReplayServer) -> None:
    run_id = memory.new_run("wandb-run")
    report_scenario.build(memory.tracker, run_id, replay)
    data = collect_run(memory.tracker, run_id)
    report = wandb_report.build([data], "atm-tests", "atm-reports", title="wandb-run", budget=20)
    spec = _wandb_spec(report)
    assert spec["project"] == {"name": "atm-reports", "entityName": "atm-tests"}
    blocks = spec["spec"]["blocks"]
    headings = [b["children"][0]["text"] for b in blocks if b["type"] == "heading"]
    assert headings == ["What the manager did: wandb-run", "Summary", "Decisions"]
    (grid,) = [b for b in blocks if b["type"] == "panel-grid"]
    (runset,) = grid["metadata"]["runSets"]
    assert "project" not in runset, "the runset takes the report's entity and project"
    assert runset["filters"]["filters"][0]["value"] == [run_id]
    panels = grid["metadata"]["panelBankSectionConfig"]["panels"]
    assert [p["config"]["metrics"] for p in panels] == [
        ["eval_loss"],
        ["learning_rate"],
        ["weight_decay"],
        ["atm.params_version"],
    ]
    summary, decisions = [b["content"] for b in blocks if b["type"] == "markdown-block"]
    assert "automatic interventions used: 3 of 20" in summary
    assert "| llm | 2 |" in summary
    lines = decisions.splitlines()
    assert len(lines) == 2 + 6, "a header, a rule, and a row per decision"
    assert all(line.count(" | ") == 6 for line in lines[2:]), "no cell breaks the table"
    assert "<script>" not in decisions and r"\<script\>" in decisions
    assert "learning\\_rate rejected" in decisions and "weight\\_decay clamped" in decisions
    # It round-trips through W&B's own model.
    again = type(report)._from_model(report._to_model())
    assert again.title == report.title and len(again.blocks) == len(report.blocks)


def test_the_wandb_report_is_saved_to_the_project(
    memory: Backend,
    replay: ReplayServer,
    wandb_server: WandbServer,  # noqa: F811
) -> None:
    run_id = memory.new_run("saved-run")
    report_scenario.build(memory.tracker, run_id, replay)
    report = wandb_report.build(
        [collect_run(memory.tracker, run_id)], "atm-tests", "atm-reports-saved", title="saved"
    )
    url = wandb_report.save(report)
    (view,) = [
        v for v in wandb_server.state.views.values() if v.project.name == "atm-reports-saved"
    ]
    assert view.display_name == "atm report: saved" and url.startswith(wandb_server.url)
    saved = json.loads(view.spec)
    contents = [b.get("content", "") for b in saved["blocks"] if b["type"] == "markdown-block"]
    assert any("d000006" in c for c in contents)


# The key a person set, read before the test server's fixture points the SDK at loopback.
LIVE_KEY = os.environ.get("WANDB_API_KEY")


@pytest.mark.skipif(not LIVE_KEY, reason="set WANDB_API_KEY to save a report to W&B itself")
def test_the_wandb_report_is_saved_to_wandb_itself(
    memory: Backend, replay: ReplayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", LIVE_KEY or "")
    monkeypatch.setenv(
        "WANDB_BASE_URL", os.environ.get("WANDB_LIVE_BASE_URL", "https://api.wandb.ai")
    )
    entity = os.environ.get("WANDB_ENTITY") or wandb.Api().default_entity
    run_id = memory.new_run("live-run")
    report_scenario.build(memory.tracker, run_id, replay)
    report = wandb_report.build(
        [collect_run(memory.tracker, run_id)], entity, "atm-report-tests", title="live"
    )
    url = wandb_report.save(report)
    loaded = type(report).from_url(url)
    assert loaded.title == "atm report: live"
    markdown = [b.text for b in loaded.blocks if hasattr(b, "text") and "d000006" in str(b.text)]
    assert markdown, "the decisions table was saved"


def test_wandb_uris_name_the_report_project() -> None:
    assert wandb_report.target("wandb://team/proj") == ("team", "proj")
    assert wandb_report.target("http://localhost:5000") is None
    with pytest.raises(ValueError, match="wandb://ENTITY/PROJECT"):
        wandb_report.target("wandb://team")


# ---- speed ----------------------------------------------------------------------------------


@pytest.mark.bench
def test_bench_report_renders_a_small_run(tmp_path: Path) -> None:
    from train_scripts import bench_report

    figures = bench_report.main(["--decisions", "40", "--out", str(tmp_path)])
    assert figures["decisions"] == figures["rows"] == 40
    assert 0 < figures["issued"] <= 40 and figures["render_s"] > 0
    assert png_size((tmp_path / "objective.png").read_bytes()) == (1200, 440)
