"""The training-side client is never silent: it says once, in the script's output, when the
run's objective is never logged, when metrics come without a step (and records them at the
training step, so the run stays managed), and when it finds no run to manage; and a plain
loop's version is recorded at the first step whose logged lr shows it.

Scripts are written as users write them (tests/data/scripts import nothing from this project,
but for the three-line integration), run under `atm run` against a real MLflow server;
the pure logic is tested beside them in memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_MANAGED,
    Objective,
)
from integrations.torch_hooks import TorchKnobs
from integrations.trackers import open_tracker
from integrations.watch import ObjectiveWatch
from manager_daemon.audit import AuditLog
from tests.helpers import issue, wait_for
from tests.openai_replay import ReplayServer, turning_lr
from tests.test_atm_run import start_daemon
from tests.test_wandb_run import loopback
from tests.test_wandb_run import supervise as wandb_supervise
from tests.trainers import ATM, SCRIPTS, applied, atm_run, atm_set
from tests.wandb_server import WandbServer

ROOT = Path(__file__).resolve().parents[1]


# ---- the objective, watched (pure logic) ----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watch(grace_s: float = 60.0) -> tuple[ObjectiveWatch, Clock]:
    clock = Clock()
    return ObjectiveWatch(Objective.parse("minimize:val_los"), grace_s, clock), clock


def test_an_objective_logged_later_than_the_train_metrics_is_not_reported() -> None:
    objective, clock = watch()
    assert objective.polled({"loss", "lr"}) is None
    clock.now = 59.0
    assert objective.polled({"loss", "lr"}) is None
    assert objective.polled({"loss", "lr", "val_los"}) is None
    clock.now = 1000.0
    assert objective.polled({"loss", "lr", "val_los"}, last=True) is None


def test_a_missing_objective_is_reported_once_after_the_grace() -> None:
    objective, clock = watch()
    assert objective.polled(set()) is None
    clock.now = 100.0  # the grace counts from the first metrics, not from the start
    assert objective.polled({"loss", "val_loss"}) is None
    clock.now = 160.0
    said = objective.polled({"loss", "val_loss", "atm.params_version"})
    assert said == (
        "waiting_objective: val_los never logged; the run logs loss, val_loss; closest: "
        "val_loss. No decisions until val_los is logged; if val_loss is the objective, give it "
        "as minimize:val_loss"
    )
    clock.now = 1000.0
    assert objective.polled({"loss", "val_loss"}) is None
    assert objective.polled({"loss", "val_loss"}, last=True) is None


def test_an_evaluation_without_the_objective_is_reported_at_the_next_poll() -> None:
    objective, _ = watch()
    objective.evaluated({})  # an evaluation that said nothing tells nothing
    assert objective.polled({"loss"}) is None
    objective.evaluated({"accuracy"})
    said = objective.polled({"loss"})
    assert said is not None and "the run logs accuracy, loss" in said
    assert "give the objective as a metric the run logs" in said


def test_the_end_of_a_short_run_reports_it_and_a_late_objective_is_said_once() -> None:
    objective, _ = watch()
    assert objective.polled({"loss"}) is None
    assert "val_los never logged" in (objective.polled({"loss"}, last=True) or "")
    assert objective.polled({"loss", "val_los"}) == (
        "val_los is logged now; the manager can decide (minimize:val_los)"
    )
    assert objective.polled({"loss", "val_los"}) is None


def test_an_evaluation_with_the_objective_settles_it() -> None:
    objective, clock = watch()
    objective.evaluated({"val_los", "accuracy"})
    clock.now = 1000.0
    assert objective.polled({"loss"}) is None
    assert objective.polled({"loss"}, last=True) is None


# ---- metrics without steps, in process on a real server -------------------------------------


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_step_less_mlflow_metrics_are_recorded_at_the_training_step(
    tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("stepless")
    client = MlflowClient(tracking_uri)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="integrations"), mlflow.start_run() as run:
        other = client.create_run(run.info.experiment_id).info.run_id
        knobs = TorchKnobs(optimizer=optimizer).start(poll_interval=0.2)
        assert knobs.client is not None
        mlflow.log_metric("eval_loss", 1.0)  # before the first step: as MLflow records it
        knobs.step(7)
        mlflow.log_metric("eval_loss", 0.9)
        mlflow.log_metrics({"loss": 2.0, "lr": 0.1})
        mlflow.log_metric("loss", 1.5, step=3)  # a step of the script's own: kept
        mlflow.log_metric("loss", 1.4, run_id=other)  # another run: untouched
        knobs.step(8)
        mlflow.log_metric("eval_loss", 0.8)
        knobs.close()
        mlflow.log_metric("eval_loss", 0.7)  # the client has stopped: as MLflow records it
    run_id = run.info.run_id
    assert _steps(client, run_id, "eval_loss") == [0, 7, 8, 0]
    assert sorted(_steps(client, run_id, "loss")) == [3, 7]
    assert _steps(client, run_id, "lr") == [7]
    assert _steps(client, other, "loss") == [0]
    told = [r.getMessage() for r in caplog.records if "without step=" in r.getMessage()]
    assert told == [
        "atm: eval_loss logged without step=; recorded at the training step (7 now) so the "
        "manager can follow the run (pass step= to choose the step yourself)"
    ]


# ---- no run found, said by name --------------------------------------------------------------


def _train_torch_knobs() -> TorchKnobs:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    knobs = TorchKnobs(optimizer=optimizer, model=model).start()
    for step in range(5):
        knobs.step(step)
        model(torch.ones(4, 2)).sum().backward()
        optimizer.step()
    knobs.close()
    return knobs


def _train_trainer() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    from integrations.hf import ManagerCallback
    from tests.test_frameworks import _training_args

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    rows = torch.randint(0, 32, (16, 16))
    manager = ManagerCallback()
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=_training_args(3),  # report_to="none"
        train_dataset=[{"input_ids": r, "labels": r} for r in rows],
        callbacks=[manager],
    )
    assert trainer.train().global_step == 3
    return manager


def _train_sb3() -> Any:
    from integrations.sb3 import ManagerSB3Callback
    from tests.test_sb3 import tiny_ppo

    model = tiny_ppo()
    manager = ManagerSB3Callback()
    model.learn(64, callback=manager)
    model.learn(64, callback=manager, reset_num_timesteps=False)
    assert model.num_timesteps == 128
    return manager


@pytest.mark.parametrize(
    ("train", "framework", "fix"),
    [
        (_train_torch_knobs, "torch", "start a run before TorchKnobs.start()"),
        (_train_trainer, "transformers", "the Trainer reports to none: add report_to=['mlflow']"),
        (_train_sb3, "stable-baselines3", "start a run around learn()"),
    ],
    ids=["torch", "transformers", "sb3"],
)
def test_no_run_found_is_said_once_naming_the_framework_and_what_was_looked_for(
    train: Any,
    framework: str,
    fix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert mlflow.active_run() is None
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="integrations"):
        manager = train()
    assert manager.client is None
    said = [r.getMessage() for r in caplog.records if r.name.startswith("integrations")]
    assert len(said) == 1, said
    assert said[0].startswith(
        f"atm: unbound: no tracker run found for this {framework} process (looked for an "
        "active MLflow run or MLFLOW_RUN_ID"
    ), said
    assert "training continues unmanaged" in said[0] and fix in said[0], said


# ---- under `atm run`, as users run their scripts --------------------------------------------


def _env(tracking_uri: str, experiment: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        **extra,
    }


def _only_run(client: MlflowClient, experiment: str) -> str:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0].info.run_id


@pytest.mark.slow
def test_a_loop_logging_without_steps_keeps_getting_decisions(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    replay.answer = turning_lr()  # every answer changes the learning rate
    experiment = f"stepless-{uuid.uuid4().hex[:8]}"
    env = _env(tracking_uri, experiment, OPENAI_API_KEY="unused", ATM_COOLDOWN_STEPS="30")
    daemon = start_daemon(experiment, replay, env, tmp_path / "daemon.log")
    try:
        train = subprocess.run(
            [
                *ATM,
                "run",
                "--objective",
                "minimize:val_loss",
                "--poll-interval",
                "0.5",
                "--",
                sys.executable,
                str(SCRIPTS / "stepless_loop.py"),
                "600",
                "0.05",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=400,
            cwd=tmp_path,
        )
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert train.returncode == 0, train.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    run_id = _only_run(client, experiment)
    steps = [step for _, step in applied(client, run_id)]
    assert len(steps) >= 2, (steps, (tmp_path / "daemon.log").read_text()[-3000:])
    assert steps == sorted(set(steps)), steps
    issued = [r for r in AuditLog(open_tracker(tracking_uri)).records(run_id) if r.params_version]
    assert len(issued) >= 2
    told = [line for line in train.stderr.splitlines() if "without step=" in line]
    assert len(told) == 1 and told[0].startswith("atm: loss, lr logged without step="), told


@pytest.mark.slow
def test_a_misspelled_objective_is_named_with_the_closest_key(
    tracking_uri: str, tmp_path: Path
) -> None:
    experiment = f"typo-{uuid.uuid4().hex[:8]}"
    train = subprocess.run(
        [
            *ATM,
            "run",
            "--objective",
            "minimize:val_los",
            "--poll-interval",
            "0.5",
            "--",
            sys.executable,
            str(SCRIPTS / "stepless_loop.py"),
            "150",
            "0.02",
        ],
        capture_output=True,
        text=True,
        env=_env(tracking_uri, experiment),
        timeout=300,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "val_loss" in train.stdout, "the script ran to its end"
    # A short run: said at its end, when the client closes.
    told = [line for line in train.stderr.splitlines() if "waiting_objective" in line]
    assert told == [
        "atm: waiting_objective: val_los never logged; the run logs loss, lr, val_loss; "
        "closest: val_loss. No decisions until val_los is logged; if val_loss is the "
        "objective, give it as minimize:val_loss"
    ], train.stderr[-3000:]


KNOBS_LOOP = """
import mlflow, torch
from torch import nn
from integrations.torch_hooks import TorchKnobs

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(128, 8), torch.randn(128, 1)
with mlflow.start_run():
    knobs = TorchKnobs(optimizer=opt, model=model).start()  # MLflow's active run
    for step in range(300):
        knobs.step(step)  # applies a staged update, if any
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mlflow.log_metric("train_loss", loss.item(), step=step)
        if step % 20 == 0:
            mlflow.log_metric("val_loss", loss.item() * 1.1, step=step)
