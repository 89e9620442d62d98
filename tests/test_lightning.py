"""PyTorch Lightning: the callback on real Trainers (tiny models, CPU), bound through the
Trainer's own ``MLFlowLogger`` on a real MLflow server, and unmodified Lightning scripts
(tests/data/scripts) under `atm run` beside `atm daemon`. What every framework does (apply,
refuse, stop, roll back, restart) is in tests/test_frameworks.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from mlflow.tracking import MlflowClient

import integrations.lightning
from integrations import inject, session
from integrations.lightning import ManagerLightningCallback
from integrations.protocol import (
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_REJECTED,
    TAG_MANAGED,
    Command,
    Health,
    HealthState,
)
from integrations.session import InjectConfig
from integrations.trackers import open_tracker
from tests.conftest import Backend
from tests.helpers import issue, wait_for
from tests.openai_replay import ReplayServer, halve_lr
from tests.test_atm_run import ATM, SCRIPTS, assert_lr_halved, published_spec, start_daemon
from tests.test_frameworks import LightningHarness, lightning_trainer, tiny_loader

POLL_S = 0.05


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    # What was said once in this process is said again in each test.
    monkeypatch.setattr(integrations.lightning, "_said", set())


class Logging(L.LightningModule):
    """Logs ``train_loss`` and ``lr`` at each step and ``val_loss`` at each validation, as
    users do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
        )

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)


class AtStep(L.Callback):
    """Calls ``plan[step](trainer)`` after that optimizer step, on the training thread."""

    def __init__(self, plan: dict[int, Callable[[Any], None]]) -> None:
        self.plan = plan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[override]
        if trainer.global_step in self.plan:
            self.plan[trainer.global_step](trainer)


def fit(
    callback: ManagerLightningCallback, steps: int, plan: dict | None = None, **options: Any
) -> Any:
    trainer = lightning_trainer(L, steps, [AtStep(plan or {}), callback], **options)
    trainer.fit(Logging(), tiny_loader(), tiny_loader())
    return trainer


def staged(callback: ManagerLightningCallback, version: int) -> None:
    client = callback.client
    assert client is not None
    wait_for(lambda: client.staged_version == version, timeout=10, every=0.01)


def test_the_callback_manages_the_run_its_mlflow_logger_starts(tracking_uri: str) -> None:
    logger = L.loggers.MLFlowLogger(
        experiment_name=f"lightning-{uuid.uuid4().hex[:8]}", tracking_uri=tracking_uri
    )
    callback = ManagerLightningCallback(objective="minimize:val_loss", poll_interval=POLL_S)
    tracker = open_tracker(tracking_uri)
    lrs: list[float] = []

    def halve(trainer: Any) -> None:
        lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        issue(tracker, logger.run_id, 1, {"learning_rate": lrs[0] / 2})
        staged(callback, 1)

    plan = {3: halve, 5: lambda t: lrs.append(t.optimizers[0].param_groups[0]["lr"])}
    fit(callback, 8, plan, logger=logger, val_check_interval=4, log_every_n_steps=1)
    client = MlflowClient(tracking_uri)
    tags = client.get_run(logger.run_id).data.tags
    assert tags[TAG_MANAGED] == "true"
    spec = published_spec(client, logger.run_id)
    assert spec.framework == "lightning"
    assert {k.name for k in spec.knobs} == {
        "learning_rate",
        "weight_decay",
        "dropout",
        "max_grad_norm",
    }
    assert set(spec.commands) == {Command.STOP, Command.CHECKPOINT, Command.ROLLBACK_TO_BEST}
    assert lrs == [0.01, pytest.approx(0.005)]
    assert tags[TAG_CLIENT_APPLIED_VERSION] == "1"
    # The step recorded is the first one whose logged lr shows the change.
    logged = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, "lr"))
    changed = next(step for step, lr in logged if lr == pytest.approx(0.005))
    assert int(tags[TAG_CLIENT_APPLIED_STEP]) == changed


def test_every_knob_lands_where_lightning_reads_it(memory: Backend) -> None:
    run_id = memory.new_run()
    callback = ManagerLightningCallback(
        run_id=run_id, tracking_uri=memory.uri, poll_interval=POLL_S
    )
    values = {"weight_decay": 0.05, "dropout": 0.3, "max_grad_norm": 0.5}

    def change(trainer: Any) -> None:
        issue(memory.tracker, run_id, 1, values)
        staged(callback, 1)

    trainer = fit(callback, 4, {2: change})
    assert trainer.gradient_clip_val == 0.5
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.05
    assert {m.p for m in trainer.lightning_module.modules() if isinstance(m, torch.nn.Dropout)} == {
        0.3
    }
    assert TAG_CLIENT_REJECTED not in memory.tracker.get_run(run_id).tags


