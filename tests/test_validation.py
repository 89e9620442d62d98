"""Validation: every way a proposal can be wrong ends clamped or rejected, with a reason."""

from __future__ import annotations

import math

import pytest

from integrations.protocol import Command, KnobSpec, Proposal, RunSpec, Source
from manager_daemon.validation import (
    RunState,
    ValidationConfig,
    build_menu,
    refused_by_hand,
    validate,
)

SPEC = RunSpec(
    framework="torch",
    knobs=[
        KnobSpec(
            name="learning_rate", value=1e-3, min=1e-5, max=1e-2, max_rel_step=1.0, scale="log"
        ),
        KnobSpec(name="weight_decay", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
        KnobSpec(name="n_epochs", type="int", value=4, min=1, max=10, max_rel_step=0.3),
        KnobSpec(
            name="aux_weight", value=0.5, min=0.0, max=1.0, max_rel_step=1.0, cooldown_steps=0
        ),
    ],
    commands=[Command.STOP],
)
CONFIG = ValidationConfig(cooldown_steps=100, budget=3)


def state(**kw: object) -> RunState:
    fields: dict[str, object] = dict(spec=SPEC, values=SPEC.knob_values, step=1000)
    fields.update(kw)
    return RunState(**fields)  # type: ignore[arg-type]


def one(changes: dict[str, object], st: RunState | None = None, source: Source = Source.RULES):
    result = validate(Proposal(changes=changes), st or state(), CONFIG, source)
    assert len(result.verdicts) == 1
    return result.verdicts[0], result


def test_accepted_change_within_bounds() -> None:
    verdict, result = one({"learning_rate": 5e-4})
    assert verdict.verdict == "accepted" and verdict.final == 5e-4
    assert result.changes == {"learning_rate": 5e-4}
    assert result.values["learning_rate"] == 5e-4 and result.values["weight_decay"] == 0.0


def test_out_of_range_is_clamped_to_the_bound() -> None:
    verdict, result = one({"aux_weight": 3.0})
    assert verdict.verdict == "clamped" and verdict.final == 1.0
    assert "outside the range" in verdict.reason
    assert result.values["aux_weight"] == 1.0


@pytest.mark.parametrize("value", [-1.0, 0.0, 1.0])
def test_a_persons_value_outside_the_range_is_refused_not_clamped(value: float) -> None:
    # A policy's lr of -1 becomes the knob's min (a cut); a person's is refused: it was meant
    # as typed, and a cut nobody asked for would start a cooldown that blocks the next change.
    policy, _ = one({"learning_rate": value})
    assert policy.verdict == "clamped"
    person, result = one({"learning_rate": value}, source=Source.HUMAN)
    assert person.verdict == "rejected" and not result.issues_version
    assert person.reason == f"learning_rate={value:g} is outside its bounds [1e-05, 0.01]"


def test_only_the_size_of_a_persons_step_is_clamped() -> None:
    verdict, _ = one({"learning_rate": 1e-4}, source=Source.HUMAN)  # in range, ÷10 at once
    assert verdict.verdict == "clamped" and verdict.final == pytest.approx(5e-4)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"learning_rate": -1.0}, "learning_rate=-1 is outside its bounds [1e-05, 0.01]"),
        ({"learning_rate": math.nan}, "learning_rate=nan is not a finite number"),
        ({"learning_rat": 1e-4}, "learning_rat is not a knob of this run (did you mean "),
        ({"momentum": 0.9}, "momentum is not a knob of this run (its knobs: learning_rate, "),
        ({"learning_rate": 5e-4, "aux_weight": 2.0}, "aux_weight=2 is outside its bounds"),
    ],
)
def test_what_a_person_cannot_set_at_all_is_said_in_one_line(
    changes: dict[str, float], reason: str
) -> None:
    assert (refused_by_hand(changes, SPEC) or "").startswith(reason)
    assert refused_by_hand({"learning_rate": 1e-4, "weight_decay": 0.5}, SPEC) is None


def test_too_large_a_step_is_clamped_to_the_max_step() -> None:
    verdict, _ = one({"learning_rate": 1e-4})  # ÷10, but one change may only halve
    assert verdict.verdict == "clamped"
    assert verdict.final == pytest.approx(5e-4)
    assert "step too large" in verdict.reason


def test_unknown_knob_is_rejected() -> None:
    verdict, result = one({"momentum": 0.9})
    assert verdict.verdict == "rejected" and "unknown knob" in verdict.reason
    assert not result.issues_version and "momentum" not in result.values


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    verdict, result = one({"learning_rate": bad})
    assert verdict.verdict == "rejected" and "finite" in verdict.reason
    assert result.values["learning_rate"] == 1e-3


