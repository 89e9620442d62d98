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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


def _generic(value: float) -> tuple[Scale, Bounds]:
    """Bounds for a knob the catalog does not know (a script's loss or reward weight)."""
    if value > 0:
        return Scale.LOG, (value / 10, value * 10, 1.0)
    return Scale.LIN, (min(0.0, value), max(1.0, abs(value)), 0.2)


BoundsOverrides = Mapping[str, Mapping[str, Any]]


def derive_knob(
    name: str,
    value: float,
    *,
    apply_at: Boundary = Boundary.STEP,
    overrides: BoundsOverrides | None = None,
) -> KnobSpec:
    """A knob spec with the catalog's bounds for ``value`` (generic ones for a name it does
    not know), then the user's ``overrides[name]`` (``min``, ``max``, ``max_rel_step``,
    ``scale``, ``cooldown_steps``)."""
    value = float(value)
    info = CATALOG.get(name)
    if info is not None and not (info.scale is Scale.LOG and value <= 0):
        scale, (low, high, step) = info.scale, info.bounds(value)
    else:
        scale, (low, high, step) = _generic(value)
    fields: dict[str, Any] = dict(min=low, max=high, max_rel_step=step, scale=scale)
    fields.update((overrides or {}).get(name, {}))
    kind = info.type if info is not None else "float"
    try:
        return KnobSpec(name=name, value=value, type=kind, apply_at=apply_at, **fields)
    except ValidationError as exc:
        raise ValueError(f"bounds for knob {name!r} are invalid: {exc.errors()[0]['msg']}") from exc


class KnobBounds(BaseModel):
    """One knob's entry in a bounds file; what is left out keeps its derived default."""

    model_config = ConfigDict(extra="forbid")

    min: float | None = None
    max: float | None = None
    max_rel_step: float | None = Field(None, gt=0)
    scale: Scale | None = None
    cooldown_steps: int | None = Field(None, ge=0)


def parse_bounds(data: object) -> dict[str, dict[str, Any]]:
    """Validate a bounds file's content (``{knob: {min, max, max_rel_step, ...}}``).

    Raises ValueError naming the knob and field at fault.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("a bounds file maps knob names to {min, max, max_rel_step, ...}")
    bounds: dict[str, dict[str, Any]] = {}
    for name, entry in data.items():
        try:
            parsed = KnobBounds.model_validate(entry or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"knob {name!r}: {where}: {err['msg']}") from exc
        bounds[str(name)] = parsed.model_dump(exclude_none=True, mode="json")
    return bounds


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
