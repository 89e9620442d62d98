"""Default bounds for knobs, derived from their starting values, and user overrides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from integrations.protocol import Boundary, KnobSpec, Scale

_LOG_DEFAULTS: dict[str, tuple[float, float, float]] = {
    # min factor, max factor, max_rel_step (3.0: one change moves at most ×4 or ÷4)
    "learning_rate": (1e-3, 10.0, 3.0),
    "max_grad_norm": (1e-2, 10.0, 3.0),
}
_LIN_DEFAULTS: dict[str, tuple[float, float, float]] = {
    # absolute min, absolute max, max_rel_step as a share of the range
    "weight_decay": (0.0, 0.5, 0.2),
    "dropout": (0.0, 0.5, 0.2),
}

BoundsOverrides = Mapping[str, Mapping[str, Any]]


def derive_knob(
    name: str,
    value: float,
    *,
    apply_at: Boundary = Boundary.STEP,
    overrides: BoundsOverrides | None = None,
    type_: str = "float",
) -> KnobSpec:
    """A knob spec with bounds derived from the starting value, then user overrides applied.

    Log-scale knobs (learning rate, clipping norm, positive custom values) get bounds as
    factors of the start; weight decay and dropout get fixed absolute ranges wide enough to
    include the start. ``overrides[name]`` may set ``min``, ``max``, ``max_rel_step``,
    ``scale`` and ``cooldown_steps``.
    """
    value = float(value)
    if name in _LOG_DEFAULTS and value > 0:
        lo, hi, step = _LOG_DEFAULTS[name]
        fields: dict[str, Any] = dict(
            min=value * lo, max=value * hi, max_rel_step=step, scale=Scale.LOG
        )
    elif name in _LIN_DEFAULTS:
        lo, hi, step = _LIN_DEFAULTS[name]
        fields = dict(
            min=min(lo, value), max=max(hi, 2 * value), max_rel_step=step, scale=Scale.LIN
        )
    elif value > 0:
        fields = dict(min=value / 10, max=value * 10, max_rel_step=1.0, scale=Scale.LOG)
    else:
        fields = dict(
            min=min(0.0, value), max=max(1.0, abs(value)), max_rel_step=0.2, scale=Scale.LIN
        )
    fields.update((overrides or {}).get(name, {}))
    try:
        return KnobSpec(name=name, value=value, type=type_, apply_at=apply_at, **fields)
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


# Logged parameter names (transformers' TrainingArguments, stable-baselines3, common scripts)
# that name a knob, for runs attached without a client.
PARAM_KNOBS: dict[str, str] = {
    "learning_rate": "learning_rate",
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "dropout": "dropout",
    "hidden_dropout_prob": "dropout",
    "max_grad_norm": "max_grad_norm",
    "ent_coef": "ent_coef",
    "clip_range": "clip_range",
    "target_kl": "target_kl",
    "vf_coef": "vf_coef",
}


def knobs_from_params(params: Mapping[str, str]) -> dict[str, float]:
    """Knob values read from a run's logged parameters (the numeric ones we recognise)."""
    found: dict[str, float] = {}
    for key, name in PARAM_KNOBS.items():
        if name in found or key not in params:
            continue
        try:
            value = float(params[key])
        except ValueError:
            continue
        if value == value and abs(value) != float("inf"):
            found[name] = value
    return found
