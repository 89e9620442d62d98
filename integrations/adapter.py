"""What every framework integration shares, written once.

A framework integration (transformers, stable-baselines3, a plain torch loop) is a
``ManagedTraining``: it says which knobs its framework has and how to read and write them (a
table of ``KnobRow``, so a new knob is one row), where the model and optimizer are, and how to
save a checkpoint and stop. Everything else is here: the objective, finding the run the script
logs to, the knob spec, a client start-up that can never stop training, keeping the best state,
applying a version in a fixed order (checkpoint, rollback, knobs, stop) on the training
thread at the framework's boundaries, and, under several ranks, rank 0 deciding for all of
them (``integrations.ranks``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from integrations import session
from integrations.client import ManagerClient, ParamsApplier
from integrations.knobs import BoundsOverrides, BoundsRefused, derive_knobs, parse_bounds
from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    Boundary,
    Command,
    Health,
    HealthState,
    Objective,
    ParamsVersion,
    RunSpec,
)
from integrations.ranks import RanksUnreachable, RankSync, distributed_rank
from integrations.settings import ClientSettings
from integrations.torch_ops import BestState
from integrations.trackers import bind_run, run_sought

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnobRow:
    """One knob of a framework: how to read its starting value and how to set a new one.

    ``read(integration)`` returns None when this run does not have the knob;
    ``write(integration, new)`` sets it (``integration.value(name)`` is still the value in
    force while it runs).
    """

    name: str
    read: Callable[[Any], float | None]
    write: Callable[[Any, float], None]


class ManagedTraining:
    """The shared part of a framework integration; subclasses fill in the hooks below.

    Nothing here raises into training: a failed start-up leaves the run unmanaged, and a
    version that fails to apply is reported as rejected while the previous values stay.
    """

    framework: ClassVar[str]
    boundaries: ClassVar[tuple[Boundary, ...]]
    knob_table: ClassVar[Sequence[KnobRow]]

    def _init_manager(
        self,
        *,
        run_id: str | None,
        tracking_uri: str | None,
        objective: str,
        poll_interval: float | None,
        apply_at: Boundary | str,
        bounds: BoundsOverrides | None,
        keep_best: bool | None,
        live: Mapping[str, float] | None = None,
        on_live: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        apply_at = Boundary(apply_at)
        if apply_at not in self.boundaries:
            allowed = " or ".join(b.value for b in self.boundaries)
            raise ValueError(
                f"{self.framework} applies updates at {allowed}, not at {apply_at.value}"
            )
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.objective = objective or DEFAULT_OBJECTIVE
        self._objective = Objective.parse(self.objective)  # a bad objective fails here
        self.poll_interval = poll_interval
        self.apply_at = apply_at
        self.bounds = parse_bounds(bounds)  # bad bounds fail here too
        self.keep_best = keep_best
        self.live = dict(live or {})
        self.on_live = on_live
        # Rank 0 (or a single process): a ManagerClient; another rank: a ParamsApplier.
        self.client: ParamsApplier | None = None
        self.ranks: RankSync | None = None
        self.best: BestState | None = None
        self.stop_requested = False
        # The step of the latest boundary: where the script's step-less points are recorded.
        self.training_step: int | None = None
        self._stop_following_steps: Callable[[], None] | None = None
        self._said: set[str] = set()  # what this integration has told the user

    # ---- hooks a framework fills in -----------------------------------------------------

    def _model(self) -> Any:
        """The torch module whose weights a rollback restores (None: no rollback)."""
        return None

    def _optimizer(self) -> Any:
        """The optimizer whose moments a rollback restores."""
        return None

    def _commands(self) -> list[Command]:
        """The commands this integration carries out (rollback is added when it can)."""
        return [Command.STOP]

    def _save_checkpoint(self) -> None:
        raise RuntimeError(f"{self.framework} cannot save a checkpoint here")

    def _request_stop(self) -> None:
        self.stop_requested = True

    def _unbound_fix(self) -> str:
        """What a user does so that this framework's process logs to a run the manager finds."""
        return "start a run before training (mlflow.start_run() or wandb.init())"

    # ---- shared -------------------------------------------------------------------------

    def start_managing(self) -> bool:
        """Find the run, publish the knobs, start polling; True when managed. Never raises.

        Under several ranks, a rank other than 0 never looks for the run: it follows rank 0.
        """
        self.client, self.stop_requested = None, False
        try:
            settings = ClientSettings()
            ranks = self.join_ranks()
            if ranks is not None and not ranks.leads:
                self.client = ParamsApplier(self.spec())
                log.info("atm: rank %d follows rank 0's params versions", ranks.rank)
                return True
            binding = bind_run(self.run_id, self.tracking_uri)
            if binding is None:
                self.say_unbound()
                return False
            self.client = ManagerClient(
                binding.run_id,
                self.spec(),
                tracker=binding.tracker,
                objective=self.objective,
                poll_interval=self.poll_interval or settings.poll_interval_for(binding),
                signing_key=settings.key(),
                objective_grace=settings.objective_grace,
            ).start()
            if binding.follow_steps is not None:
                self._stop_following_steps = binding.follow_steps(lambda: self.training_step)
        except BoundsRefused as exc:
            health = Health(state=HealthState.BOUNDS_REFUSED, reason=str(exc))
            log.warning(
                "atm: %s; the run is not managed (training goes on): fix the bounds and start "
                "it again",
                health,
            )
            self.client = None
            return False
        except Exception as exc:  # the manager must never stop training from starting
            log.warning("atm: cannot manage this run (%s); training continues unmanaged", exc)
            self.client = None
            return False
        return True

    def join_ranks(self) -> RankSync | None:
        """Under several ranks, take part in the exchanges of rank 0's versions from now on.

        Every rank must join at the same point of training (``start_managing`` does).
        """
        if self.ranks is None and (world := distributed_rank()) is not None:
            settings = ClientSettings()
            self.ranks = RankSync(
                rank=world[0],
                world_size=world[1],
                apply_at=self.apply_at,
                every=settings.rank_sync_every,
                timeout_s=settings.rank_timeout,
            )
        return self.ranks

    def say_unbound(self, after: str = "", *, fix: str | None = None) -> None:
        """Tell the user, once per process and framework, that no run was found to manage.

        ``after``: how long it looked (the process then keeps looking and says when it finds
        one); ``fix``: what to do, where the framework's own advice does not fit.
        """
        # Under `atm run` each learn() or Trainer gets an integration of its own: once per process.
        current = session.current()
        said = current.said if current is not None else self._said
        if f"unbound {self.framework}" in said:
            return
        said.add(f"unbound {self.framework}")
        where = f" {after}" if after else ""
        reason = (
            f"no tracker run found for this {self.framework} process{where} (looked for "
            f"{run_sought(self.tracking_uri)})"
        )
        health = Health(state=HealthState.UNBOUND, reason=reason)
        going_on = ", still looking" if after else ""
        log.warning(
            "atm: %s; training continues unmanaged%s. To manage it, %s",
            health,
            going_on,
            fix or self._unbound_fix(),
        )

    def stop_managing(self) -> None:
        if self._stop_following_steps is not None:
            self._stop_following_steps()
            self._stop_following_steps = None
        if isinstance(self.client, ManagerClient):
            self.client.close()

    def spec(self) -> RunSpec:
        """The knobs this run has, with their bounds, and the commands it carries out.

        Raises BoundsRefused when the bounds given cannot be honoured for these knobs.
        """
        values: dict[str, float] = {}
        for row in self.knob_table:
            value = row.read(self)
            if value is not None:
                values[str(row.name)] = value
        values.update(self.live)
        knobs = derive_knobs(values, apply_at=self.apply_at, overrides=self.bounds)
        commands = self._commands()
        self.best = None
        model = self._model()
        if model is not None and BestState.worth_keeping(model, self.keep_best):
            self.best = BestState(self._objective.better)
            commands.append(Command.ROLLBACK_TO_BEST)
        return RunSpec(
            framework=self.framework, knobs=knobs, commands=commands, apply_at=self.apply_at
        )

    def value(self, name: str) -> float:
        """A knob's value in force (a live value's too, before any client)."""
        if self.client is not None:
            return self.client.value(name)
        return self.live[name]

    def offer_evaluation(self, metrics: Mapping[str, Any], step: int) -> None:
        """Keep the state of this evaluation if the objective is the best so far; the client
        says once when evaluations come without the objective (``integrations.watch``)."""
        if isinstance(self.client, ManagerClient):
            self.client.evaluated(metrics.keys())
        value = metrics.get(self._objective.metric)
        if self.best is not None and isinstance(value, int | float):
            self.best.offer(float(value), step, self._model(), self._optimizer())

    def apply_pending(self, boundary: Boundary, step: int) -> ParamsVersion | None:
        """Apply a staged version if this is its boundary; cheap when there is none."""
        self.training_step = step
        if self.ranks is not None:
            return self._apply_across_ranks(boundary, step)
        if self.client is None:
            return None
        return self.client.apply_pending(boundary, step, self._apply)

    def _apply_across_ranks(self, boundary: Boundary, step: int) -> ParamsVersion | None:
        """Every rank applies rank 0's staged version at the same exchange point."""
        ranks = self.ranks
        assert ranks is not None
        if not ranks.due(boundary, step):
            return None
        taken = None
        if ranks.leads and self.client is not None:
            taken = self.client.take_staged(boundary)
        try:
            version = ranks.exchange(taken)
        except RanksUnreachable as exc:
            log.warning(
                "atm: rank %d cannot reach the other ranks (%s); it stops applying versions, "
                "training continues",
                ranks.rank,
                exc,
            )
            self.ranks = None
            if taken is not None and self.client is not None:
                self.client.reject(taken, step, "not applied: the other ranks are unreachable")
            self.stop_managing()
            self.client = None
            return None
        if version is None or self.client is None:
            return None
        return self.client.apply_version(version, step, self._apply)

    def _apply(self, changed: dict[str, float], commands: list[Command]) -> None:
        assert self.client is not None
        # A failed save rejects the version before anything has changed.
        if Command.CHECKPOINT in commands:
            self._save_checkpoint()
        # Before the knobs: the restored optimizer keeps its current hyperparameters, which the
        # new values below then change.
        if Command.ROLLBACK_TO_BEST in commands:
            if self.best is None:
                raise RuntimeError("rollback_to_best is not enabled for this run")
            step = self.best.restore(self._model(), self._optimizer())
            log.info("atm: rolled back to the best evaluation, at step %d", step)
        rows = {row.name: row for row in self.knob_table}
        live = {name: v for name, v in changed.items() if name in self.live}
        for name, value in changed.items():
            if name in rows and name not in live:
                rows[name].write(self, value)
        if live:
            if self.on_live is not None:
                self.on_live(live)
            self.live.update(live)
        if Command.STOP in commands:
            self._request_stop()

    def start_value(self, name: str) -> float:
        """The value a knob had when the run's spec was published."""
        assert self.client is not None
        return self.client.spec.knob_values[name]
