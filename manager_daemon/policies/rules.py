"""The rules policy: the explainable controller a careful engineer would write.

In order of urgency, the first that fires:

- divergence (non-finite values; or a train loss that rose in a way that matters for this loss:
  spikes, or a recent mean well above its best that gives back a good share of what it had
  gained, or a peak above its untrained first value; with the objective worse than its best
  once it has been measured twice) → cut the learning rate hard and clip gradients harder;
- violent updates (PPO's approximate KL far above an ordinary size) → lower the learning rate;
- nothing learned (an objective still at its first value after a few evaluations; for a loss,
  one still at its best but barely below its first value) → raise the learning rate, the
  entropy coefficient and the reward weights that pull towards the goal;
- nothing more plausible (no improvement long after several interventions, or the knobs a
  diagnosis needs are at their bounds) → stop, back at the best state when the run is not
  there;
- timid updates (PPO's approximate KL far below its target while the objective stalls) → raise
  the learning rate, epochs, clip range and target KL;
- unsafe exploration (the collision or cost rate of evaluations above a limit, or that of
  training episodes above a limit after climbing back up: a random policy collides too) → lower
  the entropy coefficient, learning rate and clip range, raise the collision penalty;
- entropy collapse (the policy's entropy a small share of its highest while the objective is
  not holding a best) → raise the entropy coefficient;
- overfitting (objective short of its best while the train/eval gap widens) → lower the
  learning rate and raise weight decay and dropout, and roll back to the best state when the
  menu offers it (after a sustained regression);
- slow progress (a maximised objective improving, but too slowly to reach the target the run
  names) → raise the learning rate;
- plateau (the objective short of its best for a while) → lower the learning rate.

Healthy runs are left alone: an evaluation within a small share of the objective's scale of
its best is a run holding its best, not one that stalled, and every baseline the train loss is
compared with is measured from the last intervention on (a rollback also restarts the count of
evaluations without progress). The thresholds are the fields of ``RulesConfig``, tuned on the
supervisor benchmark (``train_scripts/bench_supervisor.py``).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from integrations.knobs import Knob
from integrations.protocol import Command, Proposal, Source
from manager_daemon.policies.base import PolicyAnswer
from manager_daemon.telemetry import (
    APPROX_KL_KEYS,
    ENTROPY_LOSS_KEYS,
    RECENT_EVALS,
    SAFETY_KEYS,
    Snapshot,
)
from manager_daemon.validation import Menu


class RulesConfig(BaseModel):
    """Named thresholds of the rules policy."""

    stall_margin: float = Field(
        0.03,
        ge=0,
        description="an evaluation short of the best by no more than this share of the "
        "objective's scale (its gain from the first evaluation to the best, or the best's "
        "magnitude where that is less) is no lack of progress",
    )
    overfit_patience: int = Field(
        2, ge=1, le=RECENT_EVALS, description="evaluations short of the best"
    )
    overfit_min_gap: float = Field(0.02, ge=0, description="relative eval-train gap")
    plateau_patience: int = Field(
        4, ge=1, le=RECENT_EVALS, description="evaluations short of the best"
    )
    diverge_ratio: float = Field(1.5, gt=1, description="recent / best train-loss mean")
    diverge_min_share: float = Field(
        0.25,
        ge=0,
        description="a diverging train loss gives back at least this share of what it gained "
        "from its starting level to its best (a rise that matters for this loss)",
    )
    spike_count: int = Field(3, ge=1, description="loss spikes in the recent window")
    lr_cut: float = Field(0.5, gt=0, lt=1, description="lr factor for overfitting/plateau")
    lr_cut_diverge: float = Field(0.25, gt=0, lt=1, description="lr factor on divergence")
    clip_cut: float = Field(0.5, gt=0, lt=1, description="max_grad_norm factor on divergence")
    weight_decay_step: float = Field(0.05, gt=0, description="added to weight decay")
    dropout_step: float = Field(0.05, gt=0, description="added to dropout")
    unsafe_rate: float = Field(0.15, ge=0, description="evaluated collision/cost rate, unsafe")
    unsafe_training_rate: float = Field(
        0.3, ge=0, description="collision rate of training episodes that is unsafe…"
    )
    unsafe_training_rise: float = Field(
        0.2, ge=0, description="…once it has climbed this far above its lowest"
    )
    penalty_knob: str = Field("collision_penalty", description="raised on unsafe exploration")
    timid_kl_share: float = Field(0.2, gt=0, description="approx_kl below this share of target")
    timid_kl: float = Field(0.001, gt=0, description="approx_kl below this is timid in any case")
    timid_patience: int = Field(
        2, ge=1, le=RECENT_EVALS, description="evaluations short of the best"
    )
    timid_lr_factor: float = Field(
        4.0, gt=1, description="lr factor for timid updates (PPO's target_kl still caps a step)"
    )
    violent_kl: float = Field(0.05, gt=0, description="approx_kl above this is violent")
    violent_kl_share: float = Field(
        3.0, gt=1, description="…or above this many times the run's target_kl, if higher"
    )
    collapse_share: float = Field(
        0.2, gt=0, lt=1, description="a policy's entropy below this share of its highest"
    )
    floor_margin: float = Field(
        0.05, ge=0, description="a maximised objective no further than this above its first value"
    )
    floor_patience: int = Field(3, ge=1, description="evaluations stuck at the floor")
    explore_knobs: list[str] = Field(
        default_factory=lambda: ["progress_scale", "success_bonus"],
        description="reward weights raised when nothing is learned (as the script names them)",
    )
    progress_target: float | None = Field(
        None,
        description="what good is for a maximised objective (a success rate of 0.9, say): "
        "slow, steady progress below it gets a bolder learning rate (unset: no such rule)",
    )
    crawl_window: int = Field(
        4, ge=1, le=RECENT_EVALS - 1, description="evaluations over which progress is measured"
    )
    crawl_gain: float = Field(
        0.1, gt=0, description="progress slower than this share of the target over the window"
    )
    crawl_lr_factor: float = Field(2.0, gt=1, description="lr factor for slow progress")
    stop_patience: int = Field(
        6, ge=1, le=RECENT_EVALS, description="evaluations short of the best, to stop"
    )
    stop_after_interventions: int = Field(2, ge=0, description="interventions tried first")


class RulesPolicy:
    """Deterministic, explainable decisions from the snapshot and the menu."""

    name = "rules"
    source = Source.RULES
    fallback = None  # the rules answer at once: never too late

    def __init__(self, config: RulesConfig | None = None) -> None:
        self.config = config or RulesConfig()

    def propose(self, snapshot: Snapshot, menu: Menu) -> PolicyAnswer:
        return PolicyAnswer(proposal=self.decide(snapshot, menu))

    def decide(self, snap: Snapshot, menu: Menu) -> Proposal:
        """The first rule that fires, in order of urgency; no action when none does."""
        rules = (
            self._on_divergence,
            self._on_violent_updates,
            # Before stopping: a run that has learned nothing yet may need bolder settings.
            self._on_nothing_learned,
            self._on_nothing_more,
            self._on_timid_updates,
            self._on_unsafe_exploration,
            self._on_entropy_collapse,
            self._on_overfitting,
            self._on_slow_progress,
            self._on_plateau,
        )
        for rule in rules:
            if (proposal := rule(snap, menu)) is not None:
                return proposal
        return Proposal(action="no_action", reason="no rule fired")

    def _on_divergence(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        if (why := self._diverging(snap)) is None:
            return None
        cfg = self.config
        changes = _scaled(menu, Knob.LEARNING_RATE, cfg.lr_cut_diverge) | _scaled(
            menu, Knob.MAX_GRAD_NORM, cfg.clip_cut
        )
        return _proposal(
            changes, f"divergence: {why}", "loss returns to its trend", _rollback(menu)
        )

    def _on_violent_updates(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        if (kl := self._violent(snap)) is None:
            return None
        return _proposal(
            _scaled(menu, Knob.LEARNING_RATE, self.config.lr_cut),
            f"violent updates: approx_kl {kl[0]:.2g} above {kl[1]:.2g}",
            "approx_kl falls to an ordinary size",
        )

    def _on_nothing_learned(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        obj = snap.objective
        if not self._at_floor(snap) or not (explore := self._explore(menu)):
            return None
        why = f"nothing learned: {obj.metric} at {_g(obj.best)} after {obj.evaluations} "
        why += f"evaluations, {_g(obj.first)} at the first"
        if (timid := self._timid(snap)) is not None:
            explore |= self._bolder(menu)
            why += f"; timid updates: approx_kl {timid[0]:.2g} below {timid[1]:.2g}"
        return _proposal(explore, why, f"{obj.metric} leaves its floor")

    def _on_nothing_more(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        if not self._should_stop(snap, menu):
            return None
        obj, back = snap.objective, _rollback(menu)
        return Proposal(
            action="command",
            commands=[Command.STOP.value, *back],
            reason=f"no improvement of {obj.metric} for {self._stale(snap)} evaluations after "
            f"{len(snap.interventions)} interventions; best {_g(obj.best)} at step {obj.best_step}"
            + ("; back to the best state" if back else ""),
            expected_effect="training ends at the best objective",
        )

    def _on_timid_updates(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        if (kl := self._timid(snap)) is None:
            return None
        obj = snap.objective
        return _proposal(
            self._bolder(menu),
            f"timid updates: approx_kl {kl[0]:.2g} below {kl[1]:.2g} while {obj.metric} has "
            f"not improved for {self._stale(snap)} evaluations (best {_g(obj.best)})",
            f"{obj.metric} starts improving",
        )

    def _on_unsafe_exploration(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        if (unsafe := self._unsafe(snap)) is None:
            return None
        changes = (
            _scaled(menu, Knob.ENT_COEF, 0.5)
            | _scaled(menu, Knob.LEARNING_RATE, 0.5)
            | _scaled(menu, Knob.CLIP_RANGE, 0.7)
            | _scaled(menu, self.config.penalty_knob, 2.0)
        )
        return _proposal(
            changes,
            f"unsafe exploration: {unsafe[0]} {unsafe[1]:.2f} above its limit",
            f"{unsafe[0]} falls",
            _rollback(menu),
        )

    def _on_entropy_collapse(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        if (entropy := self._collapsed(snap)) is None:
            return None
        obj = snap.objective
        changes = _raised(menu, Knob.ENT_COEF, 2.0)
        treated = any(Knob.ENT_COEF in i.changes for i in snap.interventions)
        if not treated and float(snap.knobs.get(Knob.ENT_COEF, {}).get("value", 0.0)) >= 0:
            # A coefficient that was not pulling the entropy down leaves the lr to blame, once.
            changes |= _scaled(menu, Knob.LEARNING_RATE, self.config.lr_cut)
        return _proposal(
            changes,
            f"entropy collapse: the policy's entropy fell to {entropy[0]:.2g} from "
            f"{entropy[1]:.2g} with {obj.metric} at {_g(obj.last)} (best {_g(obj.best)})",
            "the policy's entropy recovers",
        )

    def _on_overfitting(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        cfg, obj, gap, stale = self.config, snap.objective, snap.gap, self._stale(snap)
        if not (
            stale >= cfg.overfit_patience
            and gap.relative is not None
            and gap.relative > cfg.overfit_min_gap
            and (gap.trend or 0) > 0
        ):
            return None
        changes = (
            _scaled(menu, Knob.LEARNING_RATE, cfg.lr_cut)
            | _added(menu, Knob.WEIGHT_DECAY, cfg.weight_decay_step)
            | _added(menu, Knob.DROPOUT, cfg.dropout_step)
        )
        return _proposal(
            changes,
            f"overfitting: {obj.metric} not improved for {stale} evaluations (best "
            f"{_g(obj.best)}, last {_g(obj.last)}) while the eval-train gap widens to "
            f"{_gap(gap.last, gap.relative)}",
            f"{obj.metric} stops rising; the gap narrows",
            _rollback(menu),
        )

    def _on_slow_progress(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        cfg, obj = self.config, snap.objective
        if (gain := self._crawl(snap)) is None or not _can_raise(menu, Knob.LEARNING_RATE):
            return None
        return _proposal(
            _scaled(menu, Knob.LEARNING_RATE, cfg.crawl_lr_factor),
            f"slow progress: {obj.metric} rose {gain:.3g} over the last {cfg.crawl_window} "
            f"evaluations, to {_g(obj.last)}, far below {cfg.progress_target:g}",
            f"{obj.metric} rises faster",
        )

    def _on_plateau(self, snap: Snapshot, menu: Menu) -> Proposal | None:
        obj, stale = snap.objective, self._stale(snap, since_change=True)
        if stale < self.config.plateau_patience:
            return None
        return _proposal(
            _scaled(menu, Knob.LEARNING_RATE, self.config.lr_cut),
            f"plateau: {obj.metric} not improved for {stale} evaluations (best {_g(obj.best)})",
            f"{obj.metric} improves again",
        )

    def _diverging(self, snap: Snapshot) -> str | None:
        """Why the run is diverging, or None.

        Non-finite values always are. Otherwise the train loss must have risen in a way that
        matters for this loss: ``spike_count`` spikes, or a recent mean ``diverge_ratio``
        times its best mean, each rising by at least ``diverge_min_share`` of what the loss
        had gained from its starting level to that best (a loss of 1e-9 after one of 1e-15
        has given nothing back); or a peak ``diverge_ratio`` times the loss's first value
        (worse than untrained). And the objective, once measured twice, worse than its best
        too. Best, peak and spikes count from the last intervention on: the losses before it
        were made with other settings, or with weights a rollback replaced.
        """
        cfg, obj, train = self.config, snap.objective, snap.train
        if snap.non_finite:
            return "non-finite metric values"
        # The train loss says "diverging" only where the objective is a loss too: an RL loss
        # (PPO's value loss, say) rises and jumps as returns grow.
        if obj.direction != "minimize" or "loss" not in obj.metric:
            return None
        if obj.evaluations > 1 and obj.evals_since_best == 0:
            return None  # the objective is at its best: the train loss does it no harm
        if train.recent_mean is None or train.best_mean is None:
            return None
        floor = cfg.diverge_min_share * max(0.0, (train.start or 0.0) - train.best_mean)
        # A snapshot recorded before spike heights were measured counts its spikes as tall.
        height = math.inf if train.spike_rise is None else train.spike_rise
        if train.spikes >= cfg.spike_count and height > floor:
            tall = f" of {_g(train.spike_rise)}" if train.spike_rise is not None else ""
            return f"{train.spikes} loss spikes{tall}"
        rise = train.recent_mean - train.best_mean
        if train.recent_mean > cfg.diverge_ratio * train.best_mean and rise > floor:
            started = f" (it started at {_g(train.start)})" if train.start is not None else ""
            return (
                f"train loss {_g(train.recent_mean)}, up from its best {_g(train.best_mean)}"
                + started
            )
        first, peak = train.first, train.peak
        if first is not None and peak is not None and 0 < first * cfg.diverge_ratio < peak:
            return f"train loss rose to {_g(peak)}, {peak / first:.3g} times its first {_g(first)}"
        return None

    def _stale(self, snap: Snapshot, *, since_change: bool = False) -> int:
        """The latest evaluations, in a row, that fell short of the best by more than
        ``stall_margin`` of the objective's scale (what it gained from its first evaluation to
        its best, or the best's magnitude where that is less): evaluations within that of the
        best are a run holding its best (a converged run, a
        return at its maximum), not a run that stopped improving; where nothing was gained,
        every evaluation after the best counts. Counted from the last rollback on, which
        returns the run to its best state; or, ``since_change``, from the last intervention
        on, so that a change gets its evaluations to show its effect (a plateau does not halve
        the learning rate at every evaluation)."""
        obj = snap.objective
        if obj.best is None:
            return 0
        since = snap.rolled_back_at
        if since_change and snap.interventions:
            since = snap.interventions[-1].step
        if obj.first is None:
            # The run began before the daemon first read it: its gain is unknown, its best's
            # magnitude is the scale.
            gained, margin = None, self.config.stall_margin * abs(obj.best)
        else:
            gained = abs(obj.first - obj.best)
            margin = self.config.stall_margin * min(gained, abs(obj.best))
        sign = 1.0 if obj.direction == "minimize" else -1.0
        count = 0
        for step, value in reversed(obj.recent):
            # Nothing gained: every evaluation after the best is one without progress.
            short = not math.isfinite(value) or gained == 0 or sign * (value - obj.best) > margin
            if not short or (since is not None and step <= since) or step <= (obj.best_step or -1):
                break
            count += 1
        return count

    def _unsafe(self, snap: Snapshot) -> tuple[str, float] | None:
        """The safety signal and its value when the run explores unsafely."""
        cfg = self.config
        for key in SAFETY_KEYS:
            value = snap.signals.get(key)
            if value is None:
                continue
            if key.startswith("eval/"):
                if value > cfg.unsafe_rate:
                    return key, value
            elif value > cfg.unsafe_training_rate and (
                snap.signal_rise.get(key, 0.0) >= cfg.unsafe_training_rise
            ):
                return key, value
        return None

    def _bolder(self, menu: Menu) -> dict[str, float]:
        return (
            _scaled(menu, Knob.LEARNING_RATE, self.config.timid_lr_factor)
            | _scaled(menu, Knob.N_EPOCHS, 2.0)
            | _scaled(menu, Knob.CLIP_RANGE, 1.5)
            | _scaled(menu, Knob.TARGET_KL, 2.0)
        )

    def _explore(self, menu: Menu) -> dict[str, float]:
        changes = _scaled(menu, Knob.LEARNING_RATE, 2.0) | _raised(menu, Knob.ENT_COEF, 2.0)
        for name in self.config.explore_knobs:
            changes |= _scaled(menu, name, 2.0)
        return changes

    def _crawl(self, snap: Snapshot) -> float | None:
        """How little a maximised objective gained over the last evaluations, when it keeps
        improving too slowly to reach its target, and the last change has had time to act."""
        cfg, obj = self.config, snap.objective
        target = cfg.progress_target
        if target is None or obj.direction != "maximize" or obj.last is None:
            return None
        recent = [v for _, v in obj.recent]
        if obj.last >= target or len(recent) <= cfg.crawl_window:
            return None
        # Counted from the objective's recent evaluations: an intervention's own outcome stops
        # counting after the few evaluations that measure it.
        if snap.interventions:
            changed = snap.interventions[-1].step
            if sum(1 for step, _ in obj.recent if step > changed) < cfg.crawl_window:
                return None
        gain = recent[-1] - recent[-1 - cfg.crawl_window]
        return gain if 0 <= gain < cfg.crawl_gain * target else None

    def _at_floor(self, snap: Snapshot) -> bool:
        """An objective that has not moved off its first value for a while: every evaluation
        within ``floor_margin`` of the first (a success rate still at zero); a minimised one
        also still at its best (a loss creeping down: a learning rate far too low)."""
        obj = snap.objective
        if obj.best is None or obj.first is None or obj.evaluations < self.config.floor_patience:
            return False
        if obj.direction == "minimize" and obj.evals_since_best > 0:
            return False  # a loss that fell fast at first and then rose again learned plenty
        # A loss on its own scale; a rate (a success rate at zero, say) on one of at least 1.
        scale = abs(obj.first) if obj.direction == "minimize" else max(abs(obj.first), 1.0)
        margin = self.config.floor_margin * scale
        values = [obj.best, *(v for _, v in obj.recent)]
        return all(abs(v - obj.first) <= margin for v in values)

    def _violent(self, snap: Snapshot) -> tuple[float, float] | None:
        """PPO's approx_kl and its limit, when each update moves the policy far (above
        ``violent_kl``, or ``violent_kl_share`` times the run's target_kl where that is higher)
        and the objective, once measured twice, is worse than its best."""
        cfg, obj = self.config, snap.objective
        if obj.evaluations > 1 and obj.evals_since_best == 0:
            return None  # the objective is at its best: the updates do it no harm
        kl = next((snap.signals[k] for k in APPROX_KL_KEYS if k in snap.signals), None)
        target = snap.knobs.get(Knob.TARGET_KL, {}).get("value")
        limit = max(cfg.violent_kl, cfg.violent_kl_share * float(target or 0.0))
        return (kl, limit) if kl is not None and kl > limit else None

    def _collapsed(self, snap: Snapshot) -> tuple[float, float] | None:
        """The policy's entropy and its highest, when it fell below ``collapse_share`` of that
        highest while the objective is not holding a best (a converged policy may well be
        near-deterministic)."""
        key = next((k for k in ENTROPY_LOSS_KEYS if k in snap.signals), None)
        obj = snap.objective
        if key is None or key not in snap.signal_rise or obj.best is None:
            return None
        if obj.evals_since_best > 0 and self._stale(snap) == 0:
            return None  # holding its best
        entropy = -snap.signals[key]
        highest = entropy + snap.signal_rise[key]
        return (entropy, highest) if entropy < self.config.collapse_share * highest else None

    def _timid(self, snap: Snapshot) -> tuple[float, float] | None:
        """PPO's approx_kl and the limit it is under, when updates are too small to learn."""
        cfg = self.config
        if self._stale(snap) < cfg.timid_patience:
            return None
        kl = next((snap.signals[k] for k in APPROX_KL_KEYS if k in snap.signals), None)
        target = snap.knobs.get(Knob.TARGET_KL, {}).get("value")
        limit = min(cfg.timid_kl_share * float(target), cfg.timid_kl) if target else cfg.timid_kl
        return (kl, limit) if kl is not None and kl < limit else None

    def _should_stop(self, snap: Snapshot, menu: Menu) -> bool:
        cfg = self.config
        if Command.STOP not in menu.commands or self._stale(snap) < cfg.stop_patience:
            return False
        tried = len(snap.interventions) >= cfg.stop_after_interventions
        exhausted = not any(
            k in menu.knobs for k in (Knob.LEARNING_RATE, Knob.WEIGHT_DECAY, Knob.DROPOUT)
        )
        return tried or exhausted


