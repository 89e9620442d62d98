"""The stable-baselines3 integration: a callback that applies manager updates between rollouts.

Pass it to ``learn()`` while the script logs to an MLflow run::

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

``MlflowWriter`` sends SB3's own training metrics (``train/…``, ``rollout/…``, ``time/…``) to
the run, for scripts that do not log them themselves (``log_to_mlflow=True``).
"""

from __future__ import annotations

import logging
import numbers
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
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

from integrations.client import ManagerClient
from integrations.knobs import BoundsOverrides, derive_knob
from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    Boundary,
    Command,
    KnobSpec,
    Objective,
    ParamsVersion,
    RunSpec,
    Scale,
)
from integrations.torch_hooks import BestState, resolve_mlflow_run

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


def discover_values(model: BaseAlgorithm) -> dict[str, float]:
    """The knobs ``model``'s algorithm has, with their starting values."""
    found: dict[str, float] = {}
    lr = float(model.lr_schedule(1.0))
    if lr > 0:
        found["learning_rate"] = lr
    for name in ("ent_coef", "vf_coef", "target_kl"):
        value = getattr(model, name, None)
        # SAC's learned coefficient is a string ("auto"); an unset target_kl is None.
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = float(value)
    clip_range = getattr(model, "clip_range", None)
    if callable(clip_range):
        found["clip_range"] = float(clip_range(1.0))
    n_epochs = getattr(model, "n_epochs", None)
    if isinstance(n_epochs, int) and n_epochs > 0:
        found["n_epochs"] = float(n_epochs)
    noises = exploration_noises(getattr(model, "action_noise", None))
    sigmas = [np.asarray(n._sigma, dtype=float) for n in noises]
    if sigmas and (mean := float(np.mean(np.concatenate([s.ravel() for s in sigmas])))) > 0:
        found["action_noise_sigma"] = mean
    return found


def default_bounds(name: str, value: float) -> dict[str, Any]:
    """SB3-specific bounds; knobs not listed here get ``derive_knob``'s defaults."""
    if name == "ent_coef":
        return dict(min=min(0.0, value), max=max(0.1, 2 * value), max_rel_step=0.2, scale=Scale.LIN)
    if name == "vf_coef":
        return dict(min=min(0.0, value), max=max(1.0, 2 * value), max_rel_step=0.2, scale=Scale.LIN)
    if name == "clip_range" and value > 0:
        # A ratio clipped beyond [0, 2] is not clipped at all.
        upper = max(value, min(10 * value, 1.0))
        return dict(min=value / 10, max=upper, max_rel_step=1.0, scale=Scale.LOG)
    if name == "n_epochs":
        return dict(min=1.0, max=max(10.0, 10 * value), max_rel_step=1.0, scale=Scale.LOG)
    return {}


