"""The knob catalog: the knobs the manager knows by name, with their scale and default bounds.

Part of the contract, used by both sides: a framework integration publishes a knob under its
catalog name with bounds derived here from the starting value, the daemon's policies refer to
knobs by these names, and ``atm attach`` recognises a knob among a run's logged parameters by
the names in ``param_names``. Names follow the frameworks' own arguments so users recognise
them. A script's own values (loss or reward weights) are knobs too, under the name it gives
them, with generic bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator

from integrations.health import closest
from integrations.protocol import Boundary, KnobSpec, Scale


class Knob(StrEnum):
    LEARNING_RATE = "learning_rate"
    WEIGHT_DECAY = "weight_decay"
    DROPOUT = "dropout"
    MAX_GRAD_NORM = "max_grad_norm"
    LABEL_SMOOTHING = "label_smoothing"
    ENT_COEF = "ent_coef"
    CLIP_RANGE = "clip_range"
    TARGET_KL = "target_kl"
    N_EPOCHS = "n_epochs"
    VF_COEF = "vf_coef"
    ACTION_NOISE_SIGMA = "action_noise_sigma"


# (min, max, max_rel_step) for a knob starting at a value. On a log scale max_rel_step 3.0
# lets one change move ×4 or ÷4; on a linear one it is a share of the range.
Bounds = tuple[float, float, float]


@dataclass(frozen=True)
class KnobInfo:
    """What the catalog knows about one knob."""

    scale: Scale
    bounds: Callable[[float], Bounds]
    description: str
    type: Literal["float", "int"] = "float"
    # Logged parameter names that carry this knob's value (TrainingArguments, SB3, scripts).
    param_names: tuple[str, ...] = ()


def _factors(low: float, high: float, step: float) -> Callable[[float], Bounds]:
    return lambda v: (v * low, v * high, step)


def _absolute(low: float, high: float, step: float) -> Callable[[float], Bounds]:
    # Wide enough to hold the start, so a run that starts outside the usual range can go on.
    return lambda v: (min(low, v), max(high, 2 * v), step)


def _clip_range(v: float) -> Bounds:
    # A ratio clipped beyond [0, 2] is not clipped at all.
    return v / 10, max(v, min(10 * v, 1.0)), 1.0


# Keyed by Knob, which is a str: a plain name finds its entry.
CATALOG: dict[str, KnobInfo] = {
    Knob.LEARNING_RATE: KnobInfo(
        Scale.LOG, _factors(1e-3, 10.0, 3.0), "the optimizer's learning rate", param_names=("lr",)
    ),
    Knob.WEIGHT_DECAY: KnobInfo(
        Scale.LIN, _absolute(0.0, 0.5, 0.2), "weight decay of the decaying parameter groups"
    ),
    Knob.DROPOUT: KnobInfo(
        Scale.LIN,
        _absolute(0.0, 0.5, 0.2),
        "the probability of every dropout module",
        param_names=("hidden_dropout_prob",),
    ),
    Knob.MAX_GRAD_NORM: KnobInfo(
        Scale.LOG, _factors(1e-2, 10.0, 3.0), "the norm gradients are clipped to"
    ),
    Knob.LABEL_SMOOTHING: KnobInfo(
        Scale.LIN,
        _absolute(0.0, 0.5, 0.2),
        "the share of probability spread over the other labels in the loss",
        param_names=("label_smoothing_factor",),
    ),
    Knob.ENT_COEF: KnobInfo(Scale.LIN, _absolute(0.0, 0.1, 0.2), "the entropy bonus coefficient"),
    Knob.CLIP_RANGE: KnobInfo(Scale.LOG, _clip_range, "PPO's clipping of the policy ratio"),
    Knob.TARGET_KL: KnobInfo(
        Scale.LOG, _factors(0.1, 10.0, 1.0), "the KL at which PPO stops an update early"
    ),
    Knob.N_EPOCHS: KnobInfo(
        Scale.LOG,
        lambda v: (1.0, max(10.0, 10 * v), 1.0),
        "passes over each rollout per update",
        type="int",
    ),
    Knob.VF_COEF: KnobInfo(
        Scale.LIN, _absolute(0.0, 1.0, 0.2), "the value loss's weight in the total loss"
    ),
    Knob.ACTION_NOISE_SIGMA: KnobInfo(
        Scale.LOG, _factors(0.1, 10.0, 1.0), "off-policy exploration noise (mean sigma)"
    ),
}


def _generic(value: float, floor: float | None) -> tuple[Scale, Bounds]:
    """Bounds for a knob the catalog does not know (a script's loss or reward weight); a
    linear scale where the value, or the least value the user allows (``floor``), is not
    positive."""
    if value > 0 and (floor is None or floor > 0):
        return Scale.LOG, (value / 10, value * 10, 1.0)
    return Scale.LIN, (min(0.0, value), max(1.0, abs(value)), 0.2)


BoundsOverrides = Mapping[str, Mapping[str, Any]]


class BoundsRefused(ValueError):
    """Bounds that cannot be honoured for the knobs a run has: a name none of them has, or a
    range that excludes a knob's starting value. Nothing of such a run is managed, since a
    bound the user believes is in force but is not would let the manager go where the user
    said it must not."""


def derive_knob(
    name: str,
    value: float,
    *,
    apply_at: Boundary = Boundary.STEP,
    overrides: BoundsOverrides | None = None,
) -> KnobSpec:
    """A knob spec with the catalog's bounds for ``value`` (generic ones for a name it does
    not know), then the user's ``overrides[name]`` (``min``, ``max``, ``max_rel_step``,
    ``scale``, ``cooldown_steps``).

    Raises ValueError (naming the knob plainly) when the result is no valid knob, e.g. when
    the user's range excludes ``value``.
    """
    name, value = str(name), float(value)  # str(): a Knob prints as its plain name
    override = dict((overrides or {}).get(name, {}))
    info = CATALOG.get(name)
    if info is not None and not (info.scale is Scale.LOG and value <= 0):
        scale, (low, high, step) = info.scale, info.bounds(value)
    else:
        scale, (low, high, step) = _generic(value, override.get("min"))
    fields: dict[str, Any] = dict(min=low, max=high, max_rel_step=step, scale=scale)
    fields.update(override)
    if not fields["min"] <= value <= fields["max"]:
        raise ValueError(
            f"{name} starts at {value:g}, outside its bounds [{fields['min']:g}, {fields['max']:g}]"
        )
    kind = info.type if info is not None else "float"
    try:
        return KnobSpec(name=name, value=value, type=kind, apply_at=apply_at, **fields)
    except ValidationError as exc:
        raise ValueError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from exc


def derive_knobs(
    values: Mapping[str, float],
    *,
    apply_at: Boundary = Boundary.STEP,
    overrides: BoundsOverrides | None = None,
) -> list[KnobSpec]:
    """The specs of a run's knobs (``derive_knob`` for each of ``values``).

    Raises BoundsRefused when ``overrides`` cannot be honoured for these knobs: an entry for a
    knob the run does not have, or one that makes a knob's spec invalid.
    """
    overrides = overrides or {}
    if unknown := [name for name in overrides if name not in values]:
        raise BoundsRefused(
            f"bounds given for {', '.join(unknown)}, which this run does not have "
            f"(its knobs: {', '.join(values) or 'none'})"
        )
    specs = []
    for name, value in values.items():
        try:
            specs.append(derive_knob(name, value, apply_at=apply_at, overrides=overrides))
        except ValueError as exc:
            if name not in overrides:
                raise
            raise BoundsRefused(str(exc)) from exc
    return specs


class KnobBounds(BaseModel):
    """One knob's entry in a bounds file; what is left out keeps its derived default."""

    model_config = ConfigDict(extra="forbid")

    min: FiniteFloat | None = None
    max: FiniteFloat | None = None
    max_rel_step: FiniteFloat | None = Field(None, gt=0)
    scale: Scale | None = None
    cooldown_steps: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> KnobBounds:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


