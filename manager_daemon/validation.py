"""Validation shared by every policy and by humans, and the menu of allowed changes.

Every proposed change is checked against the run's own knob spec: known knob, numeric type,
finite, absolute range, maximum step from the current value, per-knob cooldown in steps, a
budget of automatic interventions per run, and removal of no-ops. Each change ends accepted,
clamped or rejected, with a reason; nothing outside the bounds ever leaves this module. A
policy's value outside a knob's range is clamped into it; a person's is refused (``atm set``
refuses it before anything is decided, ``refused_by_hand``), since a value someone typed is
meant as typed. Only the size of a person's step is clamped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from integrations.health import closest
from integrations.protocol import (
    Command,
    CommandVerdict,
    KnobSpec,
    KnobVerdict,
    Proposal,
    RunSpec,
    Scale,
    Source,
)

_REL_TOL = 1e-9
_LOG_FACTORS = (0.25, 0.5, 0.7, 1.4, 2.0)
_LIN_SHARES = (-0.2, -0.1, -0.05, 0.05, 0.1, 0.2)


class ValidationConfig(BaseModel):
    """Limits that apply on top of each knob's own bounds."""

    cooldown_steps: int = Field(default=50, ge=0, description="steps between two changes of a knob")
    settle_evals: int = Field(
        default=2,
        ge=0,
        description="evaluations after a change is applied before a policy may move the same "
        "knob again (0: none; a person is never held up)",
    )
    budget: int = Field(default=20, ge=0, description="automatic interventions allowed per run")
    stop_after_evals: int = Field(
        default=6, ge=0, description="evaluations without improvement before stop is offered"
    )
    rollback_after_evals: int = Field(
        default=2, ge=1, description="evaluations in a row regressed before rollback is offered"
    )
    rollback_min_regression: float = Field(
        default=0.05, ge=0, description="how far below the best counts as regressed (relative)"
    )


@dataclass
class RunState:
    """What validation needs to know about a run at decision time."""

    spec: RunSpec
    values: dict[str, float]
    step: int
    last_changed_step: dict[str, int] = field(default_factory=dict)
    interventions_used: int = 0
    evals_since_best: int = 0
    regressed_evals: int = 0
    stop_issued: bool = False
    # Knobs an earlier change has not yet shown its effect on (not applied yet, or applied
    # fewer evaluations ago than an outcome needs), with why: a policy waits for that effect
    # before it moves them again; a person need not.
    settling: dict[str, str] = field(default_factory=dict)

    def cooldown_left(self, knob: KnobSpec, config: ValidationConfig) -> int:
        cooldown = knob.cooldown_steps if knob.cooldown_steps is not None else config.cooldown_steps
        last = self.last_changed_step.get(knob.name)
        return 0 if last is None else max(0, last + cooldown - self.step)


@dataclass
class ValidationResult:
    verdicts: list[KnobVerdict]
    command_verdicts: list[CommandVerdict]
    values: dict[str, float]

    @property
    def changes(self) -> dict[str, float]:
        return {
            v.knob: v.final
            for v in self.verdicts
            if v.verdict in ("accepted", "clamped") and v.final is not None
        }

    @property
    def commands(self) -> list[Command]:
        return [Command(c.command) for c in self.command_verdicts if c.verdict == "accepted"]

    @property
    def issues_version(self) -> bool:
        return bool(self.changes or self.commands)


def validate(
    proposal: Proposal, state: RunState, config: ValidationConfig, source: Source
) -> ValidationResult:
    """Check every change and command of ``proposal``; return verdicts and the new full values."""
    budget_left = source is Source.HUMAN or state.interventions_used < config.budget
    verdicts = [
        _check_knob(name, raw, state, config, budget_left, source)
        for name, raw in proposal.changes.items()
    ]
    command_verdicts = [
        _check_command(c, state.spec, budget_left, config) for c in proposal.commands
    ]
    values = dict(state.values)
    values.update(
        {
            v.knob: v.final
            for v in verdicts
            if v.verdict in ("accepted", "clamped") and v.final is not None
        }
    )
    return ValidationResult(verdicts, command_verdicts, values)


