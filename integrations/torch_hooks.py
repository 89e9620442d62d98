"""Applying knobs to plain PyTorch objects, and a helper for hand-written training loops.

``TorchKnobs`` is the three-line integration for a loop you wrote yourself::

    knobs = TorchKnobs(optimizer=opt, model=model, live={"aux_weight": 0.5}).start()
    for step, batch in enumerate(loader):
        knobs.step(step)                                  # applies a staged update, if any
        loss = main_loss + knobs["aux_weight"] * aux_loss  # live values are read each step
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from integrations.client import ManagerClient
from integrations.knobs import BoundsOverrides, derive_knob
from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    Boundary,
    Command,
    KnobSpec,
    ParamsVersion,
    RunSpec,
)

log = logging.getLogger(__name__)

# Keeping the best state costs host memory of about four times the model (weights and Adam's two
# moments); beyond this size a script must opt in.
KEEP_BEST_MAX_PARAMS = 50_000_000


class BestState:
    """The weights and optimizer moments at the best evaluation so far, for ``rollback_to_best``.

    ``offer`` after each evaluation copies the state to host memory when the objective improved;
    ``restore`` puts it back while keeping the optimizer's current hyperparameters (learning
    rate, weight decay…), which are the manager's to set.
    """

    def __init__(self, better: Callable[[float, float], bool]) -> None:
        self.better = better
        self.value: float | None = None
        self.step: int | None = None
        self._model: dict[str, torch.Tensor] | None = None
        self._optimizer: dict[str, Any] | None = None

    @staticmethod
    def worth_keeping(model: nn.Module, keep: bool | None) -> bool:
        """``keep`` if given, else whether ``model`` is small enough to copy at every best."""
        if keep is not None:
            return keep
        return sum(p.numel() for p in model.parameters()) <= KEEP_BEST_MAX_PARAMS

    def offer(
        self, value: float, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> bool:
        if self.value is not None and not self.better(value, self.value):
            return False
        self.value, self.step = value, step
        self._model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self._optimizer = _to_cpu(optimizer.state_dict()) if optimizer is not None else None
        return True

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Load the best state back; returns the step it was taken at."""
        if self._model is None or self.step is None:
            raise RuntimeError("no evaluation has been recorded yet: nothing to roll back to")
        model.load_state_dict(self._model)
        if optimizer is not None and self._optimizer is not None:
            saved = copy.deepcopy(self._optimizer)
            for now, then in zip(optimizer.param_groups, saved["param_groups"], strict=True):
                then.update({k: v for k, v in now.items() if k != "params"})
            optimizer.load_state_dict(saved)
        return self.step


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return copy.deepcopy(state)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def current_dropout(model: nn.Module) -> float | None:
    """The most common dropout probability in ``model`` (None if it has no dropout)."""
    ps = [float(m.p) for m in dropout_modules(model)]
    return max(set(ps), key=ps.count) if ps else None


def set_dropout(model: nn.Module, p: float) -> None:
    for m in dropout_modules(model):
        m.p = p


def decaying_groups(optimizer: torch.optim.Optimizer) -> list[int]:
    """Indexes of the param groups that weight decay applies to.

    Groups already decaying are the answer; when every group starts at 0 (decay off), the
    groups holding matrices are, since biases and norm weights are conventionally excluded.
    """
    groups = optimizer.param_groups
    decaying = [i for i, g in enumerate(groups) if g.get("weight_decay", 0) > 0]
    if decaying:
        return decaying
    return [i for i, g in enumerate(groups) if any(p.ndim >= 2 for p in g["params"])]


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Scale every group's lr, and the scheduler's base lrs so the schedule keeps the change.

    Multiplicative schedules (LambdaLR, the transformers default) recompute lr from
    ``base_lrs`` each step, so editing the group lr alone would be undone at the next step.
    """
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    # accelerate wraps the scheduler; the schedule itself is underneath.
    scheduler = getattr(scheduler, "scheduler", scheduler)
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def set_weight_decay(optimizer: torch.optim.Optimizer, groups: list[int], value: float) -> None:
    for i in groups:
        optimizer.param_groups[i]["weight_decay"] = value


class TorchKnobs:
    """Knobs of a hand-written torch loop: optimizer lr and weight decay, dropout, live values."""

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
    ) -> None:
        self.optimizer = optimizer
        self.commands = list(commands)
        self.model = model
        self.scheduler = scheduler
        self.live = dict(live or {})
        self.apply_at = apply_at
        self.client: ManagerClient | None = None
        self._decay_groups = decaying_groups(optimizer) if optimizer else []
        self.knobs = self._discover(bounds)
        self.stop_requested = False

    def _discover(self, bounds: BoundsOverrides | None) -> list[KnobSpec]:
        found: dict[str, float] = {}
        if self.optimizer is not None:
            base = getattr(self.scheduler, "base_lrs", None)
            found["learning_rate"] = float(
                base[0] if base else self.optimizer.param_groups[0]["lr"]
            )
            if self._decay_groups:
                first = self.optimizer.param_groups[self._decay_groups[0]]
                found["weight_decay"] = float(first.get("weight_decay", 0.0))
        if self.model is not None and (p := current_dropout(self.model)) is not None:
            found["dropout"] = p
        found.update(self.live)
        return [
            derive_knob(n, v, apply_at=self.apply_at, overrides=bounds) for n, v in found.items()
        ]

    def spec(self) -> RunSpec:
        return RunSpec(
            framework="torch", knobs=self.knobs, commands=self.commands, apply_at=self.apply_at
        )

    def start(
        self,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        *,
        objective: str = DEFAULT_OBJECTIVE,
        poll_interval: float = 2.0,
    ) -> TorchKnobs:
        """Connect to the manager through the run this process logs to (MLflow's active run)."""
        from integrations import inject

        inject.claim("torch-knobs")  # under `atm run`, the optimizer hook leaves this loop alone
        run_id, tracking_uri = resolve_mlflow_run(run_id, tracking_uri)
        if run_id is None:
            log.warning("atm: no MLflow run to attach to; training continues unmanaged")
            return self
        self.client = ManagerClient(
            run_id,
            self.spec(),
            tracking_uri=tracking_uri,
            objective=objective,
            poll_interval=poll_interval,
        ).start()
        return self

    def __getitem__(self, name: str) -> float:
        return self.client.value(name) if self.client else self.live[name]

    def step(self, step: int, boundary: Boundary = Boundary.STEP) -> ParamsVersion | None:
        """Apply a staged update at this boundary; cheap when there is none."""
        if self.client is None:
            return None
        return self.client.apply_pending(boundary, step, self._apply)

    def _apply(self, changed: dict[str, float], commands: list[Command]) -> None:
        assert self.client is not None
        for name, value in changed.items():
            if name == "learning_rate" and self.optimizer is not None:
                scale_learning_rate(self.optimizer, self.scheduler, value / self.client.value(name))
            elif name == "weight_decay" and self.optimizer is not None:
                set_weight_decay(self.optimizer, self._decay_groups, value)
            elif name == "dropout" and self.model is not None:
                set_dropout(self.model, value)
            elif name in self.live:
                self.live[name] = value
        if Command.STOP in commands:
            self.stop_requested = True

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def resolve_mlflow_run(
    run_id: str | None, tracking_uri: str | None
) -> tuple[str | None, str | None]:
    """The run and tracking URI to attach to: explicit, else MLflow's active run or env."""
    import mlflow

    if run_id is None:
        active = mlflow.active_run()
        run_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
    return run_id, tracking_uri or mlflow.get_tracking_uri()
