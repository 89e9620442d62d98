"""The stable-baselines3 integration: a callback that applies manager updates between rollouts.

Pass it to ``learn()`` while the script logs to a tracker run (MLflow's, here)::

    with mlflow.start_run():
        model.learn(100_000, callback=ManagerSB3Callback(objective="maximize:eval/mean_reward"))

Knobs, each only where the algorithm has it: ``learning_rate`` (the schedule's starting value;
a new value rescales the whole schedule, so a decaying schedule keeps decaying from the new
level), ``ent_coef`` (a fixed coefficient, not SAC's ``"auto"``), ``vf_coef``, ``clip_range``
(PPO; a new value replaces the schedule with a constant), ``target_kl`` (PPO, when set),
``n_epochs`` (PPO, an integer) and ``action_noise_sigma`` (off-policy Gaussian or
Ornstein-Uhlenbeck exploration noise: the mean sigma over action dimensions; a new value
rescales every dimension's sigma by new/start, keeping their ratios), plus the script's own
values (``live``: reward weights, say; ``on_live`` receives the changed ones). Commands: ``stop``
(``learn()`` returns at the next env step), ``checkpoint`` (``model.save`` under
``checkpoint_dir``) and ``rollback_to_best`` (the policy and optimizer state of the best
evaluation so far, kept in host memory; the evaluations' objective values come from
``on_evaluation(metrics)`` or, for ``eval/mean_reward``, from an ``EvalCallback``).

Updates apply at rollout ends (``apply_at=Boundary.ROLLOUT``), before the next ``train()``,
or only after evaluations (``Boundary.EVAL``): after any ``EvalCallback`` passed to the same
``learn()`` call has evaluated, or when a script that evaluates by itself calls
``on_evaluation()``. With ``eval_window=N`` an evaluation's boundary stays open for the next
``N`` rollout ends, so that an answer to the evaluation that arrives a few seconds later applies
then instead of at the next evaluation; one that arrives later still waits for that. Keep this
callback in ``learn()``'s callback list rather than inside an ``EvalCallback``, which does not
forward rollout and training-end events to its children.

``TrackerWriter`` sends SB3's own training metrics (``train/…``, ``rollout/…``, ``time/…``) to
the run, for scripts that do not log them themselves (``log_to_tracker=True``).
"""

from __future__ import annotations

import logging
import numbers
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    EvalCallback,
    EventCallback,
)
from stable_baselines3.common.logger import KVWriter
from stable_baselines3.common.noise import (
    ActionNoise,
    NormalActionNoise,
    OrnsteinUhlenbeckActionNoise,
    VectorizedActionNoise,
)
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule

from integrations import session
from integrations.adapter import KnobRow, ManagedTraining
from integrations.knobs import BoundsOverrides, Knob
from integrations.protocol import DEFAULT_OBJECTIVE, Boundary, Command, ParamsVersion
from integrations.trackers import Tracker, bind_run

log = logging.getLogger(__name__)


def scaled_schedule(schedule: Schedule, scale: float) -> Schedule:
    """``schedule`` multiplied by ``scale``, for every value of the progress remaining.

    A closure rather than a class: SB3 saves schedules with cloudpickle, which stores a closure
    by value, so a checkpoint still loads where this package is not installed.
    """

    def scaled(progress_remaining: float) -> float:
        return float(schedule(progress_remaining)) * scale

    return scaled


def exploration_noises(noise: ActionNoise | None) -> list[ActionNoise]:
    """The Gaussian and Ornstein-Uhlenbeck noise processes in ``noise``, one per env."""
    noises = noise.noises if isinstance(noise, VectorizedActionNoise) else [noise]
    return [n for n in noises if isinstance(n, NormalActionNoise | OrnsteinUhlenbeckActionNoise)]