def test_validations_keep_the_best_state_and_open_the_eval_boundary(memory: Backend) -> None:
    run_id = memory.new_run()
    callback = ManagerLightningCallback(
        run_id=run_id,
        tracking_uri=memory.uri,
        poll_interval=POLL_S,
        objective="minimize:val_loss",
        apply_at="eval",
    )
    lrs: dict[int, float] = {}

    def record(trainer: Any) -> None:
        lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def halve(trainer: Any) -> None:
        record(trainer)
        issue(memory.tracker, run_id, 1, {"learning_rate": 0.005})
        staged(callback, 1)

    plan = {2: halve, 4: record, 5: record, 6: record}
    validations = Validations()
    trainer = lightning_trainer(L, 20, [AtStep(plan), validations, callback], val_check_interval=5)
    trainer.fit(Logging(), tiny_loader(), tiny_loader())
    # Staged at step 2, applied by the validation after step 5 only.
    assert lrs == {2: 0.01, 4: 0.01, 5: 0.01, 6: pytest.approx(0.005)}
    best_step, best_loss = min(validations.losses.items(), key=lambda item: item[1])
    assert callback.best is not None
    assert (callback.best.step, callback.best.value) == (best_step, pytest.approx(best_loss))


class Validations(L.Callback):
    """The ``val_loss`` of each validation, by step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module):  # type: ignore[override]
        if not trainer.sanity_checking:
            self.losses[trainer.global_step] = float(trainer.callback_metrics["val_loss"])


def test_a_checkpoint_command_saves_the_trainer_into_the_given_folder(
    memory: Backend, tmp_path: Path
) -> None:
    run_id = memory.new_run()
    callback = ManagerLightningCallback(
        run_id=run_id, tracking_uri=memory.uri, poll_interval=POLL_S, checkpoint_dir=tmp_path
    )

    def save(trainer: Any) -> None:
        issue(memory.tracker, run_id, 1, {}, commands=["checkpoint"])
        staged(callback, 1)

    fit(callback, 5, {2: save})
    saved = torch.load(tmp_path / "atm-step-2.ckpt", weights_only=False)
    assert saved["global_step"] == 2 and "state_dict" in saved


def test_a_missing_objective_is_named_once_with_the_keys_the_run_logs(
    memory: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    callback = ManagerLightningCallback(
        run_id=memory.new_run(), tracking_uri=memory.uri, objective="minimize:val_los"
    )
    with caplog.at_level(logging.WARNING, "integrations"):
        fit(callback, 12, val_check_interval=4)
    said = [r.getMessage() for r in caplog.records if "never logged" in r.getMessage()]
    assert len(said) == 1 and "closest: val_loss" in said[0]


def test_a_trainer_without_a_tracker_logger_says_so_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    callback = ManagerLightningCallback(objective="minimize:val_loss")
    with caplog.at_level(logging.WARNING, "integrations.lightning"):
        for _ in range(2):
            trainer = fit(callback, 3, logger=L.loggers.CSVLogger(tmp_path))
            assert trainer.global_step == 3 and callback.client is None
    reason = (
        "this Lightning Trainer logs to no MLflow or W&B logger (its loggers: CSVLogger); "
        "the run is not managed — add MLFlowLogger or WandbLogger, or start an MLflow run"
    )
    said = [r.getMessage() for r in caplog.records if r.name == "integrations.lightning"]
    assert said == [f"atm: unbound: {reason}"]
    assert callback.health == Health(state=HealthState.UNBOUND, reason=reason)


def test_pytorch_lightnings_trainer_is_served_by_the_same_callback(memory: Backend) -> None:
    run_id = memory.new_run()
    harness = LightningHarness(memory, run_id, namespace="pytorch_lightning")
    lrs: list[float] = []

    def halve(h: Any) -> None:
        lrs.append(h.lr())
        issue(memory.tracker, run_id, 1, {"learning_rate": h.lr() / 2})
        staged(h.integration, 1)

    assert harness.train(6, {2: halve, 4: lambda h: lrs.append(h.lr())}) == 6
    assert lrs == [0.01, pytest.approx(0.005)]


def test_under_atm_run_each_trainer_gets_the_callback_once(monkeypatch: pytest.MonkeyPatch) -> None:
    config = InjectConfig(
        objective="minimize:val_loss",
        apply_at="eval",
        poll_interval=2.0,
        bounds={"learning_rate": {"max": 0.02}},
    )
    monkeypatch.setattr(session, "_current", session.Session(config))
    plain = L.Trainer(logger=False)
    inject._add_lightning_callback(plain)
    ours = ManagerLightningCallback()
    own = L.Trainer(logger=False, callbacks=[ours])
    inject._add_lightning_callback(own)
    added = [c for c in plain.callbacks if isinstance(c, ManagerLightningCallback)]
    assert len(added) == 1
    callback = added[0]
    assert (callback.objective, callback.apply_at, callback.poll_interval) == (
        "minimize:val_loss",
        "eval",
        2.0,
    )
    assert callback.bounds == {"learning_rate": {"max": 0.02}}
    assert [c for c in own.callbacks if isinstance(c, ManagerLightningCallback)] == [ours]
    # The global optimizer hook stands back from a process a Trainer manages.
    assert session.current().owner == "lightning"


# ---- unmodified scripts under `atm run` ----------------------------------------------------------


def atm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*ATM, *args], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_a_lightning_script_logging_through_mlflowlogger_is_supervised(
    tracking_uri: str, replay: ReplayServer, tmp_path: Path
) -> None:
    experiment = f"lightning-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "OPENAI_API_KEY": "unused",
    }
    replay.replies = [halve_lr(0.01)]
    client = MlflowClient(tracking_uri)
    daemon = start_daemon(experiment, replay, env, tmp_path / "daemon.log")
    script = [sys.executable, str(SCRIPTS / "lightning_mlflow.py"), "3000", "0.05"]
    out, err = (tmp_path / "script.out").open("w"), (tmp_path / "script.err").open("w")
    train = subprocess.Popen(
        [*ATM, "run", "--objective", "minimize:val_loss", "--poll-interval", "0.5", "--", *script],
        stdout=out,
        stderr=err,
        env=env,
        cwd=tmp_path,
    )
    try:

        def applied(version: int) -> str | None:
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id]) if found else []
            tags = runs[0].data.tags if runs else {}
            done = int(tags.get(TAG_CLIENT_APPLIED_VERSION, 0)) >= version
            return runs[0].info.run_id if done else None

        run_id = wait_for(lambda: applied(1), timeout=180)
        atm("set", run_id, "rollback_to_best", "checkpoint", env=env)
        wait_for(lambda: applied(2), timeout=60)
        atm("set", run_id, "stop", env=env)
        assert train.wait(120) == 0, (tmp_path / "script.err").read_text()[-3000:]
    finally:
        daemon.terminate()
        daemon.wait(30)
        if train.poll() is None:
            train.kill()
            train.wait(30)
    spec = published_spec(client, run_id)
    assert spec.framework == "lightning"
    assert {k.name for k in spec.knobs} == {
        "learning_rate",
        "weight_decay",
        "dropout",
        "max_grad_norm",
    }
    assert_lr_halved(client, run_id, "lr", 0.01)
    tags = client.get_run(run_id).data.tags
    assert tags[TAG_CLIENT_APPLIED_VERSION] == "3" and TAG_CLIENT_REJECTED not in tags
    trained = int((tmp_path / "script.out").read_text().split("trained ")[1].split()[0])
    assert trained < 3000
    assert list(tmp_path.glob("atm-step-*.ckpt"))


@pytest.mark.slow
def test_a_pytorch_lightning_script_with_a_csv_logger_is_told_it_is_not_managed(
    tracking_uri: str, tmp_path: Path
) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(
        [
            *ATM,
            "run",
            "--objective",
            "minimize:val_loss",
            "--",
            sys.executable,
            str(SCRIPTS / "lightning_csv.py"),
            "60",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 60 steps" in result.stdout
    said = [line for line in result.stderr.splitlines() if line.startswith("atm:")]
    assert said == [
        "atm: unbound: this Lightning Trainer logs to no MLflow or W&B logger (its loggers: CSVLogger); "
        "the run is not managed — add MLFlowLogger or WandbLogger, or start an MLflow run"
    ]