# Symptoms that cannot wait for a model's answer: a policy that consults a model lets the rules
# act on them at once. The rules' reasons begin with the symptom's name.
ACUTE_SYMPTOMS = ("divergence", "unsafe exploration")


def is_acute(proposal: Proposal) -> bool:
    """Whether ``proposal`` is the rules' remedy for an acute symptom."""
    return proposal.action != "no_action" and proposal.reason.startswith(ACUTE_SYMPTOMS)


def _scaled(menu: Menu, knob: str, factor: float) -> dict[str, float]:
    item = menu.knobs.get(knob)
    if item is None:
        return {}
    return _moved(knob, item.current, min(max(item.current * factor, item.low), item.high))


def _moved(knob: str, current: float, value: float) -> dict[str, float]:
    """``{knob: value}``, or nothing where the knob is already there (at a bound, say): a
    change that changes nothing is no remedy."""
    return {} if math.isclose(value, current, rel_tol=1e-9, abs_tol=1e-15) else {knob: value}


def _raised(menu: Menu, knob: str, factor: float) -> dict[str, float]:
    """``knob`` times ``factor`` where it is positive; otherwise (an entropy coefficient of
    zero, or of the wrong sign) as far up as one change may go."""
    item = menu.knobs.get(knob)
    if item is None:
        return {}
    if item.current > 0:
        return _scaled(menu, knob, factor)
    return _moved(knob, item.current, item.high)


