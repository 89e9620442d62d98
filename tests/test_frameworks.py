"""Every framework integration does the same things, each in its framework's own way.

One suite, parametrised over transformers' ``Trainer``, a stable-baselines3 algorithm, a
PyTorch Lightning ``Trainer`` and a plain torch loop, all on the in-memory tracker: an integration publishes its knobs, applies a
version, refuses a bad one, stops, rolls back to the best evaluation, and re-applies its last
version when the trainer restarts. What only one framework has (a Trainer's label smoothing,
SB3's evaluation window) is tested beside its framework.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import pytest
import torch

from integrations.adapter import ManagedTraining
from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_REJECTED,
    TAG_MANAGED,
    RunSpec,
)
from tests.conftest import Backend
from tests.helpers import issue, wait_for

POLL_S = 0.05
Plan = dict[int, Callable[["Harness"], None]]


class Harness(Protocol):
    """One framework training a tiny model, under its integration."""

    framework: str
    knobs: frozenset[str]
    integration: ManagedTraining

    def train(self, steps: int, plan: Plan) -> int:
        """Train up to ``steps`` steps (rollouts, for SB3), calling ``plan[step](self)`` on the
        training thread after that step; returns the steps done."""
        ...

    def lr(self) -> float:
        """The learning rate the framework trains with now."""
        ...

    def weights(self) -> list[torch.Tensor]: ...


def _copy(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class TorchHarness:
    framework = "torch"
    knobs = frozenset({"learning_rate", "weight_decay", "dropout", "aux_weight"})

    def __init__(self, backend: Backend, run_id: str) -> None:
        from integrations.torch_hooks import TorchKnobs

        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, weight_decay=1e-4)
        self.integration = TorchKnobs(
            optimizer=self.optimizer, model=self.model, live={"aux_weight": 0.5}, keep_best=True
        ).start(run_id, backend.uri, poll_interval=POLL_S)

    def train(self, steps: int, plan: Plan) -> int:
        knobs = self.integration
        try:
            for step in range(1, steps + 1):
                knobs.step(step)
                if knobs.stop_requested:
                    return step - 1
                x = torch.randn(16, 4)
                target = x.sum(1, keepdim=True)
                loss = (self.model(x) - target).pow(2).mean() * knobs["aux_weight"]
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                if step in plan:
                    plan[step](self)
            return steps
        finally:
            knobs.close()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def weights(self) -> list[torch.Tensor]:
        return _copy(self.model)


class TransformersHarness:
    framework = "transformers"
    knobs = frozenset(
        {"learning_rate", "weight_decay", "dropout", "max_grad_norm", "label_smoothing"}
    )

    def __init__(self, backend: Backend, run_id: str) -> None:
        from integrations.hf import ManagerCallback

        self.integration = ManagerCallback(
            run_id=run_id, tracking_uri=backend.uri, poll_interval=POLL_S
        )
        self.trainer: Any = None

    def train(self, steps: int, plan: Plan) -> int:
        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

        harness = self

        class Hook(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
                if state.global_step in plan:
                    plan[state.global_step](harness)

        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
        model = GPT2LMHeadModel(config)
        rows = torch.randint(0, 32, (64, 16))
        data = [{"input_ids": r, "labels": r} for r in rows]
        self.trainer = Trainer(
            model=model,
            args=_training_args(steps),
            train_dataset=data,
            callbacks=[Hook(), self.integration],
        )
        return self.trainer.train().global_step

    def lr(self) -> float:
        return self.trainer.optimizer.param_groups[0]["lr"]

    def weights(self) -> list[torch.Tensor]:
        return _copy(self.trainer.model)


def _training_args(steps: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir="unused",
        max_steps=steps,
        learning_rate=1e-3,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )


class SB3Harness:
    framework = "stable-baselines3"
    knobs = frozenset({"learning_rate", "ent_coef", "vf_coef", "clip_range", "n_epochs"})
    ROLLOUT = 32

    def __init__(self, backend: Backend, run_id: str) -> None:
        from integrations.sb3 import ManagerSB3Callback

        self.integration = ManagerSB3Callback(
            run_id=run_id, tracking_uri=backend.uri, poll_interval=POLL_S
        )
        self.model: Any = None

    def train(self, steps: int, plan: Plan) -> int:
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback

        harness = self

        class Hook(BaseCallback):
            rollouts = 0

            def _on_step(self) -> bool:
                return True

            def _on_rollout_end(self) -> None:
                self.rollouts += 1
                if self.rollouts in plan:
                    plan[self.rollouts](harness)

        self.model = PPO(
            "MlpPolicy",
            "CartPole-v1",
            n_steps=self.ROLLOUT,
            batch_size=self.ROLLOUT,
            n_epochs=1,
            learning_rate=1e-3,
            policy_kwargs=dict(net_arch=[8]),
            device="cpu",
            seed=0,
        )
        hook = Hook()
        # The hook before the manager: what it stages at a rollout end applies at that one.
        self.model.learn(steps * self.ROLLOUT, callback=[hook, self.integration])
        return hook.rollouts

    def lr(self) -> float:
        return float(self.model.lr_schedule(self.model._current_progress_remaining))

    def weights(self) -> list[torch.Tensor]:
        return _copy(self.model.policy)


class LightningHarness:
    framework = "lightning"
    knobs = frozenset({"learning_rate", "weight_decay", "dropout", "max_grad_norm"})

    def __init__(self, backend: Backend, run_id: str, namespace: str = "lightning.pytorch") -> None:
        from integrations.lightning import ManagerLightningCallback

        self.namespace = namespace
        self.integration = ManagerLightningCallback(
            run_id=run_id, tracking_uri=backend.uri, poll_interval=POLL_S
        )
        self.trainer: Any = None

    def train(self, steps: int, plan: Plan) -> int:
        L = importlib.import_module(self.namespace)
        harness = self

        class Hook(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[override]
                if trainer.global_step in plan:
                    plan[trainer.global_step](harness)

        torch.manual_seed(0)
        self.trainer = lightning_trainer(L, steps, [Hook(), self.integration])
        self.trainer.fit(tiny_lightning_module(L), tiny_loader())
        return self.trainer.global_step

    def lr(self) -> float:
        return self.trainer.optimizers[0].param_groups[0]["lr"]

    def weights(self) -> list[torch.Tensor]:
        return _copy(self.trainer.lightning_module)


def tiny_lightning_module(L: Any) -> Any:
    """A LightningModule of a few parameters with dropout, trained by SGD with weight decay."""

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
            )

        def training_step(self, batch, batch_idx):  # type: ignore[override]
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[override]
            return torch.optim.SGD(self.parameters(), lr=0.01, weight_decay=1e-4)

    return Tiny()


def tiny_loader() -> Any:
    x = torch.randn(256, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=16)


def lightning_trainer(L: Any, steps: int, callbacks: list[Any], **options: Any) -> Any:
    """A quiet CPU Trainer for ``steps`` optimizer steps, clipping gradients by norm."""
    settings: dict[str, Any] = dict(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=callbacks,
    )
    return L.Trainer(**(settings | options))


HARNESSES = {
    "torch": TorchHarness,
    "transformers": TransformersHarness,
    "sb3": SB3Harness,
    "lightning": LightningHarness,
}


@pytest.fixture(params=list(HARNESSES))
def make(request: pytest.FixtureRequest, memory: Backend) -> Callable[[str], Harness]:
    torch.set_num_threads(1)
    return lambda run_id: HARNESSES[request.param](memory, run_id)


def staged(version: int) -> Callable[[Harness], None]:
    """Wait, on the training thread, until the client has fetched ``version``: the next
    boundary then applies it."""

    def wait(harness: Harness) -> None:
        client = harness.integration.client
        assert client is not None
        wait_for(
            lambda: client.staged_version == version or client.applied_version == version,
            timeout=10,
            every=0.01,
        )

    return wait


def issuing(backend: Backend, run_id: str, version: int, **fields: Any):
    """Issue a version with these fields, then wait until the client has fetched it."""

    def act(harness: Harness) -> None:
        issue(backend.tracker, run_id, version, fields.pop("values", {}), **fields)
        staged(version)(harness)

    return act


def applied(backend: Backend, run_id: str) -> str | None:
    return backend.tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION)


def test_publishes_its_knobs_and_marks_the_run(make, memory: Backend) -> None:
    run_id = memory.new_run()
    harness = make(run_id)
    managed = lambda h: wait_for(lambda: TAG_MANAGED in memory.tracker.get_run(run_id).tags)  # noqa: E731
    harness.train(4, {2: managed})
    spec = RunSpec.model_validate(memory.tracker.read_json(run_id, SPEC_PATH))
    assert spec.framework == harness.framework
    assert {k.name for k in spec.knobs} == harness.knobs
    assert {"stop", "rollback_to_best"} <= set(spec.commands)


def test_applies_a_version_at_its_boundary_and_acknowledges_it(make, memory: Backend) -> None:
    run_id = memory.new_run()
    harness = make(run_id)
    lrs: list[float] = []

    def halve(h: Harness) -> None:
        lrs.append(h.lr())
        issue(memory.tracker, run_id, 1, {"learning_rate": h.lr() / 2})
        staged(1)(h)

    harness.train(8, {3: halve, 5: lambda h: lrs.append(h.lr())})
    assert lrs[1] == pytest.approx(lrs[0] / 2)
    wait_for(lambda: applied(memory, run_id) == "1")
    markers, _ = memory.tracker.read_new_points(run_id, [METRIC_PARAMS_VERSION], None)
    assert [p.value for p in markers] == [1.0]
    assert TAG_CLIENT_REJECTED not in memory.tracker.get_run(run_id).tags


def test_refuses_a_version_outside_its_bounds_and_trains_on(make, memory: Backend) -> None:
    run_id = memory.new_run()
    harness = make(run_id)
    lrs: list[float] = []

    def far_too_high(h: Harness) -> None:
        lrs.append(h.lr())
        issue(memory.tracker, run_id, 1, {"learning_rate": h.lr() * 1000})
        wait_for(lambda: memory.tracker.get_run(run_id).tags.get(TAG_CLIENT_REJECTED), 10)

    done = harness.train(8, {2: far_too_high, 6: lambda h: lrs.append(h.lr())})
    assert done == 8
    assert lrs[1] == pytest.approx(lrs[0])
    assert "outside" in memory.tracker.get_run(run_id).tags[TAG_CLIENT_REJECTED]
    assert applied(memory, run_id) is None


def test_stops_when_told(make, memory: Backend) -> None:
    run_id = memory.new_run()
    done = make(run_id).train(200, {3: issuing(memory, run_id, 1, commands=["stop"])})
    assert done < 10


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum((x - y).abs().sum().item() for x, y in zip(a, b, strict=True))


def test_rolls_back_to_the_best_evaluation(make, memory: Backend) -> None:
    run_id = memory.new_run()
    harness = make(run_id)
    best: list[torch.Tensor] = []
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []

    def evaluated(value: float) -> Callable[[Harness], None]:
        def report(h: Harness) -> None:
            h.integration.offer_evaluation({"eval_loss": value}, 0)

        return report

    def best_evaluation(h: Harness) -> None:
        best.extend(h.weights())
        evaluated(1.0)(h)

    def roll_back(h: Harness) -> None:
        before.extend(h.weights())
        issuing(memory, run_id, 1, commands=["rollback_to_best"])(h)

    plan: Plan = {
        2: best_evaluation,
        6: evaluated(3.0),  # worse: not kept
        10: roll_back,
        11: lambda h: after.extend(h.weights()),
    }
    harness.train(12, plan)
    assert applied(memory, run_id) == "1"
    # Eight updates took the weights away from the best; after the rollback, one update
    # (step 11's) has.
    assert _distance(before, best) > 2 * _distance(after, best) > 0


def test_a_restarted_trainer_reapplies_its_last_version(make, memory: Backend) -> None:
    run_id = memory.new_run()
    first = make(run_id)
    halved: list[float] = []

    def halve(h: Harness) -> None:
        halved.append(h.lr() / 2)
        issue(memory.tracker, run_id, 1, {"learning_rate": halved[0]})
        staged(1)(h)

    first.train(6, {2: halve})
    wait_for(lambda: applied(memory, run_id) == "1")
    # A new process on the same run, from its checkpoint.
    second = make(run_id)
    lrs: list[float] = []
    second.train(6, {1: staged(1), 3: lambda h: lrs.append(h.lr())})
    assert lrs == [pytest.approx(halved[0])]


def test_label_smoothing_changes_the_loss_the_trainer_computes(memory: Backend) -> None:
    from transformers.trainer_pt_utils import LabelSmoother

    run_id = memory.new_run()
    harness = TransformersHarness(memory, run_id)
    losses: dict[str, torch.Tensor] = {}

    def measure(name: str) -> Callable[[Harness], None]:
        def compute(h: Harness) -> None:
            trainer = harness.trainer
            batch = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
            inputs = {"input_ids": batch, "labels": batch}
            trainer.model.eval()
            with torch.no_grad():
                losses[name] = trainer.compute_loss(trainer.model, dict(inputs))
                outputs = trainer.model(input_ids=batch)
                losses[f"{name}-plain"] = trainer.model(**inputs).loss
                losses[f"{name}-smoothed"] = LabelSmoother(epsilon=0.1)(
                    outputs, batch, shift_labels=True
                )
            trainer.model.train()

        return compute

    plan: Plan = {
        2: measure("before"),
        3: issuing(memory, run_id, 1, values={"label_smoothing": 0.1}),
        5: measure("after"),
    }
    harness.train(6, plan)
    assert losses["before"] == pytest.approx(losses["before-plain"].item())
    assert losses["after"] == pytest.approx(losses["after-smoothed"].item())
    # A freshly initialised model predicts near-uniformly: smoothing moves its loss by about
    # 1e-3, far more than the float error between two computations of the same loss.
    assert losses["after"] != pytest.approx(losses["after-plain"].item(), abs=1e-5)


def _waiting_objective(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if "waiting_objective" in r.getMessage()]


def test_says_once_when_evaluations_lack_the_objective(
    make, memory: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = memory.new_run()
    harness = make(run_id)

    def evaluation(h: Harness) -> None:
        # The script logs val_loss, the objective is the default eval_loss.
        memory.log_metrics(run_id, {"val_loss": 1.0, "loss": 2.0}, 2)
        h.integration.offer_evaluation({"val_loss": 1.0}, 2)
        wait_for(lambda: _waiting_objective(caplog.records), timeout=10, every=0.01)

    plan: Plan = {2: evaluation, 4: lambda h: h.integration.offer_evaluation({"val_loss": 0.9}, 4)}
    with caplog.at_level(logging.WARNING, logger="integrations"):
        harness.train(6, plan)
    said = _waiting_objective(caplog.records)
    assert said == [
        "atm: waiting_objective: eval_loss never logged; the run logs loss, val_loss; closest: "
        "val_loss. No decisions until eval_loss is logged; if val_loss is the objective, give "
        "it as minimize:val_loss"
    ]


def test_says_nothing_when_evaluations_carry_the_objective(
    make, memory: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = memory.new_run()
    harness = make(run_id)

    def evaluation(h: Harness) -> None:
        memory.log_metrics(run_id, {"eval_loss": 1.0, "loss": 2.0}, 2)
        h.integration.offer_evaluation({"eval_loss": 1.0}, 2)

    with caplog.at_level(logging.WARNING, logger="integrations"):
        harness.train(6, {2: evaluation})  # ends with the client's last poll
    said = [r.getMessage() for r in caplog.records if r.name.startswith("integrations")]
    # No daemon watched this short run, and the client says so; of the objective, nothing.
    assert not [m for m in said if "eval_loss" in m or "objective" in m], said
    assert [m for m in said if "before any daemon looked at it" in m], said