class ManagerSB3Callback(BaseCallback):
    """Connects an SB3 algorithm's ``learn()`` to the manager; inert if no MLflow run is found.

    Nothing the manager does raises into training: a failed connection leaves training
    unmanaged, a failed update is reported as rejected and the previous values stay in force.
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        objective: str = DEFAULT_OBJECTIVE,
        poll_interval: float = 2.0,
        apply_at: Boundary = Boundary.ROLLOUT,
        bounds: BoundsOverrides | None = None,
        checkpoint_dir: str | Path = "atm-checkpoints",
        log_to_mlflow: bool = False,
        live: Mapping[str, float] | None = None,
        on_live: Callable[[dict[str, float]], None] | None = None,
        keep_best: bool | None = None,
        eval_window: int = 0,
    ) -> None:
        super().__init__()
        apply_at = Boundary(apply_at)
        if eval_window < 0:
            raise ValueError(f"eval_window must be 0 or more rollouts, not {eval_window}")
        if apply_at is Boundary.STEP:
            raise ValueError(
                "stable-baselines3 changes hyperparameters between rollouts, not at env steps: "
                "use apply_at=Boundary.ROLLOUT (the default) or Boundary.EVAL"
            )
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.objective = objective
        self.poll_interval = poll_interval
        self.apply_at = apply_at
        self.bounds = bounds
        self.checkpoint_dir = Path(checkpoint_dir)
        self.log_to_mlflow = log_to_mlflow
        self.live = dict(live or {})
        self.on_live = on_live
        self.keep_best = keep_best
        self.eval_window = eval_window if apply_at is Boundary.EVAL else 0
        self._objective = Objective.parse(objective)  # a bad objective fails here, not mid-run
        self.best: BestState | None = None
        self.client: ManagerClient | None = None
        self.writer: MlflowWriter | None = None
        self.stop_requested = False
        self._lr_schedule: Schedule | None = None
        self._noise_sigmas: list[tuple[ActionNoise, np.ndarray]] = []
        self._evaluators: list[EvalCallback] = []
        self._evaluations_seen = 0
        self._last_eval: tuple[int, int] | None = None  # (env step, rollout ends since)

    # ---- SB3 hooks ----------------------------------------------------------------------

    def _on_training_start(self) -> None:
        # Each learn() call connects afresh; the previous call closed its client and writer.
        self.client, self.writer, self._evaluators = None, None, []
        self.stop_requested = False
        self._last_eval = None
        run_id, uri = resolve_mlflow_run(self.run_id, self.tracking_uri)
        if run_id is None:
            log.warning(
                "atm: no MLflow run found (start one with mlflow.start_run() or set "
                "MLFLOW_RUN_ID); training continues unmanaged"
            )
            return
        try:
            if self.log_to_mlflow:
                self.writer = ensure_mlflow_logging(self.model, run_id=run_id, tracking_uri=uri)
            self.client = ManagerClient(
                run_id,
                self._spec(),
                tracking_uri=uri,
                objective=self.objective,
                poll_interval=self.poll_interval,
            ).start()
        except Exception as exc:  # the manager must never stop training from starting
            log.warning("atm: cannot manage this run (%s); training continues unmanaged", exc)
            return
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
                self._apply_pending(Boundary.EVAL)  # the last evaluation's boundary, still open
                return
        self._apply_pending(Boundary.ROLLOUT)

    def _on_training_end(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.writer is not None:
            self.writer.close()

    def on_evaluation(self, metrics: Mapping[str, float] | None = None) -> ParamsVersion | None:
        """Apply a staged update as at an evaluation boundary; returns it when applied.

        Called automatically after an ``EvalCallback`` of the same ``learn()`` evaluates; call
        it from a script's own evaluation code otherwise, with the evaluation's ``metrics``
        (the objective's value among them) so that the best state can be kept.
        """
        value = (metrics or {}).get(self._objective.metric)
        if value is None and self._objective.metric == "eval/mean_reward" and self._evaluators:
            value = self._evaluators[0].last_mean_reward
        if self.best is not None and value is not None:
            self.best.offer(float(value), self.model.num_timesteps, self.model.policy, self._opt())
        self._last_eval = (self.model.num_timesteps, 0)
        return self._apply_pending(Boundary.EVAL)

    def _opt(self) -> torch.optim.Optimizer | None:
        return getattr(self.model.policy, "optimizer", None)

    # ---- knobs --------------------------------------------------------------------------

    def _spec(self) -> RunSpec:
        values = discover_values(self.model)
        self._lr_schedule = self.model.lr_schedule
        noises = exploration_noises(getattr(self.model, "action_noise", None))
        self._noise_sigmas = [(n, np.array(n._sigma, dtype=float)) for n in noises]
        user = self.bounds or {}
        knobs: list[KnobSpec] = [
            derive_knob(
                name,
                value,
                apply_at=self.apply_at,
                overrides={name: {**default_bounds(name, value), **user.get(name, {})}},
                type_="int" if name == "n_epochs" else "float",
            )
            for name, value in values.items()
        ]
        knobs += [
            derive_knob(name, value, apply_at=self.apply_at, overrides=user)
            for name, value in self.live.items()
        ]
        commands = [Command.STOP, Command.CHECKPOINT]
        self.best = None
        if BestState.worth_keeping(self.model.policy, self.keep_best):
            self.best = BestState(self._objective.better)
            commands.append(Command.ROLLBACK_TO_BEST)
        return RunSpec(
            framework="stable-baselines3",
            knobs=knobs,
            commands=commands,
            apply_at=self.apply_at,
        )

    def _apply_pending(self, boundary: Boundary) -> ParamsVersion | None:
        if self.client is None:
            return None
        # The values take effect from the next train(), after this many env steps.
        return self.client.apply_pending(boundary, self.model.num_timesteps, self._apply)

    def _apply(self, changed: dict[str, float], commands: list[Command]) -> None:
        assert self.client is not None
        model: Any = self.model
        start = self.client.spec.knob_values
        # First, so that a failed save rejects the version before anything has changed.
        if Command.CHECKPOINT in commands:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            path = self.checkpoint_dir / f"checkpoint-{model.num_timesteps}.zip"
            model.save(path)
            log.info("atm: saved checkpoint %s", path)
        # Before the knobs: the restored optimizer keeps its current hyperparameters, which the
        # new values below then change.
        if Command.ROLLBACK_TO_BEST in commands:
            if self.best is None:
                raise RuntimeError("rollback_to_best is not enabled for this run")
            step = self.best.restore(model.policy, self._opt())
            log.info("atm: rolled back to the best evaluation, at env step %d", step)
        live = {k: v for k, v in changed.items() if k in self.live}
        if live:
            if self.on_live is not None:
                self.on_live(live)
            self.live.update(live)
        for name, value in changed.items():
            if name == "learning_rate":
                assert self._lr_schedule is not None
                # learn() reads lr_schedule; load() rebuilds lr_schedule from learning_rate.
                model.learning_rate = scaled_schedule(self._lr_schedule, value / start[name])
                model.lr_schedule = FloatSchedule(model.learning_rate)
            elif name == "ent_coef":
                model.ent_coef = value
                if hasattr(model, "ent_coef_tensor"):  # SAC with a fixed coefficient
                    model.ent_coef_tensor = torch.tensor(value, device=model.device)
            elif name == "clip_range":
                model.clip_range = FloatSchedule(ConstantSchedule(value))
            elif name == "n_epochs":
                model.n_epochs = round(value)
            elif name == "action_noise_sigma":
                for noise, sigma in self._noise_sigmas:
                    noise._sigma = sigma * (value / start[name])  # type: ignore[attr-defined]
            elif name in ("vf_coef", "target_kl"):
                setattr(model, name, value)
        if Command.STOP in commands:
            self.stop_requested = True

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


# ---- SB3's metrics to MLflow --------------------------------------------------------------

_Dump = tuple[int, int, dict[str, float]]  # step, timestamp in ms, values


def scalar_metrics(
    key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]]
) -> dict[str, float]:
    """The numeric values of one SB3 dump, without keys excluded for ``"mlflow"``."""
    return {
        key: float(value)
        for key, value in key_values.items()
        if isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and "mlflow" not in key_excluded.get(key, ())
    }


class MlflowWriter(KVWriter):
    """An SB3 logger output that sends each dump to an MLflow run, step = ``num_timesteps``.

    ``write`` runs on the training thread and only queues; one daemon thread sends the batches
    in order, so a slow or unreachable tracker delays the metrics, never training. Failures are
    logged once; when ``max_pending`` dumps are waiting, newer ones are dropped.
    """

    def __init__(
        self, run_id: str, tracking_uri: str | None = None, *, max_pending: int = 1000
    ) -> None:
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)
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
                self._thread = threading.Thread(target=self._send, name="atm-sb3-mlflow")
                self._thread.daemon = True
                self._thread.start()
            self._queue.put_nowait((step, int(time.time() * 1000), values))
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
            step, timestamp, values = item
            metrics = [Metric(k, v, timestamp, step) for k, v in values.items()]
            try:
                self._client.log_batch(self.run_id, metrics=metrics)
            except Exception as exc:
                self._warn_once(f"cannot log SB3 metrics to MLflow run {self.run_id}: {exc}")

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("atm: %s (further failures are not reported)", message)


def ensure_mlflow_logging(
    model: BaseAlgorithm, *, run_id: str | None = None, tracking_uri: str | None = None
) -> MlflowWriter:
    """Add an ``MlflowWriter`` to ``model``'s logger unless it has one; returns the writer.

    ``learn()`` replaces a logger not set with ``model.set_logger``, so call this once training
    has started (the callback does, with ``log_to_mlflow=True``) or after ``set_logger``.
    """
    try:
        formats = model.logger.output_formats
    except AttributeError:
        raise ValueError(
            "the model has no logger yet: call ensure_mlflow_logging from a callback once "
            "learn() has started, or after model.set_logger(...)"
        ) from None
    existing = next((f for f in formats if isinstance(f, MlflowWriter)), None)
    if existing is not None:
        return existing
    run_id, tracking_uri = resolve_mlflow_run(run_id, tracking_uri)
    if run_id is None:
        raise ValueError("no MLflow run to log to: start one with mlflow.start_run() first")
    writer = MlflowWriter(run_id, tracking_uri)
    formats.append(writer)
    return writer
