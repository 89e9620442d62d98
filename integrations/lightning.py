"""The PyTorch Lightning integration: a ``Callback`` that applies manager updates.

Add it to a ``Trainer`` that logs through Lightning's ``MLFlowLogger`` or ``WandbLogger``::

    trainer = L.Trainer(
        logger=MLFlowLogger(tracking_uri="http://127.0.0.1:5000"),
        callbacks=[ManagerLightningCallback(objective="minimize:val_loss")],
    )

The run is the one the Trainer's first MLflow or W&B logger writes to (``MLFlowLogger``
starts its run lazily: the callback makes it start when fitting starts), else the one the
process logs to otherwise (MLflow's active run, ``wandb.run``); where there is none, the
callback says so once and training goes on unmanaged.

Knobs: the first optimizer's ``learning_rate`` (its lr schedulers' base lrs with it, so a
schedule keeps the change), ``weight_decay`` (decaying groups only), ``dropout`` (every
dropout module of the LightningModule) and ``max_grad_norm`` (the Trainer's
``gradient_clip_val``, when it clips by norm). Commands: ``stop`` (the Trainer stops after the
current batch), ``checkpoint`` (``trainer.save_checkpoint`` into ``checkpoint_dir``, else the
Trainer's ``default_root_dir``) and ``rollback_to_best`` (the weights and optimizer moments of
the best validation so far, kept in host memory). Updates apply before a training batch
(``apply_at="step"``) or after a validation (``"eval"``). One class serves both of Lightning's
namespaces, ``lightning.pytorch`` and ``pytorch_lightning``: it is a ``Callback`` of each one
installed.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from integrations import session
from integrations.adapter import KnobRow, ManagedTraining
from integrations.health import no_tracker_logger
from integrations.knobs import BoundsOverrides, Knob
from integrations.protocol import DEFAULT_OBJECTIVE, Boundary, Command, Health, HealthState
from integrations.torch_ops import (
    base_learning_rate,
    current_dropout,
    current_weight_decay,
    decaying_groups,
    set_dropout,
    set_learning_rate,
    set_weight_decay,
)
from integrations.trackers import RunBinding, bind_run

log = logging.getLogger(__name__)

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def _installed() -> list[Any]:
    """Lightning's namespaces that import here (the two packages hold distinct classes)."""
    found = []
    for name in NAMESPACES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError("integrations.lightning needs lightning or pytorch_lightning installed")
    return found


_LIGHTNING = _installed()
_MLFLOW_LOGGERS = tuple(ns.loggers.MLFlowLogger for ns in _LIGHTNING)
_WANDB_LOGGERS = tuple(ns.loggers.WandbLogger for ns in _LIGHTNING)
# Reasons already given in this process: a script that fits several times hears each once.
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.warning("atm: %s", reason)


def _clips_by_norm(cb: ManagerLightningCallback) -> float | None:
    trainer = cb.trainer
    by_value = trainer.gradient_clip_algorithm not in (None, "norm")
    return None if by_value or not trainer.gradient_clip_val else float(trainer.gradient_clip_val)


def _set_clip(cb: ManagerLightningCallback, value: float) -> None:
    # Read at every optimizer step (LightningModule.configure_gradient_clipping).
    cb.trainer.gradient_clip_val = value


