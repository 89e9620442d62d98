"""The transformers integration: a ``TrainerCallback`` that applies manager updates.

Add it to any ``Trainer`` that logs to a tracker (``report_to=["mlflow"]``)::

    trainer = Trainer(..., callbacks=[ManagerCallback(objective="minimize:eval_loss")])

Knobs: ``learning_rate`` (the scheduler's base lrs and the current lr together, so LambdaLR
schedules keep the change), ``weight_decay`` (decaying groups only), ``dropout`` (every
dropout module), ``max_grad_norm`` and ``label_smoothing`` (the loss the Trainer computes).
Commands: ``stop``, ``checkpoint`` and ``rollback_to_best`` (the weights and optimizer moments
of the best evaluation so far, kept in host memory; on by default for models of up to 50M
parameters, ``keep_best=True`` or ``False`` to decide). Under several ranks every rank's
Trainer has the callback: rank 0 manages, the others follow it (``integrations.ranks``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother

from integrations import session
from integrations.adapter import KnobRow, ManagedTraining
from integrations.knobs import BoundsOverrides, Knob
from integrations.protocol import DEFAULT_OBJECTIVE, Boundary, Command
from integrations.torch_ops import (
    current_dropout,
    decaying_groups,
    set_dropout,
    set_learning_rate,
    set_weight_decay,
)

log = logging.getLogger(__name__)


def _smoothing(cb: ManagerCallback) -> float | None:
    trainer = cb.trainer
    if trainer is None:
        return None
    if getattr(trainer.model.config, "problem_type", None) == "multi_label_classification":
        return None  # the Trainer does not smooth multi-label losses
    return float(trainer.args.label_smoothing_factor)


def _set_smoothing(cb: ManagerCallback, value: float) -> None:
    trainer = cb.trainer
    assert trainer is not None
    trainer.args.label_smoothing_factor = value
    trainer.label_smoother = LabelSmoother(epsilon=value) if value > 0 else None


class ManagerCallback(TrainerCallback, ManagedTraining):
    """Connects a ``Trainer`` to the manager; inert if no tracker run can be found.

    ``trainer`` is found by itself when training starts; pass it when the callback is added
    to a trainer some other way than from the trainer's own methods.
    """

    framework = "transformers"
    boundaries = (Boundary.STEP, Boundary.EVAL)
    knob_table = (
        KnobRow(
            Knob.LEARNING_RATE,
            lambda cb: cb.args.learning_rate,
            lambda cb, new: set_learning_rate(cb.optimizer, cb.lr_scheduler, new),
        ),
        KnobRow(
            Knob.WEIGHT_DECAY,
            lambda cb: cb.args.weight_decay if cb.decay_groups else None,
            lambda cb, new: set_weight_decay(cb.optimizer, cb.decay_groups, new),
        ),
        KnobRow(
            Knob.MAX_GRAD_NORM,
            lambda cb: cb.args.max_grad_norm if (cb.args.max_grad_norm or 0) > 0 else None,
            lambda cb, new: setattr(cb.args, "max_grad_norm", new),
        ),
        KnobRow(
            Knob.DROPOUT,
            lambda cb: current_dropout(cb.model) if cb.model is not None else None,
            lambda cb, new: set_dropout(cb.model, new),
        ),
        KnobRow(Knob.LABEL_SMOOTHING, _smoothing, _set_smoothing),
    )

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        objective: str = DEFAULT_OBJECTIVE,
        poll_interval: float | None = None,
        apply_at: Boundary = Boundary.STEP,
        bounds: BoundsOverrides | None = None,
        keep_best: bool | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        self._init_manager(
            run_id=run_id,
            tracking_uri=tracking_uri,
            objective=objective,
            poll_interval=poll_interval,
            apply_at=apply_at,
            bounds=bounds,
            keep_best=keep_best,
        )
        self.trainer = trainer
        self.args: TrainingArguments | None = None
        self.model: Any = None
        self.optimizer: Any = None
        self.lr_scheduler: Any = None
        self.decay_groups: list[int] = []
        self._control: TrainerControl | None = None

    # ---- the framework's side of the template --------------------------------------------

    def _model(self) -> Any:
        return self.model

    def _optimizer(self) -> Any:
        return self.optimizer

    def _commands(self) -> list[Command]:
        return [Command.STOP, Command.CHECKPOINT]

    def _save_checkpoint(self) -> None:
        assert self._control is not None
        self._control.should_save = True

    def _unbound_fix(self) -> str:
        reports = list(self.args.report_to or []) if self.args is not None else []
        if not {"mlflow", "wandb", "all"} & set(reports):
            return (
                f"the Trainer reports to {reports or 'none'}: add report_to=['mlflow'] (or "
                "'wandb') to its TrainingArguments"
            )
        return "set MLFLOW_RUN_ID or WANDB_RUN_ID, or start a run before trainer.train()"

    def _request_stop(self) -> None:
        super()._request_stop()
        assert self._control is not None
        self._control.should_training_stop = True

    # ---- Trainer events -----------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Every rank: rank 0 manages, the others follow it (integrations.ranks).
        if self.client is not None:
            return
        session.claim(self.framework)
        self.args = args
        self.model = kwargs.get("model")
        self.optimizer = kwargs.get("optimizer")
        self.lr_scheduler = kwargs.get("lr_scheduler")
        self.decay_groups = decaying_groups(self.optimizer) if self.optimizer is not None else []
        self.trainer = self.trainer or _calling_trainer()
        self.start_managing()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._apply_at(Boundary.STEP, state, control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.offer_evaluation(kwargs.get("metrics") or {}, state.global_step)
        self._apply_at(Boundary.EVAL, state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.stop_managing()

    def _apply_at(self, boundary: Boundary, state: TrainerState, control: TrainerControl) -> None:
        self._control = control
        # The values take effect from the next optimizer step.
        self.apply_pending(boundary, state.global_step + 1)


def _calling_trainer() -> Trainer | None:
    """The ``Trainer`` whose method is sending the current event.

    The Trainer hands its callbacks its model, optimizer and scheduler but not itself, and the
    loss it computes (label smoothing) is the Trainer's own. Events are sent from the Trainer's
    methods, so the trainer is ``self`` in a calling frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None