def _check_knob(
    name: str,
    raw: object,
    state: RunState,
    config: ValidationConfig,
    budget_left: bool,
    source: Source,
) -> KnobVerdict:
    knob = state.spec.knob(name)
    current = state.values.get(name)
    verdict = KnobVerdict(knob=name, proposed=_jsonable(raw), current=current, verdict="rejected")
    if knob is None or current is None:
        verdict.reason = (
            f"unknown knob (this run exposes {', '.join(k.name for k in state.spec.knobs)})"
        )
        return verdict
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        verdict.reason = f"wrong type {type(raw).__name__}: expected a number"
        return verdict
    try:
        value = float(raw)
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if not math.isfinite(value):
        verdict.reason = f"{value} is not a finite number"
        return verdict
    if source is Source.HUMAN and (outside := _outside(knob, value)):
        verdict.reason = outside
        return verdict
    if not budget_left:
        verdict.reason = f"the run's budget of {config.budget} automatic interventions is used up"
        return verdict
    if left := state.cooldown_left(knob, config):
        last = state.last_changed_step[name]
        verdict.reason = f"inside cooldown: changed at step {last}, {left} more steps to wait"
        return verdict
    if source is not Source.HUMAN and name in state.settling:
        verdict.reason = state.settling[name]
        return verdict
    final, reasons = _clamp(knob, current, value)
    verdict.final = final
    if _same(final, current):
        verdict.verdict = "noop"
        verdict.reason = "no change after clamping" if reasons else "already the current value"
    elif reasons:
        verdict.verdict = "clamped"
        verdict.reason = "; ".join(reasons)
    else:
        verdict.verdict = "accepted"
    return verdict


def _outside(knob: KnobSpec, value: float) -> str | None:
    if knob.min <= value <= knob.max:
        return None
    return f"{knob.name}={value:g} is outside its bounds [{knob.min:g}, {knob.max:g}]"


def refused_by_hand(
    changes: dict[str, float], spec: RunSpec, commands: Sequence[str] = ()
) -> str | None:
    """Why a person's ``changes`` and ``commands`` cannot be made at all, in one line, or None:
    a knob the run does not have, a value that is not a finite number or is outside the knob's
    bounds, a command the run does not carry out."""
    for command in commands:
        if command not in {c.value for c in spec.commands}:
            offered = ", ".join(c.value for c in spec.commands) or "none"
            return f"this run does not carry out {command} (its commands: {offered})"
    for name, value in changes.items():
        knob = spec.knob(name)
        if knob is None:
            known = [k.name for k in spec.knobs]
            meant = closest(name, known)
            hint = f"did you mean {meant}?" if meant else f"its knobs: {', '.join(known)}"
            return f"{name} is not a knob of this run ({hint})"
        if not math.isfinite(value):
            return f"{name}={value} is not a finite number"
        if outside := _outside(knob, value):
            return outside
    return None


def _clamp(knob: KnobSpec, current: float, value: float) -> tuple[float, list[str]]:
    reasons = []
    if knob.type == "int" and value != round(value):
        value = float(round(value))
        reasons.append(f"rounded to the integer {value:g}")
    if not knob.min <= value <= knob.max:
        value = min(max(value, knob.min), knob.max)
        reasons.append(f"outside the range [{knob.min:g}, {knob.max:g}]")
    low, high = knob.step_limits(current)
    if not low <= value <= high:
        value = min(max(value, low), high)
        reasons.append(f"step too large: one change may move within [{low:.4g}, {high:.4g}]")
    if knob.type == "int":
        # Toward the current value, and never past the limits (which need not be integers).
        value = float(math.floor(value) if value > current else math.ceil(value))
        if not low <= value <= high:
            reasons.append(f"no integer within [{low:g}, {high:g}]")
            return current, reasons
    return value, reasons


