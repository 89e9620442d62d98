"""The transformers integration: a ``TrainerCallback`` that applies manager updates.

Add it to any ``Trainer`` that logs to MLflow (``report_to=["mlflow"]``)::

    trainer = Trainer(..., callbacks=[ManagerCallback(objective="minimize:eval_loss")])

Knobs: ``learning_rate`` (the scheduler's base lrs and the current lr together),
``weight_decay`` (decaying groups only), ``dropout`` (every dropout module),
``max_grad_norm``. Commands: ``stop``, ``checkpoint`` and ``rollback_to_best`` (the weights and
optimizer moments of the best evaluation so far, kept in host memory; on by default for models
of up to 50M parameters, ``keep_best=True`` or ``False`` to decide).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from integrations.client import ManagerClient
from integrations.knobs import BoundsOverrides, derive_knob
from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    Boundary,
    Command,
    KnobSpec,
    Objective,
    RunSpec,
)
from integrations.torch_hooks import (
    BestState,
    current_dropout,
    decaying_groups,
    resolve_mlflow_run,
    scale_learning_rate,
    set_dropout,
    set_weight_decay,
)

log = logging.getLogger(__name__)


class ManagerCallback(TrainerCallback):
    """Connects a ``Trainer`` to the manager; inert if no tracker run can be found."""

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        objective: str = DEFAULT_OBJECTIVE,
        poll_interval: float = 2.0,
        apply_at: Boundary = Boundary.STEP,
        bounds: BoundsOverrides | None = None,
        keep_best: bool | None = None,
    ) -> None:
        if apply_at is Boundary.ROLLOUT:
            raise ValueError("a Trainer has step and eval boundaries, not rollouts")
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.objective = objective
        self._objective = Objective.parse(objective)  # a bad objective fails here, not mid-run
        self.poll_interval = poll_interval
        self.apply_at = apply_at
        self.bounds = bounds
        self.keep_best = keep_best
        self.client: ManagerClient | None = None
        self._best: BestState | None = None
        self._objects: dict[str, Any] = {}
        self._decay_groups: list[int] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.client is not None or not state.is_world_process_zero:
            return
        run_id, uri = resolve_mlflow_run(self.run_id, self.tracking_uri)
        if run_id is None:
            log.warning(
                "atm: no MLflow run found (report_to mlflow?); training continues unmanaged"
            )
            return
        self._objects = {"args": args, **kwargs}
        optimizer = kwargs.get("optimizer")
        self._decay_groups = decaying_groups(optimizer) if optimizer is not None else []
        commands = [Command.STOP, Command.CHECKPOINT]
        model = kwargs.get("model")
        if model is not None and BestState.worth_keeping(model, self.keep_best):
            self._best = BestState(self._objective.better)
            commands.append(Command.ROLLBACK_TO_BEST)
        spec = RunSpec(
            framework="transformers",
            knobs=self._discover(args, kwargs),
            commands=commands,
            apply_at=self.apply_at,
        )
        self.client = ManagerClient(
            run_id,
            spec,
            tracking_uri=uri,
            objective=self.objective,
            poll_interval=self.poll_interval,
        ).start()

    def _discover(self, args: TrainingArguments, objects: dict[str, Any]) -> list[KnobSpec]:
        found = {"learning_rate": args.learning_rate}
        if self._decay_groups:
            found["weight_decay"] = args.weight_decay
        if args.max_grad_norm and args.max_grad_norm > 0:
            found["max_grad_norm"] = args.max_grad_norm
        model = objects.get("model")
        if model is not None and (p := current_dropout(model)) is not None:
            found["dropout"] = p
        return [
            derive_knob(n, v, apply_at=self.apply_at, overrides=self.bounds)
            for n, v in found.items()
        ]

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._apply_pending(Boundary.STEP, state, control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        metrics = kwargs.get("metrics") or {}
        if self._best is not None:
            value = metrics.get(self._objective.metric)
            if isinstance(value, int | float):
                self._best.offer(
                    float(value),
                    state.global_step,
                    self._objects["model"],
                    self._objects.get("optimizer"),
                )
        self._apply_pending(Boundary.EVAL, state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.client is not None:
            self.client.close()

    def _apply_pending(
        self, boundary: Boundary, state: TrainerState, control: TrainerControl
    ) -> None:
        if self.client is None:
            return

        def apply(changed: dict[str, float], commands: list[Command]) -> None:
            self._apply(changed, commands, control)

        # The values take effect from the next optimizer step.
        self.client.apply_pending(boundary, state.global_step + 1, apply)

    def _apply(
        self, changed: dict[str, float], commands: list[Command], control: TrainerControl
    ) -> None:
        assert self.client is not None
        optimizer = self._objects.get("optimizer")
        # First: the restored optimizer keeps its current hyperparameters, which the new values
        # below then change.
        if Command.ROLLBACK_TO_BEST in commands:
            if self._best is None:
                raise RuntimeError("rollback_to_best is not enabled for this run")
            step = self._best.restore(self._objects["model"], optimizer)
            log.info("atm: rolled back to the best evaluation, at step %d", step)
        for name, value in changed.items():
            if name == "learning_rate":
                factor = value / self.client.value(name)
                scale_learning_rate(optimizer, self._objects.get("lr_scheduler"), factor)
            elif name == "weight_decay":
                set_weight_decay(optimizer, self._decay_groups, value)
            elif name == "dropout":
                set_dropout(self._objects["model"], value)
            elif name == "max_grad_norm":
                self._objects["args"].max_grad_norm = value
        if Command.STOP in commands:
            control.should_training_stop = True
        if Command.CHECKPOINT in commands:
            control.should_save = True