print("trained")
"""


@pytest.mark.slow
def test_torch_knobs_without_an_objective_on_a_loop_logging_val_loss(
    tracking_uri: str, tmp_path: Path
) -> None:
    script = tmp_path / "train.py"
    script.write_text(KNOBS_LOOP)
    env = _env(tracking_uri, f"knobs-{uuid.uuid4().hex[:8]}", ATM_OBJECTIVE_GRACE="1")
    env["ATM_POLL_INTERVAL"] = "0.3"
    train = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert train.returncode == 0 and "trained" in train.stdout, train.stderr[-3000:]
    told = [line for line in train.stderr.splitlines() if "waiting_objective" in line]
    assert len(told) == 1, train.stderr[-3000:]
    assert told[0].startswith("atm: waiting_objective: eval_loss never logged; the run logs ")
    assert "closest: val_loss" in told[0] and "give it as minimize:val_loss" in told[0]


@pytest.mark.slow
def test_a_loop_without_any_run_says_so_once_and_trains_on(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    train = subprocess.run(
        [*ATM, "run", "--", sys.executable, str(SCRIPTS / "unlogged_loop.py"), "450"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "done: 450 steps" in train.stdout
    # The script configures no logging: the line still reaches stderr, once.
    told = [line for line in train.stderr.splitlines() if line.startswith("atm:")]
    assert told == [
        "atm: unbound: no tracker run found for this torch process after 200 optimizer steps "
        "(looked for an active MLflow run or MLFLOW_RUN_ID: mlflow not imported; wandb.run or "
        "WANDB_RUN_ID: wandb not imported); training continues unmanaged, still looking. To "
        "manage it, log to a run (mlflow.start_run(), mlflow.log_metric(...) or wandb.init()), "
        "or continue one with atm run --run-id RUN_ID"
    ], train.stderr[-3000:]


@pytest.mark.slow
def test_a_plain_loop_records_the_step_whose_logged_lr_first_shows_the_version(
    tracking_uri: str, new_run, tmp_path: Path
) -> None:
    run_id, client = new_run(), MlflowClient(tracking_uri)
    script = [sys.executable, str(SCRIPTS / "zero_based_loop.py"), "500", "0.02"]
    train = atm_run(tracking_uri, run_id, script, tmp_path / "train.log", cwd=tmp_path)
    try:
        wait_for(lambda: client.get_run(run_id).data.tags.get(TAG_MANAGED) == "true", 120)
        atm_set(tracking_uri, run_id, "learning_rate=5e-3")
        tags = lambda: client.get_run(run_id).data.tags  # noqa: E731
        wait_for(lambda: tags().get(TAG_CLIENT_APPLIED_VERSION) == "1", 90)
        assert train.wait(120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        train.kill()
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "lr"))
    first_changed = next(step for step, lr in lrs if lr == pytest.approx(5e-3))
    assert all(lr == pytest.approx(0.01) for step, lr in lrs if step < first_changed)
    assert applied(client, run_id) == [(1, first_changed)]
    assert int(client.get_run(run_id).data.tags[TAG_CLIENT_APPLIED_STEP]) == first_changed


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_loop_logging_to_wandb_without_steps_keeps_getting_decisions(
    wandb_server: WandbServer, replay: ReplayServer, tmp_path: Path
) -> None:
    # W&B numbers step-less rows itself (two rows a step here): the run is followed as it is.
    replay.answer = turning_lr()
    seen = wandb_supervise(
        *loopback(wandb_server, tmp_path),
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "wandb_stepless_loop.py"), "600", "0.04"],
        "minimize:eval_loss",
    )
    assert int(seen["tags"][TAG_CLIENT_APPLIED_VERSION]) >= 2, seen["tags"]
    changes = [v for a, v in itertools.pairwise(seen["history"]["lr"]) if v != a]
    assert len(changes) >= 2, seen["history"]["lr"][::20]


# ---- a run that logs per epoch ---------------------------------------------------------------


def test_a_run_logging_per_epoch_gets_its_versions_recorded_at_its_own_steps(
    tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`log_metrics(..., step=epoch)` while training takes 50 optimizer steps an epoch: a
    version is recorded at the run's next epoch, where the daemon can measure it, not at an
    optimizer step far beyond every evaluation."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("per-epoch")
    tracker = open_tracker(tracking_uri)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="integrations"), mlflow.start_run() as run:
        knobs = TorchKnobs(optimizer=optimizer).start(poll_interval=0.1)
        assert knobs.client is not None
        step = 0
        for epoch in range(12):
            for _ in range(50):
                knobs.step(step)
                step += 1
            mlflow.log_metrics({"loss": 1 / (epoch + 1), "eval_loss": 1.1 / (epoch + 1)}, epoch)
            if epoch == 6:
                wait_for(lambda: knobs.client.run_steps.other_scale, 10)
                issue(tracker, run.info.run_id, 1, {"learning_rate": 0.05})
                wait_for(lambda: knobs.client.staged_version == 1, 10)
        knobs.close()
    tags = tracker.get_run(run.info.run_id).tags
    assert tags[TAG_CLIENT_APPLIED_VERSION] == "1"
    assert tags[TAG_CLIENT_APPLIED_STEP] == "7", "the epoch after the last one logged"
    told = [r.getMessage() for r in caplog.records if "a step per epoch?" in r.getMessage()]
    assert len(told) == 1 and "versions are recorded at the run's own steps" in told[0]
