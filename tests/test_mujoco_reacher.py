"""The ReacherObstacle training script: evaluation hooks fire after every evaluation, the best
evaluation is ranked by safe success then collisions, and the managed run's callback is wired to
apply within half an evaluation period."""

from __future__ import annotations

import pytest

pytest.importorskip("mujoco")


from train_scripts.mujoco_reacher import (
    PRESETS,
    RECIPES,
    BestScore,
    SplitEvaluation,
    build_model,
    evaluate_split,
    manager_callback,
)


def scores(safe_success: float, collision: float) -> dict[str, float]:
    return {"eval/safe_success": safe_success, "eval/collision": collision}


def test_evaluation_runs_every_k_updates_and_at_the_end_and_tells_listeners() -> None:
    preset = PRESETS["tiny"]
    model = build_model(RECIPES["baseline"], preset, seed=0)
    evaluation = SplitEvaluation(eval_every=2, episodes=2)
    heard: list[tuple[int, dict[str, float]]] = []
    evaluation.on_evaluated.append(lambda m: heard.append((model.num_timesteps, m)))
    model.learn(3 * preset.n_envs * preset.n_steps, callback=evaluation)
    # After update 2 (at the end of rollout 3, before its update) and after the last update.
    assert [step for step, _ in heard] == [384, 384]
    assert evaluation.updates == 3
    metrics = heard[-1][1]
    for split in ("easy", "medium", "hard"):
        assert 0.0 <= metrics[f"eval/{split}/safe_success"] <= 1.0
    assert metrics["eval/collision"] == pytest.approx(
        sum(metrics[f"eval/{s}/collision"] for s in ("easy", "medium", "hard")) / 3
    )
    assert evaluation.best.num_timesteps == 384


def test_the_managed_run_applies_within_half_an_evaluation_period_of_an_evaluation() -> None:
    recipe = RECIPES["cautious"]
    manager = manager_callback(build_model(recipe, PRESETS["tiny"], seed=0), recipe, eval_every=20)
    assert (manager.apply_at, manager.eval_window) == ("eval", 10)
    assert manager.live == recipe.reward_weights()


def test_evaluating_a_split_twice_gives_the_same_numbers() -> None:
    model = build_model(RECIPES["reckless"], PRESETS["tiny"], seed=1)
    first = evaluate_split(model.policy, "hard", 123, 3)
    assert evaluate_split(model.policy, "hard", 123, 3) == first


def test_the_best_evaluation_is_ranked_by_safe_success_then_fewer_collisions() -> None:
    best = BestScore()
    assert best.offer(100, scores(0.5, 0.2))
    assert not best.offer(200, scores(0.4, 0.0))
    assert not best.offer(300, scores(0.5, 0.3))
    assert best.offer(400, scores(0.5, 0.1))
    assert (best.score, best.num_timesteps) == ((0.5, -0.1), 400)
