"""The plain torch integration: knobs of a training loop you wrote yourself.

``TorchKnobs`` is the three-line integration::

    knobs = TorchKnobs(optimizer=opt, model=model, live={"aux_weight": 0.5}).start()
    for step, batch in enumerate(loader):
        knobs.step(step)                                  # applies a staged update, if any
        loss = main_loss + knobs["aux_weight"] * aux_loss  # live values are read each step

Knobs: the optimizer's ``learning_rate`` (with a scheduler's base lrs, when given) and
``weight_decay``, the model's ``dropout``, and the script's own live values. Commands: those the
script says it honours (``stop`` by default: read ``knobs.stop_requested``); ``checkpoint`` with
a ``checkpoint`` function; ``rollback_to_best`` with ``keep_best=True``, when the script reports
its evaluations with ``knobs.evaluated(metrics, step)``.

Under several ranks (``torch.distributed`` initialised), create and start it on every rank and
call ``step`` (and ``evaluated``) on every rank with the same step numbers: rank 0 manages,
the others follow it (``integrations.ranks``).
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from integrations import session
from integrations.adapter import KnobRow, ManagedTraining
from integrations.knobs import BoundsOverrides, Knob
from integrations.protocol import DEFAULT_OBJECTIVE, Boundary, Command, Objective, ParamsVersion
from integrations.torch_ops import (
    base_learning_rate,
    current_dropout,
    current_weight_decay,
    decaying_groups,
    set_dropout,
    set_learning_rate,
    set_weight_decay,
)

log = logging.getLogger(__name__)


def _lr(knobs: TorchKnobs) -> float | None:
    if knobs.optimizer is None:
        return None
    return base_learning_rate(knobs.optimizer, knobs.scheduler)


def _weight_decay(knobs: TorchKnobs) -> float | None:
    if knobs.optimizer is None:
        return None
    return current_weight_decay(knobs.optimizer, knobs.decay_groups)


class TorchKnobs(ManagedTraining):
    """Knobs of a hand-written torch loop: optimizer lr and weight decay, dropout, live values."""

    framework = "torch"
    boundaries = (Boundary.STEP, Boundary.EVAL)
    knob_table = (
        KnobRow(
            Knob.LEARNING_RATE,
            _lr,
            lambda k, new: set_learning_rate(k.optimizer, k.scheduler, new),
        ),
        KnobRow(
            Knob.WEIGHT_DECAY,
            _weight_decay,
            lambda k, new: set_weight_decay(k.optimizer, k.decay_groups, new),
        ),
        KnobRow(
            Knob.DROPOUT,
            lambda k: current_dropout(k.model) if k.model is not None else None,
            lambda k, new: set_dropout(k.model, new),
        ),
    )

    def __init__(
        self,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        model: nn.Module | None = None,
        scheduler: Any = None,
        live: Mapping[str, float] | None = None,
        bounds: BoundsOverrides | None = None,
        apply_at: Boundary = Boundary.STEP,
        commands: Sequence[Command] = (Command.STOP,),
        objective: str = DEFAULT_OBJECTIVE,
        keep_best: bool = False,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self._init_manager(
            run_id=None,
            tracking_uri=None,
            objective=objective,
            poll_interval=None,
            apply_at=apply_at,
            bounds=bounds,
            keep_best=keep_best,
            live=live,
        )
        self.optimizer = optimizer
        self.model = model
        self.scheduler = scheduler
        self.commands = [c for c in commands if c is not Command.ROLLBACK_TO_BEST]
        self.checkpoint = checkpoint
        self.decay_groups = decaying_groups(optimizer) if optimizer is not None else []

    def _model(self) -> Any:
        return self.model if self.keep_best else None

    def _optimizer(self) -> Any:
        return self.optimizer

    def _commands(self) -> list[Command]:
        commands = list(self.commands)
        if self.checkpoint is not None and Command.CHECKPOINT not in commands:
            commands.append(Command.CHECKPOINT)
        return commands

    def _unbound_fix(self) -> str:
        return (
            "start a run before TorchKnobs.start() (mlflow.start_run() or wandb.init()), or "
            "name one: start(run_id=RUN_ID)"
        )

    def _save_checkpoint(self) -> None:
        if self.checkpoint is None:
            raise RuntimeError("this loop saves no checkpoints (TorchKnobs(checkpoint=…))")
        self.checkpoint()

    def start(
        self,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        *,
        objective: str | None = None,
        poll_interval: float | None = None,
    ) -> TorchKnobs:
        """Connect to the manager through the run this process logs to (or the one named).

        The client closes at ``close()``, or else when the process exits: its acks are
        delivered and, if the run never logged the objective, that is said.
        """
        session.claim(self.framework)  # under `atm run`, the optimizer hook stands back
        self.run_id, self.tracking_uri = run_id, tracking_uri
        if objective is not None:
            self.objective, self._objective = objective, Objective.parse(objective)
        self.poll_interval = poll_interval or self.poll_interval
        if self.start_managing():
            atexit.unregister(self.close)
            atexit.register(self.close)
        return self

    def __getitem__(self, name: str) -> float:
        return self.value(name)

    def step(self, step: int) -> ParamsVersion | None:
        """Apply a staged update at this step; cheap when there is none."""
        return self.apply_pending(Boundary.STEP, step)

    def evaluated(self, metrics: Mapping[str, float], step: int) -> ParamsVersion | None:
        """Report an evaluation: keep the best state (``keep_best``), then apply a staged
        update meant for evaluation boundaries."""
        self.offer_evaluation(metrics, step)
        return self.apply_pending(Boundary.EVAL, step)

    def close(self) -> None:
        """Stop managing: the client's last poll delivers its acks."""
        self.stop_managing()
        atexit.unregister(self.close)
