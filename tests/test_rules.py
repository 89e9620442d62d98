"""The rules policy on snapshots built from synthetic metric streams."""

from __future__ import annotations

import math

from integrations.protocol import Command, KnobSpec, Objective, RunSpec, Source
from integrations.trackers import MetricPoint
from manager_daemon.policies import RulesConfig, RulesPolicy
from manager_daemon.telemetry import Intervention, RunTelemetry
from manager_daemon.validation import RunState, ValidationConfig, build_menu
from tests.helpers import snapshot_and_menu, telemetry

SPEC = RunSpec(
    framework="transformers",
    knobs=[
        KnobSpec(
            name="learning_rate", value=1e-3, min=1e-6, max=1e-2, max_rel_step=3.0, scale="log"
        ),
        KnobSpec(name="weight_decay", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
        KnobSpec(name="dropout", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
        KnobSpec(name="max_grad_norm", value=1.0, min=0.01, max=10, max_rel_step=3.0, scale="log"),
    ],
    commands=[Command.STOP, Command.CHECKPOINT],
)


def decide(t: RunTelemetry, history: list[Intervention] | None = None, values: dict | None = None):
    return RulesPolicy().decide(*snapshot_and_menu(t, SPEC, Source.RULES, values, history))


def falling(n: int, start: float = 3.0, end: float = 1.0) -> list[float]:
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def test_healthy_run_gets_no_action() -> None:
    p = decide(telemetry(falling(100), falling(10, 3.2, 1.2)))
    assert p.action == "no_action"


def test_overfitting_lowers_lr_and_raises_regularisation() -> None:
    evals = [3.0, 2.5, 2.2, 2.1, 2.15, 2.25, 2.4]
    p = decide(telemetry(falling(70, 3.0, 0.8), evals))
    assert p.action == "adjust" and p.reason.startswith("overfitting")
    assert math.isclose(p.changes["learning_rate"], 5e-4)
    assert p.changes["weight_decay"] > 0 and p.changes["dropout"] > 0


def test_spikes_cut_lr_hard_and_clip_harder() -> None:
    train = falling(60, 2.0, 1.5)
    for i in (50, 53, 56, 58):
        train[i] = 9.0
    p = decide(telemetry(train, [*falling(5, 2.1, 1.6), 1.8]))
    assert p.reason.startswith("divergence") and "spikes" in p.reason
    assert math.isclose(p.changes["learning_rate"], 2.5e-4)
    assert math.isclose(p.changes["max_grad_norm"], 0.5)


def test_non_finite_loss_is_divergence() -> None:
    train = [*falling(40), math.nan]
    p = decide(telemetry(train, falling(4)))
    assert p.reason.startswith("divergence: non-finite")


def test_plateau_lowers_lr_only() -> None:
    evals = [2.0, 1.5, 1.4, 1.46, 1.47, 1.46, 1.48, 1.47]
    flat = [1.45 + 0.01 * ((i * 7) % 3) for i in range(80)]
    p = decide(telemetry(flat, evals))
    assert p.reason.startswith("plateau")
    assert set(p.changes) == {"learning_rate"}


def test_stops_when_nothing_more_is_plausible() -> None:
    evals = [2.0, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2]
    history = [
        Intervention(
            version=i,
            decision_id=i,
            decision_step=30 + 10 * i,
            source="rules",
            changes={"learning_rate": (1e-3, 5e-4)},
            commands=[],
        )
        for i in (1, 2)
    ]
    p = decide(telemetry(falling(90, 3.0, 0.5), evals), history)
    assert p.action == "command" and p.commands == ["stop"]


def test_a_fast_falling_loss_is_not_mistaken_for_spikes() -> None:
    train = [8.0 * 0.9**i for i in range(30)]
    t = telemetry(train, [7.0, 5.0, 3.0], eval_every=10)
    assert t.train_view().spikes == 0
    assert decide(t).action == "no_action"


def test_sustained_regression_rolls_back_with_the_overfitting_remedy() -> None:
    t = telemetry(falling(70, 3.0, 0.8), [3.0, 2.5, 2.2, 2.1, 2.3, 2.4, 2.5])
    assert t.regressed_evals(0.05) == 3
    assert t.regressed_evals(0.05, after_step=60) == 1  # only evaluations after a rollback count
    spec = SPEC.model_copy(update={"commands": [Command.STOP, Command.ROLLBACK_TO_BEST]})
    st = RunState(
        spec=spec,
        values=spec.knob_values,
        step=t.step,
        evals_since_best=t.objective_view().evals_since_best,
        regressed_evals=t.regressed_evals(0.05),
    )
    menu = build_menu(st, ValidationConfig(cooldown_steps=0), Source.RULES)
    p = RulesPolicy().decide(t.snapshot(spec, spec.knob_values, []), menu)
    assert p.reason.startswith("overfitting") and p.commands == ["rollback_to_best"]
    assert math.isclose(p.changes["learning_rate"], 5e-4)


def test_no_rollback_while_the_objective_is_only_slightly_worse() -> None:
    t = telemetry(falling(70, 3.0, 0.8), [3.0, 2.5, 2.2, 2.1, 2.15, 2.17, 2.19])
    assert t.regressed_evals(0.05) == 0
    p = decide(t)
    assert p.action == "adjust" and p.commands == []


RL_SPEC = RunSpec(
    framework="stable-baselines3",
    knobs=[
        KnobSpec(
            name="learning_rate", value=3e-5, min=1e-6, max=3e-3, max_rel_step=1.0, scale="log"
        ),
        KnobSpec(name="ent_coef", value=0.08, min=0.0, max=0.16, max_rel_step=0.5),
        KnobSpec(name="clip_range", value=0.2, min=0.02, max=1.0, max_rel_step=1.0, scale="log"),
        KnobSpec(
            name="n_epochs", type="int", value=3, min=1, max=30, max_rel_step=1.0, scale="log"
        ),
        KnobSpec(name="target_kl", value=0.01, min=1e-3, max=0.1, max_rel_step=1.0, scale="log"),
        KnobSpec(
            name="collision_penalty", value=1.0, min=0.1, max=10, max_rel_step=1.0, scale="log"
        ),
    ],
    commands=[Command.STOP],
)


def rl_decide(
    evals: list[float],
    signals: dict[str, float],
    training_collisions: list[float] = (),
    config: RulesConfig | None = None,
    history: list[Intervention] | None = None,
    spec: RunSpec = RL_SPEC,
) -> object:
    t = RunTelemetry(Objective.parse("maximize:eval/safe_success"))
    points = [MetricPoint("eval/safe_success", 100 * (i + 1), v, i) for i, v in enumerate(evals)]
    points += [MetricPoint(k, 100 * len(evals), v, len(evals)) for k, v in signals.items()]
    points += [
        MetricPoint("rollout/collision_rate", 10 * i, v, i)
        for i, v in enumerate(training_collisions)
    ]
    t.add(sorted(points, key=lambda p: p.timestamp))
    snapshot, menu = snapshot_and_menu(t, spec, Source.RULES, history=history)
    return RulesPolicy(config).decide(snapshot, menu)


def test_unsafe_exploration_calms_the_policy_and_raises_the_penalty() -> None:
    p = rl_decide([0.1, 0.2, 0.3], {"eval/collision": 0.4, "train/approx_kl": 0.05})
    assert p.reason.startswith("unsafe exploration")
    assert p.changes["ent_coef"] < 0.08 and p.changes["learning_rate"] < 3e-5
    assert p.changes["clip_range"] < 0.2 and p.changes["collision_penalty"] == 2.0


def test_timid_updates_that_stall_the_objective_get_bolder() -> None:
    p = rl_decide([0.0, 0.3, 0.25, 0.2], {"eval/collision": 0.0, "train/approx_kl": 0.0005})
    assert p.reason.startswith("timid updates")
    assert p.changes["learning_rate"] == 6e-5, "×4 wanted, clamped to the knob's max step (×2)"
    assert p.changes["n_epochs"] == 6
    assert p.changes["clip_range"] > 0.2 and p.changes["target_kl"] == 0.02


def test_healthy_kl_and_safe_evaluations_are_left_alone() -> None:
    p = rl_decide([0.1, 0.3, 0.5], {"eval/collision": 0.05, "train/approx_kl": 0.008})
    assert p.action == "no_action"


def test_training_collisions_that_climb_back_up_are_unsafe() -> None:
    climbing = [0.4] * 5 + [0.05] * 10 + [0.7] * 5
    p = rl_decide([0.5, 0.9, 0.6], {"train/approx_kl": 0.05}, climbing)
    assert p.reason.startswith("unsafe exploration: rollout/collision_rate 0.70")


def test_a_still_random_policy_colliding_in_training_is_not_unsafe() -> None:
    flat = [0.35, 0.45, 0.3, 0.4, 0.38] * 4
    p = rl_decide([0.0, 0.05, 0.1], {"train/approx_kl": 0.01}, flat)
    assert p.action == "no_action", p.reason


def test_an_rl_loss_jumping_is_not_divergence() -> None:
    t = RunTelemetry(Objective.parse("maximize:eval/safe_success"))
    loss = [0.3] * 40 + [1.5, 0.3, 2.0, 0.4, 2.5, 1.8, 2.2, 2.0, 1.9, 2.1]
    points = [MetricPoint("train/loss", i, v, i) for i, v in enumerate(loss)]
    points += [
        MetricPoint("eval/safe_success", 10 * (i + 1), v, i) for i, v in enumerate([0.1, 0.3, 0.5])
    ]
    t.add(sorted(points, key=lambda p: p.timestamp))
    st = RunState(spec=RL_SPEC, values=RL_SPEC.knob_values, step=t.step)
    menu = build_menu(st, ValidationConfig(cooldown_steps=0), Source.RULES)
    p = RulesPolicy().decide(t.snapshot(RL_SPEC, RL_SPEC.knob_values, []), menu)
    assert p.action == "no_action", p.reason


def test_nothing_learned_explores_more_and_is_bolder_when_timid() -> None:
    p = rl_decide([0.0, 0.0, 0.0], {"eval/collision": 0.0, "train/approx_kl": 0.0005})
    assert p.reason.startswith("nothing learned") and "timid" in p.reason
    assert p.changes["ent_coef"] > 0.08 and p.changes["learning_rate"] == 6e-5
    assert p.changes["n_epochs"] == 6
    q = rl_decide([0.0, 0.0, 0.01], {"eval/collision": 0.0, "train/approx_kl": 0.01})
    assert q.reason.startswith("nothing learned") and "n_epochs" not in q.changes


# A cautious PPO run that left its floor and then crawls: 0.01 or so per evaluation.
CRAWL = [0.0, 0.0, 0.0, 0.24, 0.29, 0.34, 0.4, 0.42, 0.46, 0.46, 0.46]
AIMED = RulesConfig(progress_target=0.9)
# No collisions, updates of an ordinary size: neither the safety nor the timid rules fire.
CALM = {"eval/collision": 0.0, "train/approx_kl": 0.004}


def test_slow_steady_progress_far_below_the_target_gets_a_bolder_learning_rate() -> None:
    p = rl_decide(CRAWL, CALM, config=AIMED)
    assert p.reason.startswith("slow progress"), p.reason
    assert p.changes == {"learning_rate": 6e-5}


def test_progress_is_not_a_crawl_without_a_target_fast_or_near_the_target() -> None:
    assert rl_decide(CRAWL, CALM).action == "no_action", "no target named: no such rule"
    rising = [0.0, 0.1, 0.2, 0.35, 0.5, 0.62, 0.75]
    assert rl_decide(rising, CALM, config=AIMED).action == "no_action"
    converged = [0.5, 0.8, 0.9, 0.93, 0.94, 0.94, 0.95]
    assert rl_decide(converged, CALM, config=AIMED).action == "no_action"


def lr_raised(decided: int, applied: int | None = None) -> Intervention:
    """An earlier lr ×2 of the rules, decided and applied at these steps."""
    return Intervention(
        version=1,
        decision_id=1,
        decision_step=decided,
        source="rules",
        changes={"learning_rate": (1.5e-5, 3e-5)},
        commands=[],
        applied_step=applied,
    )


def test_a_crawl_waits_for_the_last_change_to_show_its_effect() -> None:
    p = rl_decide(CRAWL, CALM, config=AIMED, history=[lr_raised(900)])
    assert p.action == "no_action", p.reason


def test_a_crawl_is_acted_on_once_the_last_change_has_had_its_evaluations() -> None:
    # The run's first rescue, applied at step 400; then 0.02-0.04 per evaluation for 7
    # evaluations (an intervention's measured outcome covers only the first two of them).
    p = rl_decide(CRAWL, CALM, config=AIMED, history=[lr_raised(380, applied=400)])
    assert p.reason.startswith("slow progress"), p.reason
    assert p.changes == {"learning_rate": 6e-5}


def test_a_crawl_at_the_highest_learning_rate_proposes_no_empty_change() -> None:
    top = [
        k.model_copy(update={"value": 3e-3}) if k.name == "learning_rate" else k
        for k in RL_SPEC.knobs
    ]
    spec = RL_SPEC.model_copy(update={"knobs": top})
    p = rl_decide(CRAWL, CALM, config=AIMED, spec=spec)
    assert not p.reason.startswith("slow progress"), p.reason
    assert "learning_rate" not in p.changes


def test_a_stop_away_from_the_best_goes_back_to_it() -> None:
    spec = SPEC.model_copy(update={"commands": [Command.STOP, Command.ROLLBACK_TO_BEST]})
    evals = [2.0, 1.5, 1.52, 1.55, 1.53, 1.56, 1.54, 1.55, 1.56]
    history = [
        Intervention(
            version=i,
            decision_id=i,
            decision_step=30 + 10 * i,
            source="rules",
            changes={"learning_rate": (1e-3, 5e-4)},
            commands=[],
        )
        for i in (1, 2)
    ]
    t = telemetry(falling(90, 3.0, 0.5), evals)
    p = RulesPolicy().decide(*snapshot_and_menu(t, spec, Source.RULES, None, history))
    # Under 5 % above the best: no rollback would be offered for the regression alone.
    assert p.commands == ["stop", "rollback_to_best"], p
    assert "back to the best state" in p.reason
