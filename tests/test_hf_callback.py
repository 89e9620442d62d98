"""The transformers callback applies every knob and command the way the Trainer needs."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import mlflow
import pytest
from transformers import Trainer, TrainerCallback

from integrations.hf import ManagerCallback
from integrations.protocol import (
    SPEC_PATH,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    RunSpec,
)
from manager_daemon.demo.lm import DEMO_RECIPE, prepare, training_arguments
from tests.helpers import issue, wait_for

RECIPE = dataclasses.replace(
    DEMO_RECIPE,
    n_train_stories=40,
    n_eval_stories=10,
    n_layer=1,
    n_embd=32,
    n_head=2,
    dropout=0.05,
    weight_decay=0.0,
    max_steps=400,
    warmup_steps=0,
    eval_steps=1000,
    logging_steps=1000,
)


class Recorder(TrainerCallback):
    """Records what the optimizer, model and args hold at the end of each step."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def on_step_end(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw
    ):
        self.rows[state.global_step] = {
            "lrs": [g["lr"] for g in optimizer.param_groups],
            "base_lrs": list(lr_scheduler.base_lrs),
            "wds": [g["weight_decay"] for g in optimizer.param_groups],
            "dropout": {m.p for m in model.modules() if m.__class__.__name__ == "Dropout"},
            "max_grad_norm": args.max_grad_norm,
        }
        time.sleep(0.03)  # slow enough for the test to intervene mid-run


def test_callback_applies_knobs_and_commands(tracking_uri: str, tracker, tmp_path: Path) -> None:
    data = prepare(RECIPE)
    recorder = Recorder()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("hf-callback")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        trainer = Trainer(
            model=data.model,
            args=training_arguments(
                RECIPE, str(tmp_path), report_to=["mlflow"], eval_strategy="no"
            ),
            train_dataset=data.train_dataset,
            callbacks=[ManagerCallback(poll_interval=0.3), recorder],
        )

        def intervene() -> None:
            wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags, 60)
            spec = RunSpec.model_validate(tracker.read_json(run_id, SPEC_PATH))
            lr = spec.knob("learning_rate").value
            values = {
                "learning_rate": lr / 2,
                "weight_decay": 0.1,
                "dropout": 0.2,
                "max_grad_norm": 0.5,
            }
            issue(tracker, run_id, 1, values)
            wait_for(
                lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == "1", 60
            )
            issue(tracker, run_id, 2, values, commands=["checkpoint", "stop"])

        thread = threading.Thread(target=intervene, daemon=True)
        thread.start()
        trainer.train()
        thread.join(5)
        tags = tracker.get_run(run_id).tags

    assert tags[TAG_CLIENT_APPLIED_VERSION] == "2"
    assert trainer.state.global_step < RECIPE.max_steps, "the stop command ended training"
    assert any(p.name.startswith("checkpoint-") for p in tmp_path.iterdir()), "checkpoint saved"
    rows = recorder.rows
    first, last = rows[min(rows)], rows[max(rows)]
    # The constant schedule holds the halved lr: the edit was not undone by the scheduler.
    assert last["lrs"] == pytest.approx([RECIPE.learning_rate / 2] * 2)
    assert last["base_lrs"] == pytest.approx([lr / 2 for lr in first["base_lrs"]])
    # Weight decay went to the decaying group only (the first; biases and norms stay at 0).
    assert first["wds"] == [0.0, 0.0] and last["wds"] == [0.1, 0.0]
    assert first["dropout"] == {0.05} and last["dropout"] == {0.2}
    assert first["max_grad_norm"] == RECIPE.max_grad_norm and last["max_grad_norm"] == 0.5
