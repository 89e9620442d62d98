"""Metrics a script logs through MLflow without ``step=``, recorded at the training step.

``mlflow.log_metric(key, value)`` and ``mlflow.log_metrics(values)`` without a step record
every point at step 0. The manager reads a run's metrics by step range from where it last
read, so such a run would look as if it never logged again after its first evaluation. While
a client manages the run in this process, those two functions (wrapped in ``mlflow`` and
``mlflow.tracking.fluent``, where scripts call them) give such points the training step the
client last saw, and the user is told once. Points logged with a step, to another run, or
through ``MlflowClient`` are left as they are, and so is everything once the client stops.

A script that bound ``log_metric`` to a name of its own before the client started (``from
mlflow import log_metric``) calls the original, and its points stay at step 0.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

# Runs managed in this process → the training step their client last saw (None: none yet).
_training_steps: dict[str, Callable[[], int | None]] = {}
_told: set[str] = set()
_lock = threading.Lock()
# Where each wrapped function takes its step as a positional argument.
_STEP_POSITION = {"log_metric": 2, "log_metrics": 1}


def follow_steps(run_id: str, training_step: Callable[[], int | None]) -> Callable[[], None]:
    """Record ``run_id``'s step-less points at ``training_step()``; returns the undo."""
    _wrap_fluent_api()
    with _lock:
        _training_steps[run_id] = training_step

    def stop() -> None:
        with _lock:
            if _training_steps.get(run_id) is training_step:
                del _training_steps[run_id]

    return stop


def _wrap_fluent_api() -> None:
    import mlflow
    import mlflow.tracking.fluent as fluent

    for name, position in _STEP_POSITION.items():
        for module in (mlflow, fluent):
            original = getattr(module, name)
            if not hasattr(original, "__atm_wrapped__"):
                setattr(module, name, _with_training_step(original, position))


def _with_training_step(original: Callable[..., Any], position: int) -> Callable[..., Any]:
    @functools.wraps(original)
    def logged(*args: Any, **kwargs: Any) -> Any:
        if len(args) <= position and kwargs.get("step") is None:
            step = _step_for(kwargs.get("run_id"), _keys(args, kwargs))
            if step is not None:
                kwargs["step"] = step
        return original(*args, **kwargs)

    logged.__atm_wrapped__ = original  # type: ignore[attr-defined]
    return logged


def _keys(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    first = args[0] if args else kwargs.get("key", kwargs.get("metrics"))
    return list(first) if isinstance(first, dict) else [str(first)]


def _step_for(run_id: str | None, keys: Iterable[str]) -> int | None:
    """The training step for a step-less point of ``run_id`` (None: the run the call logs to),
    or None to leave the point as MLflow records it."""
    try:
        import mlflow

        if run_id is None:
            active = mlflow.active_run()
            run_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
        source = _training_steps.get(run_id) if run_id else None
        step = source() if source is not None else None
    except Exception:  # the script's own logging must go on whatever happens here
        log.debug("atm: no training step for a step-less metric", exc_info=True)
        return None
    if step is None:
        return None
    with _lock:
        first = run_id not in _told
        _told.add(run_id)
    if first:
        log.warning(
            "atm: %s logged without step=; recorded at the training step (%d now) so the "
            "manager can follow the run (pass step= to choose the step yourself)",
            ", ".join(keys),
            step,
        )
    return step