def _check_command(
    raw: str, spec: RunSpec, budget_left: bool, config: ValidationConfig
) -> CommandVerdict:
    try:
        command = Command(raw)
    except ValueError:
        return CommandVerdict(command=str(raw), verdict="rejected", reason="unknown command")
    if command not in spec.commands:
        return CommandVerdict(
            command=command.value, verdict="rejected", reason="not supported by this run"
        )
    if not budget_left:
        reason = f"the run's budget of {config.budget} automatic interventions is used up"
        return CommandVerdict(command=command.value, verdict="rejected", reason=reason)
    return CommandVerdict(command=command.value, verdict="accepted")


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-15)


def _jsonable(raw: object) -> object:
    if isinstance(raw, float) and not math.isfinite(raw):
        return str(raw)
    if raw is None or isinstance(raw, bool | int | float | str):
        return raw
    return repr(raw)


class MenuItem(BaseModel):
    """A knob a policy may change now, with the values one change may reach."""

    knob: str
    current: float
    low: float
    high: float
    scale: Scale
    choices: list[float]


class Menu(BaseModel):
    knobs: dict[str, MenuItem] = Field(default_factory=dict)
    commands: list[Command] = Field(default_factory=list)
    blocked: dict[str, str] = Field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.knobs and not self.commands


def build_menu(state: RunState, config: ValidationConfig, source: Source) -> Menu:
    """The changes still allowed after gates and clamping, no-ops removed."""
    menu = Menu()
    if source is not Source.HUMAN and state.interventions_used >= config.budget:
        menu.blocked["*"] = f"budget of {config.budget} automatic interventions used up"
        return menu
    for knob in state.spec.knobs:
        current = state.values.get(knob.name, knob.value)
        if left := state.cooldown_left(knob, config):
            menu.blocked[knob.name] = f"cooldown: {left} steps left"
            continue
        if source is not Source.HUMAN and knob.name in state.settling:
            menu.blocked[knob.name] = state.settling[knob.name]
            continue
        low, high = knob.step_limits(current)
        choices = sorted({c for c in _choices(knob, current, low, high) if not _same(c, current)})
        if not choices:
            menu.blocked[knob.name] = "at its bound: no change possible"
            continue
        menu.knobs[knob.name] = MenuItem(
            knob=knob.name, current=current, low=low, high=high, scale=knob.scale, choices=choices
        )
    # Gates: checkpoints are the training script's business (humans may still ask for one);
    # a policy may roll back only after a sustained regression, and stop only after a sustained
    # lack of progress.
    gated = set()
    if state.stop_issued:
        gated.add(Command.STOP)
        menu.blocked[Command.STOP.value] = "a stop was already issued"
    elif source is not Source.HUMAN and state.evals_since_best < config.stop_after_evals:
        gated.add(Command.STOP)
        menu.blocked[Command.STOP.value] = (
            f"offered after {config.stop_after_evals} evaluations without improvement"
        )
    if source is not Source.HUMAN:
        gated.add(Command.CHECKPOINT)
        # A run may end where it stands only if that is its best: once stop is on the menu
        # and the last evaluation is not the best, so is going back to the best.
        ending = Command.STOP not in gated and state.evals_since_best > 0
        if state.regressed_evals < config.rollback_after_evals and not ending:
            gated.add(Command.ROLLBACK_TO_BEST)
            if Command.ROLLBACK_TO_BEST in state.spec.commands:
                menu.blocked[Command.ROLLBACK_TO_BEST.value] = (
                    f"offered after {config.rollback_after_evals} evaluations in a row at least "
                    f"{config.rollback_min_regression:.0%} worse than the best, or with stop"
                )
    menu.commands = [c for c in state.spec.commands if c not in gated]
    return menu


def _choices(knob: KnobSpec, current: float, low: float, high: float) -> list[float]:
    if knob.scale is Scale.LOG and current > 0:
        raw = [current * f for f in _LOG_FACTORS]
    else:
        raw = [current + s * (knob.max - knob.min) for s in _LIN_SHARES]
    # Round for readability, then keep inside the step limits.
    rounded = [float(round(v)) if knob.type == "int" else float(f"{v:.6g}") for v in raw]
    return [min(max(v, low), high) for v in rounded]
