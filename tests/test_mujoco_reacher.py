"""The ReacherObstacle training script: evaluation hooks fire after every evaluation, the best
policy is kept by safe success then collisions, and restore_best rolls policy and optimizer back."""

from __future__ import annotations

import pytest

pytest.importorskip("mujoco")

import torch

from train_scripts.mujoco_reacher import (
    PRESETS,
    RECIPES,
    BestPolicy,
    SplitEvaluation,
    build_model,
    evaluate_split,
    manager_callback,
    restore_best,
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


def test_the_best_policy_is_ranked_by_safe_success_then_fewer_collisions() -> None:
    model = build_model(RECIPES["baseline"], PRESETS["tiny"], seed=0)
    best = BestPolicy()
    assert best.offer(model, scores(0.5, 0.2))
    assert not best.offer(model, scores(0.4, 0.0))
    assert not best.offer(model, scores(0.5, 0.3))
    assert best.offer(model, scores(0.5, 0.1))
    assert best.score == (0.5, -0.1)


def test_restore_best_rolls_back_policy_and_optimizer_state() -> None:
    model = build_model(RECIPES["baseline"], PRESETS["tiny"], seed=0)
    best = BestPolicy()
    with pytest.raises(ValueError, match="no best policy yet"):
        restore_best(model, best)
    model.num_timesteps = 1000
    best.offer(model, scores(0.9, 0.0))
    kept = {k: v.clone() for k, v in model.policy.state_dict().items()}

    # One real optimizer step moves the weights and fills Adam's moments.
    loss = sum(p.sum() for p in model.policy.parameters())
    model.policy.optimizer.zero_grad()
    loss.backward()
    model.policy.optimizer.step()
    assert model.policy.optimizer.state_dict()["state"]

    assert restore_best(model, best) == 1000
    for name, value in model.policy.state_dict().items():
        torch.testing.assert_close(value, kept[name])
    assert not model.policy.optimizer.state_dict()["state"]
    # The kept copy is untouched by training after a restore, so a second rollback works too.
    model.policy.optimizer.zero_grad()
    sum(p.sum() for p in model.policy.parameters()).backward()
    model.policy.optimizer.step()
    restore_best(model, best)
    for name, value in model.policy.state_dict().items():
        torch.testing.assert_close(value, kept[name])