@pytest.mark.parametrize("bad", ["0.001", None, True, [1e-3], {"v": 1}])
def test_wrong_types_are_rejected(bad: object) -> None:
    verdict, result = one({"learning_rate": bad})
    assert verdict.verdict == "rejected" and "wrong type" in verdict.reason
    assert not result.issues_version


def test_inside_the_cooldown_is_rejected() -> None:
    st = state(last_changed_step={"learning_rate": 950})
    verdict, result = one({"learning_rate": 5e-4}, st)
    assert verdict.verdict == "rejected"
    assert "cooldown" in verdict.reason and "50 more steps" in verdict.reason
    assert not result.issues_version


def test_a_knob_with_its_own_cooldown_overrides_the_default() -> None:
    st = state(last_changed_step={"aux_weight": 999})
    verdict, _ = one({"aux_weight": 0.6}, st)
    assert verdict.verdict == "accepted"


def test_integer_knobs_are_rounded() -> None:
    verdict, _ = one({"n_epochs": 5.4})
    assert verdict.verdict == "clamped" and verdict.final == 5.0


def test_no_op_is_removed() -> None:
    verdict, result = one({"weight_decay": 0.0})
    assert verdict.verdict == "noop"
    assert not result.issues_version


def test_budget_limits_automatic_sources_but_not_humans() -> None:
    st = state(interventions_used=3)
    verdict, _ = one({"learning_rate": 5e-4}, st, Source.LLM)
    assert verdict.verdict == "rejected" and "budget" in verdict.reason
    verdict, _ = one({"learning_rate": 5e-4}, st, Source.HUMAN)
    assert verdict.verdict == "accepted"


def test_unsupported_and_unknown_commands_are_rejected() -> None:
    result = validate(
        Proposal(commands=["stop", "checkpoint", "explode"]), state(), CONFIG, Source.RULES
    )
    verdicts = {c.command: (c.verdict, c.reason) for c in result.command_verdicts}
    assert verdicts["stop"] == ("accepted", "")
    assert verdicts["checkpoint"][0] == "rejected" and "not supported" in verdicts["checkpoint"][1]
    assert verdicts["explode"] == ("rejected", "unknown command")
    assert result.commands == [Command.STOP]


def test_menu_offers_only_allowed_non_noop_choices() -> None:
    st = state(
        values={**SPEC.knob_values, "weight_decay": 0.5},
        last_changed_step={"learning_rate": 990},
    )
    menu = build_menu(st, CONFIG, Source.RULES)
    assert "learning_rate" not in menu.knobs and "cooldown" in menu.blocked["learning_rate"]
    wd = menu.knobs["weight_decay"]
    assert all(c < 0.5 for c in wd.choices) and wd.high == 0.5
    for item in menu.knobs.values():
        assert item.current not in item.choices
        assert all(item.low <= c <= item.high for c in item.choices)
    assert menu.commands == []
    assert "evaluations without improvement" in menu.blocked["stop"]


def test_stop_is_offered_only_after_sustained_lack_of_progress() -> None:
    assert Command.STOP not in build_menu(state(evals_since_best=5), CONFIG, Source.LLM).commands
    assert build_menu(state(evals_since_best=6), CONFIG, Source.LLM).commands == [Command.STOP]
    assert build_menu(state(), CONFIG, Source.HUMAN).commands == [Command.STOP]
    already = build_menu(state(evals_since_best=9, stop_issued=True), CONFIG, Source.LLM)
    assert already.commands == [] and already.blocked["stop"] == "a stop was already issued"


def test_menu_is_empty_when_the_budget_is_used() -> None:
    menu = build_menu(state(interventions_used=3), CONFIG, Source.RULES)
    assert menu.empty and "budget" in menu.blocked["*"]


def test_rollback_is_offered_to_policies_only_after_a_sustained_regression() -> None:
    spec = SPEC.model_copy(update={"commands": [Command.STOP, Command.ROLLBACK_TO_BEST]})
    once = build_menu(state(spec=spec, regressed_evals=1), CONFIG, Source.LLM)
    assert Command.ROLLBACK_TO_BEST not in once.commands
    assert "rollback_to_best" in once.blocked
    twice = build_menu(state(spec=spec, regressed_evals=2), CONFIG, Source.RULES)
    assert Command.ROLLBACK_TO_BEST in twice.commands
    human = build_menu(state(spec=spec), CONFIG, Source.HUMAN)
    assert Command.ROLLBACK_TO_BEST in human.commands
    unsupported = build_menu(state(regressed_evals=5), CONFIG, Source.RULES)
    assert Command.ROLLBACK_TO_BEST not in unsupported.commands