class ManagerLightningCallback(*(ns.Callback for ns in _LIGHTNING), ManagedTraining):  # type: ignore[misc]
    """Connects a Lightning ``Trainer`` to the manager; inert if no tracker run can be found.

    ``run_id`` and ``tracking_uri`` name the run when the Trainer's loggers do not.
    """

    framework = "lightning"
    boundaries = (Boundary.STEP, Boundary.EVAL)
    knob_table = (
        KnobRow(
            Knob.LEARNING_RATE,
            lambda cb: base_learning_rate(cb.optimizer, cb.scheduler) if cb.optimizer else None,
            lambda cb, new: set_learning_rate(cb.optimizer, cb.scheduler, new),
        ),
        KnobRow(
            Knob.WEIGHT_DECAY,
            lambda cb: (
                current_weight_decay(cb.optimizer, cb.decay_groups) if cb.optimizer else None
            ),
            lambda cb, new: set_weight_decay(cb.optimizer, cb.decay_groups, new),
        ),
        KnobRow(
            Knob.DROPOUT,
            lambda cb: current_dropout(cb.module),
            lambda cb, new: set_dropout(cb.module, new),
        ),
        KnobRow(Knob.MAX_GRAD_NORM, _clips_by_norm, _set_clip),
    )

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        objective: str = DEFAULT_OBJECTIVE,
        poll_interval: float | None = None,
        apply_at: Boundary | str = Boundary.STEP,
        bounds: BoundsOverrides | None = None,
        keep_best: bool | None = None,
        checkpoint_dir: str | Path | None = None,
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
        self.named_run = (run_id, tracking_uri)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.trainer: Any = None
        self.module: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.decay_groups: list[int] = []
        # Why this callback manages nothing, when it does not (None while it does).
        self.health: Health | None = None

    # ---- the framework's side of the template --------------------------------------------

    def _model(self) -> Any:
        return self.module

    def _optimizer(self) -> Any:
        return self.optimizer

    def _commands(self) -> list[Command]:
        return [Command.STOP, Command.CHECKPOINT]

    def _save_checkpoint(self) -> None:
        folder = self.checkpoint_dir or Path(self.trainer.default_root_dir)
        path = folder / f"atm-step-{self.trainer.global_step}.ckpt"
        self.trainer.save_checkpoint(path)
        log.info("atm: saved checkpoint %s", path)

    def _request_stop(self) -> None:
        super()._request_stop()
        self.trainer.should_stop = True

    # ---- Trainer events -----------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Each fit() connects afresh; the previous one closed its client at teardown.
        session.claim(self.framework)
        self.trainer, self.module = trainer, pl_module
        self.optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.scheduler = next(
            (
                config.scheduler
                for config in trainer.lr_scheduler_configs
                if getattr(config.scheduler, "optimizer", None) is self.optimizer
            ),
            None,
        )
        self.decay_groups = decaying_groups(self.optimizer) if self.optimizer else []
        self.health = None
        ranks = self.join_ranks()
        # Another rank follows rank 0 and never looks for the run.
        if (ranks is None or ranks.leads) and not self._find_run(trainer):
            return
        self.start_managing()

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning logs this batch's metrics at step global_step (the optimizer steps done
        # before it): the first step whose logged values show the change.
        self.apply_pending(Boundary.STEP, trainer.global_step)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.client is None:
            return
        metrics = _scalars(trainer.callback_metrics)
        self.offer_evaluation(metrics, trainer.global_step)
        self.apply_pending(Boundary.EVAL, trainer.global_step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.stop_managing()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.stop_managing()  # a failed fit() skips teardown

    # ---- finding the run ----------------------------------------------------------------

    def _find_run(self, trainer: Any) -> bool:
        """Point the manager at the run the Trainer's loggers write to; where there is none,
        say so once and keep why in ``health``. Never raises."""
        try:
            binding = self._logger_run(trainer)
        except Exception as exc:  # a logger the manager cannot use leaves training unmanaged
            reason = (
                f"this Lightning Trainer's logger cannot be managed ({exc}); the run is not "
                "managed — log to an MLflow server or to W&B"
            )
        else:
            if binding is not None:
                self.run_id, self.tracking_uri = binding.run_id, binding.tracker.uri
                return True
            reason = no_tracker_logger(
                "this Lightning Trainer",
                "logger",
                [type(logger).__name__ for logger in trainer.loggers],
                "add MLFlowLogger or WandbLogger, or start an MLflow run",
            )
        self.health = Health(state=HealthState.UNBOUND, reason=reason)
        _say_once(str(self.health))
        return False

    def _logger_run(self, trainer: Any) -> RunBinding | None:
        if any(self.named_run):
            return bind_run(*self.named_run)
        for logger in trainer.loggers:
            if isinstance(logger, _MLFLOW_LOGGERS):
                # run_id starts the logger's run when it has none yet.
                return bind_run(logger.run_id, logger._tracking_uri)
            if isinstance(logger, _WANDB_LOGGERS):
                return bind_run(logger.experiment.id, sdk="wandb")
        return bind_run()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The one-number metrics of a ``callback_metrics`` mapping (tensors or numbers)."""
    found = {}
    for key, value in metrics.items():
        numel = getattr(value, "numel", None)
        if isinstance(value, int | float) or (numel is not None and numel() == 1):
            found[key] = float(value)
    return found
