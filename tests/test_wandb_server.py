"""The W&B test server, driven by the real ``wandb`` SDK only.

Training runs are child processes running small scripts that import nothing but ``wandb``;
the reader is ``wandb.Api()`` in this process, as the daemon will be. What these tests pin
down is what a W&B tracker backend relies on: finding managed runs, reading history
incrementally while a run is live, tags-only updates, artifact versions and aliases,
lineage, retries on 429, and saving a report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import wandb

from tests.wandb_fixtures import child_env, wandb_server  # noqa: F401  (a fixture)
from tests.wandb_server import WandbServer

PROJECT = "atm-tests/atm"

# Logs five steps, waits for `more`, logs three with explicit steps, changes what a
# training client would change (an applied value, an ack in the summary, a tag), then
# waits for `finish`. With an explicit step the SDK holds a step's row until a later
# step is logged (or the run ends): step 7 arrives only at `finish`.
LIVE_TRAINER = """
import sys, time
from pathlib import Path
import wandb

run_id, flags = sys.argv[1], Path(sys.argv[2])

def wait_for(name):
    while not (flags / name).exists():
        time.sleep(0.05)

run = wandb.init(project="atm", id=run_id, config={"lr": 0.1}, tags=["atm-managed"])
for step in range(5):
    wandb.log({"loss": 1.0 / (step + 1)})
wait_for("more")
for step in range(5, 8):
    wandb.log({"loss": 1.0 / (step + 1)}, step=step)
wandb.config.update({"lr": 0.05}, allow_val_change=True)
run.summary["atm/applied_version"] = 1
run.tags = run.tags + ("atm-applied",)
wait_for("finish")
wandb.finish()
"""

# A daemon's writer run: params versions as artifact versions, values in metadata and
# in a small JSON file; the last one repeats the content of the one before.
PARAMS_WRITER = """
import json, sys
import wandb

run_id = sys.argv[1]
writer = wandb.init(project="atm", id=f"atm-daemon-{run_id}", job_type="atm-daemon")
for version, lr, aliases in ((0, 0.1, ["latest"]), (1, 0.05, ["latest"]), (1, 0.05, ["again"])):
    params = wandb.Artifact(
        f"atm-params-{run_id}", type="atm-params", metadata={"version": version, "lr": lr}
    )
    with params.new_file("params.json", mode="w") as f:
        json.dump({"version": version, "values": {"lr": lr}}, f)
    writer.log_artifact(params, aliases=aliases).wait()
writer.finish()
"""

# A training run with all it records: config, history with and without explicit steps,
# summary, tags, its knob spec as an artifact, a saved file, the params it applied.
TRAINER = """
import json, sys
import wandb

run_id = sys.argv[1]
run = wandb.init(
    project="atm", id=run_id, config={"lr": 0.1, "batch_size": 8}, tags=["atm-managed"]
)
spec = wandb.Artifact(f"atm-spec-{run_id}", type="atm-spec", metadata={"knobs": ["lr"]})
with spec.new_file("spec.json", mode="w") as f:
    json.dump({"knobs": {"lr": {"min": 1e-5, "max": 1.0}}}, f)
run.log_artifact(spec).wait()
for step in range(3):
    wandb.log({"loss": 1.0 / (step + 1)})
wandb.log({"eval_loss": 0.7}, step=3)
params = run.use_artifact(f"atm-params-{run_id}:latest")
wandb.config.update({"lr": params.metadata["lr"]}, allow_val_change=True)
run.summary["atm/applied_version"] = params.metadata["version"]
run.tags = run.tags + ("atm-applied",)
with open(f"{run.dir}/notes.json", "w") as f:
    json.dump({"applied": params.metadata["version"]}, f)
wandb.save(f"{run.dir}/notes.json", base_path=run.dir)
wandb.finish()
"""

RESUMER = """
import json, sys
import wandb

run_id = sys.argv[1]
with wandb.init(project="atm", id=run_id, config={"lr": 0.1}) as run:
    run.log({"loss": 1.0})
    run.log({"loss": 0.5})
with wandb.init(project="atm", id=run_id, resume="must") as run:
    run.log({"loss": 0.25})
try:
    wandb.init(project="atm", id=run_id + "-missing", resume="must")
    missing = "resumed"
except Exception as error:
    missing = type(error).__name__
with wandb.init(project="atm", id=run_id + "-new", resume="allow") as run:
    run.log({"loss": 2.0})
print(json.dumps({"missing": missing}))
"""

TAGS_ONLY = """
mutation UpsertBucket($id: String!, $tags: [String!]) {
    upsertBucket(input: {id: $id, tags: $tags}) { bucket { id tags } }
}
"""


def run_script(source: str, *args: str, tmp_path: Path) -> subprocess.Popen[str]:
    """Start ``source`` as a Python child process with a ``wandb-core`` of its own."""
    script = tmp_path / f"script-{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    """Wait for a child script; fail with its stderr if it failed. Returns its stdout."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture(scope="module")