def _number(value: object) -> float | None:
    """A plain coefficient's value; SAC's learned one is a string ("auto"), an unset
    target_kl None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _lr(cb: ManagerSB3Callback) -> float | None:
    lr = float(cb.model.lr_schedule(1.0))
    return lr if lr > 0 else None


def _set_lr(cb: ManagerSB3Callback, new: float) -> None:
    assert cb.lr_schedule is not None
    # learn() reads lr_schedule; load() rebuilds lr_schedule from learning_rate.
    cb.model.learning_rate = scaled_schedule(
        cb.lr_schedule, new / cb.start_value(Knob.LEARNING_RATE)
    )
    cb.model.lr_schedule = FloatSchedule(cb.model.learning_rate)


def _set_ent_coef(cb: ManagerSB3Callback, new: float) -> None:
    cb.model.ent_coef = new
    if hasattr(cb.model, "ent_coef_tensor"):  # SAC with a fixed coefficient
        cb.model.ent_coef_tensor = torch.tensor(new, device=cb.model.device)


def _clip_range(cb: ManagerSB3Callback) -> float | None:
    clip_range = getattr(cb.model, "clip_range", None)
    return float(clip_range(1.0)) if callable(clip_range) else None


def _set_clip_range(cb: ManagerSB3Callback, new: float) -> None:
    # A constant replaces the schedule.
    cb.model.clip_range = FloatSchedule(ConstantSchedule(new))


def _n_epochs(cb: ManagerSB3Callback) -> float | None:
    n_epochs = getattr(cb.model, "n_epochs", None)
    return float(n_epochs) if isinstance(n_epochs, int) and n_epochs > 0 else None


def _noise_sigma(cb: ManagerSB3Callback) -> float | None:
    sigmas = [sigma for _, sigma in cb.noise_sigmas]
    if not sigmas:
        return None
    mean = float(np.mean(np.concatenate([s.ravel() for s in sigmas])))
    return mean if mean > 0 else None


def _set_noise_sigma(cb: ManagerSB3Callback, new: float) -> None:
    # Every dimension scaled alike, keeping their ratios.
    scale = new / cb.start_value(Knob.ACTION_NOISE_SIGMA)
    for noise, sigma in cb.noise_sigmas:
        noise._sigma = sigma * scale  # type: ignore[attr-defined]


def _attribute(name: str) -> KnobRow:
    """A knob that is a plain attribute of the algorithm, where it has one."""
    return KnobRow(
        name,
        lambda cb: _number(getattr(cb.model, name, None)),
        lambda cb, new: setattr(cb.model, name, new),
    )


class ManagerSB3Callback(BaseCallback, ManagedTraining):
    """Connects an SB3 algorithm's ``learn()`` to the manager; inert if no tracker run is found.

    Nothing the manager does raises into training: a failed connection leaves training
    unmanaged, a failed update is reported as rejected and the previous values stay in force.
    """

    framework = "stable-baselines3"
    boundaries = (Boundary.ROLLOUT, Boundary.EVAL)
    knob_table = (
        KnobRow(Knob.LEARNING_RATE, _lr, _set_lr),
        KnobRow(
            Knob.ENT_COEF,
            lambda cb: _number(getattr(cb.model, "ent_coef", None)),
            _set_ent_coef,
        ),
        _attribute(Knob.VF_COEF),
        _attribute(Knob.TARGET_KL),
        KnobRow(Knob.CLIP_RANGE, _clip_range, _set_clip_range),
        KnobRow(
            Knob.N_EPOCHS, _n_epochs, lambda cb, new: setattr(cb.model, "n_epochs", round(new))
        ),
        KnobRow(Knob.ACTION_NOISE_SIGMA, _noise_sigma, _set_noise_sigma),
    )

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        objective: str = DEFAULT_OBJECTIVE,
        poll_interval: float | None = None,
        apply_at: Boundary = Boundary.ROLLOUT,
        bounds: BoundsOverrides | None = None,
        checkpoint_dir: str | Path = "atm-checkpoints",
        log_to_tracker: bool = False,
        live: Mapping[str, float] | None = None,
        on_live: Callable[[dict[str, float]], None] | None = None,
        keep_best: bool | None = None,
        eval_window: int = 0,
    ) -> None:
        super().__init__()
        if eval_window < 0:
            raise ValueError(f"eval_window must be 0 or more rollouts, not {eval_window}")
        if Boundary(apply_at) is Boundary.STEP:
            raise ValueError(
                "stable-baselines3 changes hyperparameters between rollouts, not at env steps: "
                "use apply_at=Boundary.ROLLOUT (the default) or Boundary.EVAL"
            )
        self._init_manager(
            run_id=run_id,
            tracking_uri=tracking_uri,
            objective=objective,
            poll_interval=poll_interval,
            apply_at=apply_at,
            bounds=bounds,
            keep_best=keep_best,
            live=live,
            on_live=on_live,
        )
        self.checkpoint_dir = Path(checkpoint_dir)
        self.log_to_tracker = log_to_tracker
        self.eval_window = eval_window if self.apply_at is Boundary.EVAL else 0
        self.writer: TrackerWriter | None = None
        self.lr_schedule: Schedule | None = None
        self.noise_sigmas: list[tuple[ActionNoise, np.ndarray]] = []
        self._evaluators: list[EvalCallback] = []
        self._evaluations_seen = 0
        self._last_eval: tuple[int, int] | None = None  # (env step, rollout ends since)

    # ---- the framework's side of the template --------------------------------------------

    def _model(self) -> Any:
        return self.model.policy

    def _optimizer(self) -> Any:
        return getattr(self.model.policy, "optimizer", None)

    def _commands(self) -> list[Command]:
        return [Command.STOP, Command.CHECKPOINT]

    def _save_checkpoint(self) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"checkpoint-{self.model.num_timesteps}.zip"
        self.model.save(path)
        log.info("atm: saved checkpoint %s", path)

    def _unbound_fix(self) -> str:
        return (
            "start a run around learn() (with mlflow.start_run(): model.learn(...)) or call "
            "wandb.init() before it"
        )

    # ---- SB3 hooks ----------------------------------------------------------------------

    def _on_training_start(self) -> None:
        # Each learn() call connects afresh; the previous call closed its client and writer.
        session.claim(self.framework)
        self.writer, self._evaluators, self._last_eval = None, [], None
        self.lr_schedule = self.model.lr_schedule
        noises = exploration_noises(getattr(self.model, "action_noise", None))
        self.noise_sigmas = [(n, np.array(n._sigma, dtype=float)) for n in noises]
        if not self.start_managing():
            return
        if self.log_to_tracker:
            try:
                self.writer = ensure_tracker_logging(
                    self.model, run_id=self.run_id, tracking_uri=self.tracking_uri
                )
            except Exception as exc:  # metrics forwarding must not stop training either
                log.warning("atm: cannot forward SB3's metrics to the tracker: %s", exc)
        if self.apply_at is not Boundary.EVAL:
            return
        # learn() hands its (wrapped) callback to on_training_start among its locals.
        self._evaluators = evaluation_callbacks(self.locals.get("callback"))
        self._evaluations_seen = self._evaluations()
        if not self._evaluators:
            log.warning(
                "atm: apply_at=eval but learn() has no EvalCallback; updates wait for "
                "on_evaluation() calls"
            )

    def _on_step(self) -> bool:
        if self._evaluators and (done := self._evaluations()) > self._evaluations_seen:
            self._evaluations_seen = done
            self.on_evaluation()
        return not self.stop_requested

    def _on_rollout_end(self) -> None:
        if self.eval_window and self._last_eval is not None:
            step, since = self._last_eval
            if self.model.num_timesteps > step:
                since += 1
                self._last_eval = (step, since)
            if since <= self.eval_window:
                self._apply_at(Boundary.EVAL)  # the last evaluation's boundary, still open
                return
        self._apply_at(Boundary.ROLLOUT)

    def _on_training_end(self) -> None:
        self.stop_managing()
        if self.writer is not None:
            self.writer.close()

    def on_evaluation(self, metrics: Mapping[str, float] | None = None) -> ParamsVersion | None:
        """Apply a staged update as at an evaluation boundary; returns it when applied.

        Called automatically after an ``EvalCallback`` of the same ``learn()`` evaluates; call
        it from a script's own evaluation code otherwise, with the evaluation's ``metrics``
        (the objective's value among them) so that the best state can be kept.
        """
        metrics = dict(metrics or {})
        if (
            self._objective.metric not in metrics
            and self._objective.metric == "eval/mean_reward"
            and self._evaluators
        ):
            metrics[self._objective.metric] = self._evaluators[0].last_mean_reward
        self.offer_evaluation(metrics, self.model.num_timesteps)
        self._last_eval = (self.model.num_timesteps, 0)
        return self._apply_at(Boundary.EVAL)

    def _apply_at(self, boundary: Boundary) -> ParamsVersion | None:
        # The values take effect from the next train(), after this many env steps.
        return self.apply_pending(boundary, self.model.num_timesteps)

    def _evaluations(self) -> int:
        return sum(e.n_calls // e.eval_freq for e in self._evaluators if e.eval_freq > 0)


def evaluation_callbacks(root: BaseCallback | None) -> list[EvalCallback]:
    """Every ``EvalCallback`` in a callback tree (lists, event callbacks and their children)."""
    found: list[EvalCallback] = []
    pending = [root]
    while pending:
        callback = pending.pop()
        if isinstance(callback, EvalCallback):
            found.append(callback)
            pending.append(callback.callback_on_new_best)
        if isinstance(callback, EventCallback):
            pending.append(callback.callback)
        elif isinstance(callback, CallbackList):
            pending.extend(callback.callbacks)
    return found


# ---- SB3's metrics to the tracker --------------------------------------------------------------

_Dump = tuple[int, dict[str, float]]  # step, values


def scalar_metrics(
    key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]]
) -> dict[str, float]:
    """The numeric values of one SB3 dump, without keys excluded for ``"mlflow"`` (the name
    SB3's own outputs use for an experiment tracker)."""
    return {
        key: float(value)
        for key, value in key_values.items()
        if isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and "mlflow" not in key_excluded.get(key, ())
    }


class TrackerWriter(KVWriter):
    """An SB3 logger output that sends each dump to a tracker run, step = ``num_timesteps``.

    ``write`` runs on the training thread and only queues; one daemon thread sends the batches
    in order, so a slow or unreachable tracker delays the metrics, never training. Failures are
    logged once; when ``max_pending`` dumps are waiting, newer ones are dropped.
    """

    def __init__(self, tracker: Tracker, run_id: str, *, max_pending: int = 1000) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self._queue: queue.Queue[_Dump | threading.Event | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._warned = False

    def write(
        self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0
    ) -> None:
        try:
            values = scalar_metrics(key_values, key_excluded)
            if not values:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._send, name="atm-sb3-metrics")
                self._thread.daemon = True
                self._thread.start()
            self._queue.put_nowait((step, values))
        except queue.Full:
            self._warn_once(f"{self._queue.maxsize} dumps are waiting for the tracker; dropping")
        except Exception as exc:  # logging must never stop training
            self._warn_once(f"cannot queue SB3 metrics: {exc}")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` seconds until every queued dump is sent; True if they were."""
        if self._thread is None:
            return True
        sent = threading.Event()
        try:
            self._queue.put(sent, timeout=timeout)
        except queue.Full:
            return False
        return sent.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (waiting at most ``timeout`` s), then stop the sending thread."""
        if self._thread is None:
            return
        if self.flush(timeout):
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _send(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            step, values = item
            try:
                self.tracker.log_metrics(self.run_id, values, step)
            except Exception as exc:
                self._warn_once(f"cannot log SB3 metrics to run {self.run_id}: {exc}")

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("atm: %s (further failures are not reported)", message)


def ensure_tracker_logging(
    model: BaseAlgorithm, *, run_id: str | None = None, tracking_uri: str | None = None
) -> TrackerWriter:
    """Add a ``TrackerWriter`` to ``model``'s logger unless it has one; returns the writer.

    The run is the one the script logs to, unless ``run_id``/``tracking_uri`` name one.
    ``learn()`` replaces a logger not set with ``model.set_logger``, so call this once training
    has started (the callback does, with ``log_to_tracker=True``) or after ``set_logger``.
    """
    try:
        formats = model.logger.output_formats
    except AttributeError:
        raise ValueError(
            "the model has no logger yet: call ensure_tracker_logging from a callback once "
            "learn() has started, or after model.set_logger(...)"
        ) from None
    existing = next((f for f in formats if isinstance(f, TrackerWriter)), None)
    if existing is not None:
        return existing
    binding = bind_run(run_id, tracking_uri)
    if binding is None:
        raise ValueError("no tracker run to log to: start one (mlflow.start_run()) first")
    writer = TrackerWriter(binding.tracker, binding.run_id)
    formats.append(writer)
    return writer
