"""`atm run`: unmodified scripts (tests/data/scripts, which import nothing from this project)
are supervised by `atm daemon` through a real MLflow server. The daemon's LLM is a loopback
OpenAI-compatible server replaying one scripted decision: halve the learning rate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    SPEC_PATH,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    TAG_PARAMS_VERSION,
    ParamsVersion,
    RunSpec,
    params_path,
)
from integrations.trackers import open_tracker
from manager_daemon.audit import AuditLog
from tests.helpers import wait_for
from tests.openai_replay import ReplayServer, halve_lr

SCRIPTS = Path(__file__).parent / "data" / "scripts"
ATM = [sys.executable, "-m", "manager_daemon.cli"]


def start_daemon(
    experiment: str, replay: ReplayServer, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """`atm daemon` on one experiment, deciding with the replayed LLM (no fallback)."""
    return subprocess.Popen(
        [
            *ATM,
            "daemon",
            "--experiment",
            experiment,
            "--interval",
            "1",
            "--policy",
            "llm",
            "--llm-base-url",
            replay.base_url,
            "--llm-model",
            "replay",
            "--llm-fallback",
            "none",
            "--stale-evals",
            "100",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def supervise(
    tracking_uri: str,
    replay: ReplayServer,
    tmp_path: Path,
    script: list[str],
    objective: str,
    *run_options: str,
    timeout: float = 240,
    experiment: str | None = None,
) -> tuple[str, MlflowClient]:
    """Run ``script`` under `atm run` beside `atm daemon`; return the run id it logged to."""
    experiment = experiment or f"atm-run-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "OPENAI_API_KEY": "unused",
    }
    daemon = start_daemon(experiment, replay, env, tmp_path / "daemon.log")
    try:
        train = subprocess.run(
            [
                *ATM,
                "run",
                "--objective",
                objective,
                "--poll-interval",
                "0.5",
                *run_options,
                "--",
                *script,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=tmp_path,
        )
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert train.returncode == 0, train.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0].info.run_id, client


def assert_lr_halved(client: MlflowClient, run_id: str, lr_key: str, start: float) -> None:
    """Version 1 was applied, and the lr the script itself logs went from ``start`` to half."""
    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags[TAG_MANAGED] == "true" and int(tags[TAG_PARAMS_VERSION]) >= 1
    assert int(tags[TAG_CLIENT_APPLIED_VERSION]) >= 1
    v1 = ParamsVersion.model_validate_json(
        Path(client.download_artifacts(run_id, params_path(1))).read_text()
    )
    assert v1.values["learning_rate"] == pytest.approx(start / 2)
    logged = [m.value for m in sorted(client.get_metric_history(run_id, lr_key), key=_step)]
    assert logged[0] == pytest.approx(start)
    assert logged[-1] == pytest.approx(start / 2), logged
    # Once changed it stays changed: the script's own scheduler does not undo it.
    first_half = next(i for i, v in enumerate(logged) if v == pytest.approx(start / 2))
    assert all(v == pytest.approx(start / 2) for v in logged[first_half:])


def published_spec(client: MlflowClient, run_id: str) -> RunSpec:
    return RunSpec.model_validate_json(
        Path(client.download_artifacts(run_id, SPEC_PATH)).read_text()
    )


def _step(metric) -> int:
    return metric.step


@pytest.mark.slow
def test_plain_torch_loop_is_supervised_without_changes(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    replay.replies = [halve_lr(0.01)]
    run_id, client = supervise(
        tracking_uri,
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "torch_loop.py"), "400", "0.03"],
        "minimize:eval_loss",
    )
    spec = published_spec(client, run_id)
    assert spec.framework == "torch" and spec.commands == []
    assert {k.name for k in spec.knobs} == {"learning_rate", "weight_decay"}
    assert client.get_run(run_id).data.tags[TAG_OBJECTIVE] == "minimize:eval_loss"
    assert_lr_halved(client, run_id, "lr", 0.01)


@pytest.mark.slow
def test_transformers_trainer_is_supervised_without_changes(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    replay.replies = [halve_lr(1e-3)]
    run_id, client = supervise(
        tracking_uri,
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "hf_trainer.py"), str(tmp_path / "out"), "200", "0.08"],
        "minimize:eval_loss",
    )
    spec = published_spec(client, run_id)
    assert spec.framework == "transformers"
    assert_lr_halved(client, run_id, "learning_rate", 1e-3)


@pytest.mark.slow
def test_stable_baselines3_ppo_is_supervised_without_changes(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    replay.replies = [halve_lr(3e-4)]
    run_id, client = supervise(
        tracking_uri,
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "sb3_ppo.py"), "5120", "0.3"],
        "maximize:mean_reward",
    )
    spec = published_spec(client, run_id)
    assert spec.framework == "stable-baselines3"
    assert {"learning_rate", "ent_coef", "clip_range"} <= {k.name for k in spec.knobs}
    assert_lr_halved(client, run_id, "lr", 3e-4)
    # SB3's own training metrics went to the run as well.
    assert any(key.startswith("train/") for key in client.get_run(run_id).data.metrics)


@pytest.mark.slow
def test_an_accelerate_loop_logging_through_its_mlflow_tracker_is_supervised(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    replay.replies = [halve_lr(0.01)]
    run_id, client = supervise(
        tracking_uri,
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "accelerate_loop.py"), "400", "0.03", "mlflow"],
        "minimize:eval_loss",
    )
    spec = published_spec(client, run_id)
    assert spec.framework == "torch"
    assert {k.name for k in spec.knobs} == {"learning_rate", "weight_decay"}
    assert_lr_halved(client, run_id, "lr", 0.01)


@pytest.mark.slow
def test_an_accelerator_with_no_tracker_the_manager_reads_is_told_it_is_not_managed(
    tracking_uri: str, tmp_path: Path
) -> None:
    code = """
