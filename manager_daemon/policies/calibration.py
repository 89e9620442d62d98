"""A typical decision, for timing a model before a run needs it.

A policy that knows how long its model takes can leave a run that evaluates faster than that
to the rules from the first decision on (``LLMPolicy._too_slow_for``). The situation here is
what the model is most often asked about: a small language model overfitting, with the usual
knobs and commands on the menu.
"""

from __future__ import annotations

from integrations.knobs import Knob, derive_knob
from integrations.protocol import Command, Objective, RunSpec, Source
from integrations.trackers import MetricPoint
from manager_daemon.telemetry import RunTelemetry, Snapshot
from manager_daemon.validation import Menu, RunState, ValidationConfig, build_menu

_EVAL_EVERY = 20
# Eval loss per evaluation: falling, then rising while the train loss goes on falling.
_EVALS = (3.1, 2.4, 2.0, 1.8, 1.7, 1.66, 1.68, 1.73, 1.8)


def typical_situation() -> tuple[Snapshot, Menu]:
    """The snapshot and menu of an overfitting run, as a policy would be given them."""
    spec = RunSpec(
        framework="transformers",
        knobs=[
            derive_knob(Knob.LEARNING_RATE, 3e-3),
            derive_knob(Knob.WEIGHT_DECAY, 0.0),
            derive_knob(Knob.DROPOUT, 0.0),
            derive_knob(Knob.MAX_GRAD_NORM, 1.0),
        ],
        commands=[Command.STOP, Command.CHECKPOINT, Command.ROLLBACK_TO_BEST],
    )
    telemetry = RunTelemetry(Objective.parse("minimize:eval_loss"))
    steps = _EVAL_EVERY * len(_EVALS)
    points = [MetricPoint("loss", s, 3.2 * 0.992**s, 1000 * s) for s in range(1, steps + 1)]
    points += [
        MetricPoint("eval_loss", _EVAL_EVERY * (i + 1), v, 1000 * _EVAL_EVERY * (i + 1))
        for i, v in enumerate(_EVALS)
    ]
    telemetry.add(sorted(points, key=lambda p: p.timestamp))
    state = RunState(
        spec=spec,
        values=spec.knob_values,
        step=telemetry.step,
        evals_since_best=telemetry.objective_view().evals_since_best,
        regressed_evals=telemetry.regressed_evals(0.05),
    )
    menu = build_menu(state, ValidationConfig(), Source.LLM)
    return telemetry.snapshot(spec, state.values, []), menu
