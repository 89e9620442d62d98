"""Torch operations the framework integrations share: the best state for rollback, and
setting the learning rate, weight decay and dropout on live optimizers and models.

A leaf: it imports torch and nothing else of this project's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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


def base_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
    """The learning rate as a knob: the schedule's base lr (what it scales), or the first
    group's lr when there is no schedule."""
    scheduler = getattr(scheduler, "scheduler", scheduler)
    base = getattr(scheduler, "base_lrs", None)
    return float(base[0] if base else optimizer.param_groups[0]["lr"])


def set_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, value: float) -> None:
    """Make ``value`` the base learning rate, scaling what the optimizer and schedule hold now.

    Relative to the state as it is, not to the value last set: a state loaded from a
    checkpoint already holds the learning rate of the version it was saved under, and
    re-applying that version must leave it as it is.
    """
    scale_learning_rate(optimizer, scheduler, value / base_learning_rate(optimizer, scheduler))


def current_weight_decay(optimizer: torch.optim.Optimizer, groups: list[int]) -> float | None:
    """The weight decay of the decaying ``groups`` (the first one's), None without any."""
    if not groups:
        return None
    return float(optimizer.param_groups[groups[0]].get("weight_decay", 0.0))


def set_weight_decay(optimizer: torch.optim.Optimizer, groups: list[int], value: float) -> None:
    for i in groups:
        optimizer.param_groups[i]["weight_decay"] = value