def parse_bounds(data: object) -> dict[str, dict[str, Any]]:
    """Validate bounds (a bounds file's content, or ``bounds=`` in code) whole: ``{knob:
    {min, max, max_rel_step, scale, cooldown_steps}}``.

    A name must be a catalog knob's, or, since a script's own knobs are known only once it
    runs, a name that is not a near-miss of one (``learning_rat``, ``weight-decay``, ``lr``).
    Raises ValueError with one line naming the knob and the field at fault.
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError("bounds map knob names to {min, max, max_rel_step, ...}")
    bounds: dict[str, dict[str, Any]] = {}
    for key, entry in data.items():
        name = str(key)
        if (meant := _meant(name)) is not None:
            raise ValueError(f"knob {name!r}: no such knob; did you mean {meant!r}?")
        bounds[name] = _parse_entry(name, entry)
    return bounds


def _meant(name: str) -> str | None:
    """The catalog knob a bounds entry's ``name`` was surely meant to be, or None."""
    if name in CATALOG:
        return None
    for knob, info in CATALOG.items():
        if name in info.param_names:
            return str(knob)
    return closest(name, [str(knob) for knob in CATALOG])


def _parse_entry(name: str, entry: object) -> dict[str, Any]:
    fields = list(KnobBounds.model_fields)
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping):
        raise ValueError(f"knob {name!r}: expected {{{', '.join(fields)}}}, not {entry!r}")
    for field in entry:
        if field not in fields:
            hint = f"did you mean {meant!r}? " if (meant := closest(str(field), fields)) else ""
            raise ValueError(
                f"knob {name!r}: unknown field {field!r}; {hint}(fields: {', '.join(fields)})"
            )
    try:
        parsed = KnobBounds.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ValueError(f"knob {name!r}: {where + ': ' if where else ''}{message}") from exc
    info = CATALOG.get(name)
    scale = parsed.scale or (info.scale if info is not None else None)
    if scale is Scale.LOG and parsed.min is not None and parsed.min <= 0:
        raise ValueError(
            f"knob {name!r}: min {parsed.min:g} on a log scale: a log-scale knob needs min > 0 "
            "(or scale: lin)"
        )
    return parsed.model_dump(exclude_none=True, mode="json")


def knobs_from_params(params: Mapping[str, str]) -> dict[str, float]:
    """Knob values read from a run's logged parameters (the numeric ones the catalog names),
    for runs attached without a client."""
    found: dict[str, float] = {}
    for knob, info in CATALOG.items():
        for key in (knob, *info.param_names):
            if key not in params:
                continue
            try:
                value = float(params[key])
            except ValueError:
                continue
            if math.isfinite(value):
                found[knob.value] = value
                break
    return found