def _can_raise(menu: Menu, knob: str) -> bool:
    item = menu.knobs.get(knob)
    return item is not None and item.current < item.high


def _added(menu: Menu, knob: str, delta: float) -> dict[str, float]:
    item = menu.knobs.get(knob)
    if item is None:
        return {}
    return _moved(knob, item.current, min(max(item.current + delta, item.low), item.high))


def _rollback(menu: Menu) -> list[str]:
    return [Command.ROLLBACK_TO_BEST.value] if Command.ROLLBACK_TO_BEST in menu.commands else []


def _proposal(
    changes: dict[str, float], reason: str, expected: str, commands: list[str] | None = None
) -> Proposal:
    commands = commands or []
    if commands:
        reason += "; back to the best state"
    if not changes and not commands:
        return Proposal(action="no_action", reason=f"{reason}; but no knob for it is available now")
    return Proposal(
        action="adjust" if changes else "command",
        changes=changes,
        commands=commands,
        reason=reason,
        expected_effect=expected,
    )


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"


def _gap(gap: float | None, relative: float | None) -> str:
    """The eval-train gap, with its share of the train loss while that share reads as one
    (over a train loss near zero it would be a number of many digits)."""
    if relative is None or abs(relative) > 10:
        return _g(gap)
    return f"{_g(gap)} ({relative:.0%} of the train loss)"
