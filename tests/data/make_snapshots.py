"""Regenerate ``decision_snapshots.json``: recorded decision situations for the LLM policy.

Each case is a telemetry snapshot and the menu offered with it, built from a synthetic metric
stream of a typical failure (or of a healthy run), with the action a careful engineer would
take. Run from the repository root: ``python tests/data/make_snapshots.py``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from integrations.protocol import Command, KnobSpec, Objective, RunSpec, Source
from integrations.trackers import MetricPoint
from manager_daemon.telemetry import Intervention, RunTelemetry
from manager_daemon.validation import RunState, ValidationConfig, build_menu

OUT = Path(__file__).with_name("decision_snapshots.json")

FULL = RunSpec(
    framework="transformers",
    knobs=[
        KnobSpec(
            name="learning_rate", value=3e-3, min=3e-6, max=3e-2, max_rel_step=3.0, scale="log"
        ),
        KnobSpec(name="weight_decay", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
        KnobSpec(name="dropout", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
        KnobSpec(
            name="max_grad_norm", value=1.0, min=0.01, max=10.0, max_rel_step=3.0, scale="log"
        ),
    ],
    commands=[Command.STOP, Command.CHECKPOINT],
)
LR_ONLY = RunSpec(
    framework="torch",
    knobs=[
        KnobSpec(
            name="learning_rate", value=1e-3, min=1e-6, max=1e-2, max_rel_step=3.0, scale="log"
        )
    ],
    commands=[Command.STOP],
)


def stream(
    train: list[float], evals: list[float], eval_every: int, key: str = "eval_loss"
) -> RunTelemetry:
    objective = Objective.parse(f"{'maximize' if 'acc' in key else 'minimize'}:{key}")
    t = RunTelemetry(objective)
    points = [MetricPoint("loss", 2 * i, v, 2 * i) for i, v in enumerate(train)]
    points += [
        MetricPoint(key, eval_every * (i + 1), v, 2 * eval_every * (i + 1) + 1)
        for i, v in enumerate(evals)
    ]
    t.add(sorted(points, key=lambda p: p.timestamp))
    return t


def case(
    name: str, expected: str, t: RunTelemetry, spec: RunSpec, history=(), cooldown_from=None
) -> dict:
    state = RunState(
        spec=spec,
        values=spec.knob_values,
        step=t.step,
        last_changed_step=cooldown_from or {},
        interventions_used=len(history),
        evals_since_best=t.objective_view().evals_since_best,
    )
    menu = build_menu(state, ValidationConfig(cooldown_steps=40), Source.LLM)
    snapshot = t.snapshot(spec, state.values, list(history))
    return {
        "name": name,
        "expected": expected,
        "spec": spec.model_dump(mode="json"),
        "state": {
            "values": state.values,
            "step": state.step,
            "last_changed_step": state.last_changed_step,
            "interventions_used": state.interventions_used,
            "evals_since_best": state.evals_since_best,
        },
        "snapshot": snapshot.model_dump(mode="json"),
        "menu": menu.model_dump(mode="json"),
    }


def main() -> None:
    rng = random.Random(0)
    noisy = lambda xs, s: [x * (1 + rng.gauss(0, s)) for x in xs]  # noqa: E731
    falling = [3.0 * math.exp(-i / 40) + 0.3 for i in range(160)]
    over_evals = [3.0, 2.2, 1.8, 1.6, 1.5, 1.45, 1.5, 1.58, 1.66]
    cases = [
        case(
            "overfitting",
            "adjust: lower lr, raise regularisation",
            stream(noisy(falling, 0.02), over_evals, 20),
            FULL,
        ),
        case(
            "overfitting_lr_only",
            "adjust: lower lr",
            stream(noisy(falling, 0.02), over_evals, 20),
            LR_ONLY,
        ),
        case(
            "healthy",
            "no_action",
            stream(noisy(falling, 0.02), [3.1, 2.3, 1.9, 1.6, 1.45, 1.35, 1.28], 20),
            FULL,
        ),
        case(
            "plateau",
            "adjust: lower lr",
            stream(
                noisy([1.2] * 160, 0.03), [2.0, 1.5, 1.31, 1.30, 1.305, 1.31, 1.30, 1.306, 1.31], 20
            ),
            FULL,
        ),
    ]
    spiky = [*noisy(falling[:100], 0.02), 9.0, 1.0, 8.5, 1.1, 10.0, 1.0, 7.0, 1.2]
    cases.append(
        case(
            "loss_spikes",
            "adjust: lower lr, clip harder",
            stream(spiky, [3.0, 2.2, 1.9, 2.4], 50),
            FULL,
        )
    )
    cases.append(
        case(
            "non_finite",
            "adjust: lower lr, clip harder",
            stream([*noisy(falling[:80], 0.02), math.nan, math.nan], [3.0, 2.3, math.nan], 50),
            FULL,
        )
    )
    history = [
        Intervention(
            version=1,
            decision_id=1,
            decision_step=140,
            source="llm",
            changes={"learning_rate": (3e-3, 1.5e-3), "weight_decay": (0.0, 0.05)},
            commands=[],
            expected_effect="eval loss stops rising",
            applied_step=142,
        )
    ]
    cases.append(
        case(
            "overfitting_after_intervention",
            "adjust again or stop",
            stream(noisy(falling, 0.02), [*over_evals, 1.7, 1.74, 1.8], 20),
            FULL,
            history,
        )
    )
    cooling = stream(noisy(falling, 0.02), over_evals, 20)
    cases.append(
        case(
            "cooldown",
            "adjust with what is not cooling down",
            cooling,
            FULL,
            cooldown_from={"learning_rate": cooling.step - 10},
        )
    )
    cases.append(
        case(
            "accuracy_dropping",
            "adjust: lower lr, raise regularisation",
            stream(
                noisy(falling, 0.02),
                [0.3, 0.5, 0.62, 0.7, 0.72, 0.71, 0.69, 0.66],
                20,
                key="eval/accuracy",
            ),
            FULL,
        )
    )
    cases.append(
        case(
            "long_stall",
            "stop",
            stream(
                noisy([0.05] * 160, 0.05), [1.4, 1.5, 1.55, 1.6, 1.62, 1.66, 1.7, 1.72, 1.75], 20
            ),
            FULL,
            history * 2,
        )
    )
    OUT.write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