import torch
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)
accelerator.init_trackers("demo")
model = torch.nn.Linear(2, 1)
optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
for step in range(30):
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
print("trained")
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(
        [*ATM, "run", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "trained" in result.stdout, result.stderr[-3000:]
    said = (
        "atm: this Accelerator logs to no MLflow or W&B tracker (its trackers: none); the run "
        'is not managed — use Accelerator(log_with="mlflow") or log_with="wandb", or start an '
        "MLflow run"
    )
    assert result.stderr.splitlines().count(said) == 1, result.stderr[-3000:]


def test_without_atm_run_importing_the_project_changes_nothing() -> None:
    code = """
import sys, threading
import torch
before_threads = threading.active_count()
import integrations, integrations.client, integrations.hf, integrations.torch_hooks
import integrations.inject, integrations.sb3, integrations.lightning, manager_daemon.cli
from torch.optim import optimizer
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.ones(1, 2)).sum().backward()
opt.step()
assert integrations.session.current() is None
assert not [f for f in sys.meta_path if type(f).__module__.startswith("integrations")]
assert not optimizer._global_optimizer_post_hooks
assert threading.active_count() == before_threads, threading.enumerate()
print("inert")
"""
    env = {k: v for k, v in os.environ.items() if k != "ATM_RUN"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "inert" in result.stdout, result.stderr[-2000:]


def test_atm_run_rejects_bad_options_before_starting_anything(tmp_path: Path) -> None:
    atm = [sys.executable, "-m", "manager_daemon.cli", "run"]
    marker = tmp_path / "ran"
    script = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]

    def bounds_file(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    inverted = bounds_file("inverted.yaml", "learning_rate: {min: 1.0e-2, max: 1.0e-4}\n")
    misspelt = bounds_file("misspelt.yaml", "learning_rat: {max: 1.0e-2}\n")
    cases = [
        (["--objective", "eval_loss"], "minimize:METRIC"),
        (["--objective", "minimize: val_loss"], "did you mean 'minimize:val_loss'?"),
        (["--objective", "minimise:val_loss"], "did you mean 'minimize:val_loss'?"),
        (["--apply-at", "epoch"], "--apply-at"),
        (["--bounds", bounds_file("b.yaml", "learning_rate: {min: 1e-5, maxx: 1e-2}\n")], "maxx"),
        (["--bounds", str(tmp_path / "missing.yaml")], "cannot use bounds file"),
        (
            ["--bounds", inverted],
            f"cannot use bounds file {inverted}: knob 'learning_rate': min 0.01 is above max",
        ),
        (
            ["--bounds", misspelt],
            "knob 'learning_rat': no such knob; did you mean 'learning_rate'?",
        ),
    ]
    for options, message in cases:
        result = subprocess.run(
            [*atm, *options, "--", *script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert result.returncode == 2 and message in result.stderr, (options, result.stderr)
        if "--apply-at" not in options:  # click's own usage error is a box
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists()
    missing = subprocess.run(
        [*atm, "--", "no-such-program-atm"], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "cannot run" in missing.stderr
    # A script's own knob is known only once it runs: its name is accepted before.
    own = bounds_file("own.yaml", "aux_weight: {min: 0, max: 2}\nlearning_rate: {max: 0.1}\n")
    accepted = subprocess.run(
        [*atm, "--bounds", own, "--", *script], capture_output=True, text=True, timeout=120
    )
    assert accepted.returncode == 0 and marker.exists(), accepted.stderr


@pytest.mark.slow
def test_bounds_the_scripts_knobs_cannot_honour_are_said_once_and_touch_nothing(
    tracking_uri: str, tmp_path: Path
) -> None:
    # A plain loop under the optimizer hook has no dropout knob: a bounds file for one (fine
    # for a model with dropout) is refused once the script's knobs are known.
    bounds = tmp_path / "bounds.yaml"
    bounds.write_text("dropout: {max: 0.3}\nlearning_rate: {max: 0.05}\n")
    experiment = f"atm-run-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    train = subprocess.run(
        [*ATM, "run", "--bounds", str(bounds), "--", sys.executable, "torch_loop.py", "40", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=SCRIPTS,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    said = [line for line in train.stderr.splitlines() if "bounds" in line]
    assert said == [
        "atm: bounds_refused: bounds given for dropout, which this run does not have (its "
        "knobs: learning_rate, weight_decay); the run is not managed (training goes on): fix "
        "the bounds and start it again"
    ], train.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert TAG_MANAGED not in run.data.tags and SPEC_PATH not in {
        a.path for a in client.list_artifacts(run.info.run_id, "atm")
    }
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 40  # trained to the end


@pytest.mark.slow
def test_attach_a_running_script_without_a_client_is_advisory(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    experiment = f"advisory-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "OPENAI_API_KEY": "unused",
    }
    env.pop("ATM_RUN", None)
    replay.replies = [halve_lr(0.01)]
    script = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "torch_loop.py"), "500", "0.04"],
        env=env,
        stderr=(tmp_path / "script.log").open("w"),
    )
    client = MlflowClient(tracking_uri)
    daemon = None
    try:
        runs = wait_for(
            lambda: (
                (e := client.get_experiment_by_name(experiment))
                and client.search_runs([e.experiment_id])
            ),
            timeout=60,
        )
        run_id = runs[0].info.run_id
        attach = subprocess.run(
            [*ATM, "attach", run_id, "--knob", "learning_rate=0.01"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert attach.returncode == 0 and "advisory" in attach.stdout, attach.stderr
        daemon = start_daemon(experiment, replay, env, tmp_path / "daemon.log")
        tracker = open_tracker(tracking_uri)
        records = wait_for(
            lambda: [r for r in AuditLog(tracker).records(run_id) if r.status == "advisory"],
            timeout=90,
        )
        status = subprocess.run(
            [*ATM, "status"],
            capture_output=True,
            text=True,
            env={**env, "COLUMNS": "250"},
            timeout=60,
        )
        assert script.wait(120) == 0
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        if script.poll() is None:
            script.kill()
    first = records[0]
    assert first.source == "llm" and first.params_version is None
    assert first.proposal is not None and first.proposal.changes == {"learning_rate": 0.005}
    assert TAG_PARAMS_VERSION not in client.get_run(run_id).data.tags
    assert run_id[:12] in status.stdout and "advisory" in status.stdout
    logged = {m.value for m in client.get_metric_history(run_id, "lr")}
    assert logged == {0.01}, "nothing pretends to be applied"


def test_attach_reads_knobs_from_the_run_params(tracking_uri: str, new_run) -> None:
    run_id = new_run()
    client = MlflowClient(tracking_uri)
    for key, value in {"learning_rate": "3e-4", "weight_decay": "0.0", "optim": "adamw"}.items():
        client.log_param(run_id, key, value)
    result = subprocess.run(
        [sys.executable, "-m", "manager_daemon.cli", "attach", run_id],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    spec = published_spec(client, run_id)
    assert spec.knob_values == {"learning_rate": 3e-4, "weight_decay": 0.0}


@pytest.mark.slow
def test_a_restarted_script_continues_the_run_and_reapplies_its_last_version(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    replay.replies = [halve_lr(0.01)]
    script = [sys.executable, str(SCRIPTS / "torch_loop.py"), "300", "0.03"]
    run_id, client = supervise(tracking_uri, replay, tmp_path, script, "minimize:eval_loss")
    assert_lr_halved(client, run_id, "lr", 0.01)
    restarted_at = int(time.time() * 1000)
    # The restart: same script, same run, no daemon; the version applied before comes back.
    restart = subprocess.run(
        [*ATM, "run", "--run-id", run_id, "--poll-interval", "0.5", "--", *script[:2], "60"],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        timeout=180,
    )
    assert restart.returncode == 0, restart.stderr[-3000:]
    after = sorted(
        (m.timestamp, m.value)
        for m in client.get_metric_history(run_id, "lr")
        if m.timestamp >= restarted_at
    )
    assert after and after[-1][1] == pytest.approx(0.005), after
    tags = client.get_run(run_id).data.tags
    assert tags[TAG_PARAMS_VERSION] == "1" and tags[TAG_CLIENT_APPLIED_VERSION] == "1"


def test_a_script_that_adds_the_manager_itself_is_not_managed_twice(
    tracking_uri: str, new_run, tmp_path: Path
) -> None:
    run_id = new_run()
    code = f"""
import threading
import torch
from integrations.torch_hooks import TorchKnobs
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
knobs = TorchKnobs(optimizer=opt).start({run_id!r}, {tracking_uri!r})
for step in range(30):
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    knobs.step(step)
clients = [t for t in threading.enumerate() if t.name == "atm-client"]
assert len(clients) == 1, clients
print("once")
"""
    result = subprocess.run(
        [*ATM, "run", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": tracking_uri},
        timeout=120,
    )
    assert result.returncode == 0 and "once" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_control_resumes_when_a_client_appears_on_an_attached_run(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    attach = subprocess.run(
        [*ATM, "attach", run_id, "--knob", "learning_rate=0.01"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert attach.returncode == 0 and "advisory" in attach.stdout, attach.stderr
    # The script is (re)started under `atm run` on that run: its client takes over.
    replay.replies = [halve_lr(0.01)]
    script = [sys.executable, str(SCRIPTS / "torch_loop.py"), "300", "0.03"]
    found, _ = supervise(
        tracking_uri,
        replay,
        tmp_path,
        script,
        "minimize:eval_loss",
        "--run-id",
        run_id,
        experiment=experiment,
    )
    assert found == run_id
    spec = published_spec(client, run_id)
    assert spec.framework == "torch"
    assert_lr_halved(client, run_id, "lr", 0.01)