def api(wandb_server: WandbServer) -> wandb.Api:  # noqa: F811
    """One ``wandb.Api`` for the module: each one starts its own ``wandb-core``."""
    return wandb.Api(timeout=30)


@pytest.fixture(autouse=True)
def no_gaps(wandb_server: WandbServer) -> Iterator[None]:  # noqa: F811
    """Every request a test makes must be one the server knows how to answer."""
    wandb_server.unhandled.clear()
    yield
    assert wandb_server.unhandled == []


@dataclass
class TrainedRun:
    """The finished training run the artifact and reader tests share, and its writer's run."""

    run_id: str
    path: str
    writer_id: str


@pytest.fixture(scope="module")
def trained(
    wandb_server: WandbServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainedRun:
    """A finished training run that applied params a separate writer process issued."""
    tmp_path = tmp_path_factory.mktemp("trained")
    finish(run_script(PARAMS_WRITER, "trained-1", tmp_path=tmp_path))
    finish(run_script(TRAINER, "trained-1", tmp_path=tmp_path))
    return TrainedRun("trained-1", f"{PROJECT}/trained-1", "atm-daemon-trained-1")


# -- runs: finding, reading live, updating --------------------------------------------------


def test_live_history_is_read_incrementally(
    api: wandb.Api,
    wandb_server: WandbServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    trainer = run_script(LIVE_TRAINER, "live-1", str(tmp_path), tmp_path=tmp_path)
    try:

        def managed_and_running() -> list[str]:
            filters = {"tags": {"$in": ["atm-managed"]}, "state": "running"}
            try:
                return [r.id for r in api.runs(PROJECT, filters=filters)]
            except ValueError:  # the project does not exist until the run does
                return []

        assert wait_for(managed_and_running) == ["live-1"]
        run = api.run(f"{PROJECT}/live-1")

        def steps_since(step: int) -> list[int]:
            run.load(force=True)
            return [row["_step"] for row in run.scan_history(keys=["loss"], min_step=step)]

        assert wait_for(lambda: steps_since(0) == [0, 1, 2, 3, 4])
        assert run.state == "running"
        (tmp_path / "more").touch()
        assert wait_for(lambda: steps_since(5) == [5, 6])

        def summary() -> dict[str, object]:
            # ``run.summary`` is read once and kept; ``summary_metrics`` follows each load.
            run.load(force=True)
            return dict(run.summary_metrics)

        assert wait_for(lambda: summary().get("atm/applied_version") == 1)
        assert run.state == "running"
        (tmp_path / "finish").touch()
        finish(trainer)
    finally:
        trainer.kill()

    assert steps_since(5) == [5, 6, 7]
    assert run.state == "finished"
    assert run.config == {"lr": 0.05}
    assert set(run.tags) == {"atm-managed", "atm-applied"}
    assert [row["loss"] for row in run.scan_history(keys=["loss"])] == [
        pytest.approx(1 / n) for n in range(1, 9)
    ]


def test_managed_runs_are_found_by_filters(api: wandb.Api, trained: TrainedRun) -> None:
    def found(filters: dict[str, object]) -> bool:
        return trained.run_id in {r.id for r in api.runs(PROJECT, filters=filters)}

    assert found({"tags": {"$in": ["atm-managed"]}, "state": "finished"})
    assert not found({"tags": {"$in": ["atm-managed"]}, "state": "running"})
    assert found({"tags": "atm-applied", "config.lr": 0.05})
    assert not found({"config.lr": 0.1})
    assert found({"summary_metrics.atm/applied_version": {"$gt": 0}})
    assert found({"$or": [{"display_name": "no such run"}, {"config.batch_size": {"$lt": 10}}]})
    assert not found({"$and": [{"state": "finished"}, {"tags": {"$in": ["other"]}}]})


def test_summary_config_tags_and_history_are_read(api: wandb.Api, trained: TrainedRun) -> None:
    run = api.run(trained.path)
    run.load(force=True)
    assert run.config == {"lr": 0.05, "batch_size": 8}
    assert run.summary["atm/applied_version"] == 1
    assert run.summary["eval_loss"] == 0.7
    assert {"atm-managed", "atm-applied"} <= set(run.tags)
    assert run.history_keys["lastStep"] == 3
    assert [r["_step"] for r in run.scan_history(keys=["loss"], min_step=1)] == [1, 2]
    assert [r["_step"] for r in run.scan_history()] == [0, 1, 2, 3]
    assert run.history(keys=["eval_loss"], pandas=False) == [{"_step": 3, "eval_loss": 0.7}]
    assert [r["_step"] for r in run.history(pandas=False)] == [0, 1, 2, 3]


def test_tags_only_update_leaves_config_and_summary(
    api: wandb.Api,
    wandb_server: WandbServer,  # noqa: F811
    trained: TrainedRun,
) -> None:
    run = api.run(trained.path)
    run.load(force=True)
    config, summary = dict(run.config), dict(run.summary)
    wandb_server.reset_counts()

    api._service_api.execute_graphql(
        TAGS_ONLY, {"id": run.storage_id, "tags": [*run.tags, "atm-tags-only"]}
    )

    assert wandb_server.requests == {"UpsertBucket": 1}
    run.load(force=True)
    assert "atm-tags-only" in run.tags
    assert (dict(run.config), dict(run.summary)) == (config, summary)


def test_a_quiet_poll_costs_three_requests(
    api: wandb.Api,
    wandb_server: WandbServer,  # noqa: F811
    trained: TrainedRun,
) -> None:
    run = api.run(trained.path)
    wandb_server.reset_counts()

    run.load(force=True)
    assert list(run.scan_history(keys=["loss"], min_step=4)) == []

    assert wandb_server.requests == {"Run": 1, "RunHistoryKeys": 1, "RunParquetHistory": 1}


def test_run_files_are_listed_and_downloaded(
    api: wandb.Api, trained: TrainedRun, tmp_path: Path
) -> None:
    run = api.run(trained.path)
    assert "notes.json" in {f.name for f in run.files()}
    run.file("notes.json").download(root=str(tmp_path))
    assert json.loads((tmp_path / "notes.json").read_text()) == {"applied": 1}

    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "note.txt").write_text("from the reader")
    run.upload_file(str(tmp_path / "extra" / "note.txt"), root=str(tmp_path / "extra"))
    run.file("note.txt").download(root=str(tmp_path / "back"))
    assert (tmp_path / "back" / "note.txt").read_text() == "from the reader"


def test_resume_must_continues_the_run_and_fails_for_an_unknown_one(
    api: wandb.Api, tmp_path: Path
) -> None:
    outcome = json.loads(finish(run_script(RESUMER, "resumed-1", tmp_path=tmp_path)))

    assert outcome == {"missing": "UsageError"}
    run = api.run(f"{PROJECT}/resumed-1")
    assert [r["_step"] for r in run.scan_history(keys=["loss"])] == [0, 1, 2]
    assert run.config == {"lr": 0.1}
    assert api.run(f"{PROJECT}/resumed-1-new").state == "finished"


def test_a_trainer_that_stops_posting_is_crashed(
    api: wandb.Api,
    wandb_server: WandbServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer = run_script(LIVE_TRAINER, "killed-1", str(tmp_path), tmp_path=tmp_path)
    try:
        # The trainer now waits for a file that never comes.
        runs = wandb_server.state.runs
        wait_for(
            lambda: len(getattr(runs.get(("atm-tests", "atm", "killed-1")), "history", ())) == 5
        )
        run = api.run(f"{PROJECT}/killed-1")
        assert run.state == "running"
    finally:
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.communicate()
    monkeypatch.setattr(wandb_server.state, "crash_after", 1.0)

    assert wait_for(lambda: run.load(force=True)["state"] == "crashed", timeout=10)


# -- artifacts ------------------------------------------------------------------------------


def test_params_versions_by_alias_and_version(
    api: wandb.Api, trained: TrainedRun, tmp_path: Path
) -> None:
    latest = api.artifact(f"{PROJECT}/atm-params-{trained.run_id}:latest")
    first = api.artifact(f"{PROJECT}/atm-params-{trained.run_id}:v0")

    assert (latest.version, latest.metadata) == ("v1", {"version": 1, "lr": 0.05})
    assert (first.version, first.metadata, first.aliases) == ("v0", {"version": 0, "lr": 0.1}, [])
    entry = first.get_entry("params.json").download(root=str(tmp_path / "entry"))
    assert json.loads(Path(entry).read_text()) == {"version": 0, "values": {"lr": 0.1}}
    folder = latest.download(root=str(tmp_path / "all"))
    assert json.loads(Path(folder, "params.json").read_text())["version"] == 1
    size = Path(folder, "params.json").stat().st_size
    assert [(f.name, f.size) for f in latest.files()] == [("params.json", size)]


def test_the_same_content_again_makes_no_new_version(api: wandb.Api, trained: TrainedRun) -> None:
    versions = api.artifacts("atm-params", f"{PROJECT}/atm-params-{trained.run_id}")

    assert [(a.version, sorted(a.aliases)) for a in versions] == [
        ("v1", ["again", "latest"]),
        ("v0", []),
    ]


def test_latest_moves_to_exactly_one_version(api: wandb.Api, trained: TrainedRun) -> None:
    name = f"{PROJECT}/atm-params-{trained.run_id}"
    first = api.artifact(f"{name}:v0")
    first.aliases.append("latest")
    first.save()
    try:
        holders = [
            a.version
            for a in api.artifact_collection("atm-params", name).artifacts()
            if "latest" in a.aliases
        ]
        assert holders == ["v0"]
        assert api.artifact(f"{name}:latest").version == "v0"
    finally:
        first.aliases.remove("latest")
        first.save()
        restored = api.artifact(f"{name}:v1")
        restored.aliases.append("latest")
        restored.save()
    assert api.artifact(f"{name}:latest").version == "v1"
    assert api.artifact(f"{name}:v0").aliases == []


def test_lineage_links_the_writer_and_the_trainer(api: wandb.Api, trained: TrainedRun) -> None:
    params = api.artifact(f"{PROJECT}/atm-params-{trained.run_id}:v1")
    writer = params.logged_by()

    assert writer is not None and writer.id == trained.writer_id
    assert writer.job_type == "atm-daemon"
    assert [r.id for r in params.used_by()] == [trained.run_id]
    run = api.run(trained.path)
    assert [a.name for a in run.logged_artifacts()] == [f"atm-spec-{trained.run_id}:v0"]
    assert [a.name for a in run.used_artifacts()] == [f"atm-params-{trained.run_id}:v1"]


# -- faults and gaps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "requests", "least_seconds"),
    [
        pytest.param({"status": 429, "retry_after": 1, "times": 2}, 3, 2, id="429-retry-after"),
        pytest.param({"status": 429, "retry_after": 1, "seconds": 1.5}, 3, 1.5, id="429-window"),
        pytest.param({"status": 500, "times": 1}, 2, 0, id="500"),
        pytest.param({"delay": 1.5}, 1, 1.5, id="slow"),
    ],
)
def test_faults_are_retried_until_the_call_succeeds(
    api: wandb.Api,
    wandb_server: WandbServer,  # noqa: F811
    trained: TrainedRun,
    fault: dict[str, float],
    requests: int,
    least_seconds: float,
) -> None:
    run = api.run(trained.path)
    wandb_server.reset_counts()
    wandb_server.inject(operation="Run", **fault)
    started = time.monotonic()

    run.load(force=True)

    # Only the Run query: the SDK's own telemetry posts (otel) come when they will.
    assert wandb_server.requests["Run"] == requests
    assert time.monotonic() - started >= least_seconds
    assert run.state == "finished"


def test_refused_connections_are_retried_until_the_server_is_back(
    api: wandb.Api,
    wandb_server: WandbServer,  # noqa: F811
    trained: TrainedRun,
) -> None:
    run = api.run(trained.path)
    wandb_server.refuse_connections(seconds=2)
    started = time.monotonic()

    run.load(force=True)

    assert time.monotonic() - started >= 2
    assert run.state == "finished"


def test_an_unknown_operation_is_a_400_that_names_it(
    api: wandb.Api,
    wandb_server: WandbServer,  # noqa: F811
) -> None:
    with pytest.raises(Exception, match=r"NoSuchQuery.*noSuchField"):
        api._service_api.execute_graphql("query NoSuchQuery { noSuchField }")
    request = urllib.request.Request(
        f"{wandb_server.url}/graphql",
        data=json.dumps({"query": "query NoSuchQuery { noSuchField }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 400
    assert wandb_server.unhandled == ['operation NoSuchQuery: field "noSuchField" on Query'] * 2
    wandb_server.unhandled.clear()


# -- reports ----------------------------------------------------------------------------------


def test_a_report_is_saved_with_its_spec(wandb_server: WandbServer) -> None:  # noqa: F811
    with warnings.catch_warnings():
        # wandb_workspaces still declares pydantic v1-style validators.
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as wr

    report = wr.Report(
        entity=PROJECT.split("/")[0],
        project="atm-reports",
        title="Interventions",
        blocks=[
            wr.H1("What the manager changed"),
            wr.PanelGrid(runsets=[wr.Runset()], panels=[wr.LinePlot(x="_step", y=["loss"])]),
        ],
    )
    report.save()

    (view,) = [v for v in wandb_server.state.views.values() if v.project.name == "atm-reports"]
    assert (view.display_name, view.type) == ("Interventions", "runs")
    spec = json.loads(view.spec)
    headings = [b["children"][0]["text"] for b in spec["blocks"] if b["type"] == "heading"]
    assert headings == ["What the manager changed"]
    assert wr.Report.from_url(report.url).title == "Interventions"
