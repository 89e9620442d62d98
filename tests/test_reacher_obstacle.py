"""ReacherObstacle-v0 in real MuJoCo: collisions cost and terminate, touches succeed, reward
weights change live, evaluation splits replay exactly, and every layout is clear and solvable."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("mujoco")

import gymnasium as gym
from stable_baselines3.common.vec_env import DummyVecEnv

from train_scripts.reacher_obstacle import (
    ARM_RADIUS,
    DIFFICULTIES,
    ENV_ID,
    EVAL_SPLITS,
    ReacherObstacleEnv,
    arm_clearance,
    forward_kinematics,
    make_env,
)


def arm_ahead(env: ReacherObstacleEnv, angle: float) -> np.ndarray:
    """The point on the fingertip's circle ``angle`` radians counter-clockwise of it now."""
    q0, q1 = env.data.qpos
    return forward_kinematics(q0 + angle, q1)[1]


def run_until_done(env: ReacherObstacleEnv, action: np.ndarray, limit: int = 50):
    total = 0.0
    for _ in range(limit):
        _, reward, terminated, truncated, info = env.step(action)
        total += reward
        if terminated or truncated:
            return total, reward, terminated, truncated, info
    raise AssertionError(f"the episode did not end within {limit} steps")


def test_turning_into_the_obstacle_terminates_with_cost_and_penalty() -> None:
    env = make_env("easy", seed=1, collision_penalty=7.0)
    far_target = -arm_ahead(env, 0.0) * 0.6  # behind the arm, never reached on the way
    env.set_layout(far_target, arm_ahead(env, 0.6), 0.03)
    _, last, terminated, truncated, info = run_until_done(env, np.array([1.0, 0.0]))
    assert terminated and not truncated
    assert info["collision"] and info["cost"] == 1.0 and not info["is_success"]
    assert last < -7.0 + 0.5  # the penalty dominates the step's progress and control terms


def test_steps_without_contact_cost_nothing() -> None:
    env = make_env("hard", seed=2)
    for _ in range(10):
        _, _, terminated, _, info = env.step(np.zeros(2))
        assert info["cost"] == 0.0 and not info["collision"] and not terminated


def test_a_gentle_touch_is_a_safe_success() -> None:
    env = make_env("easy", seed=3, success_bonus=4.0)
    tip = arm_ahead(env, 0.0)
    env.set_layout(tip + np.array([0.01, 0.0]), -tip, 0.02)
    _, last, terminated, truncated, info = run_until_done(env, np.zeros(2), limit=1)
    assert terminated and not truncated
    assert info["is_success"] and not info["collision"] and info["cost"] == 0.0
    assert last == pytest.approx(4.0, abs=0.1)


def test_sweeping_past_the_target_is_not_a_success() -> None:
    env = make_env("easy", seed=3, success_speed=0.5)
    env.set_layout(arm_ahead(env, 0.5), -arm_ahead(env, 0.0), 0.02)
    for _ in range(8):
        _, _, terminated, _, info = env.step(np.array([1.0, 0.0]))
        assert not info["is_success"] and not terminated


def test_episodes_truncate_at_max_steps() -> None:
    env = make_env("easy", seed=4, max_steps=5)
    _, _, terminated, truncated, _ = run_until_done(env, np.zeros(2))
    assert truncated and not terminated


def test_set_reward_weights_changes_the_reward_from_the_next_step() -> None:
    rewards = []
    for scale in (1.0, 4.0):
        env = make_env("medium", seed=5, ctrl_cost_weight=0.0)
        env.set_reward_weights(progress_scale=scale)
        rewards.append(env.step(np.array([0.5, -0.5]))[1])
    assert rewards[0] != 0.0
    assert rewards[1] == pytest.approx(4.0 * rewards[0])
    with pytest.raises(ValueError, match="unknown reward weights"):
        env.set_reward_weights(learning_rate=1.0)


def test_reward_weights_change_live_through_a_vec_env() -> None:
    vec = DummyVecEnv([lambda: ReacherObstacleEnv("easy") for _ in range(2)])
    vec.env_method("set_reward_weights", collision_penalty=12.0, success_bonus=1.0)
    assert (
        vec.env_method("reward_weights")
        == [{"progress_scale": 3.0, "success_bonus": 1.0, "collision_penalty": 12.0}] * 2
    )


@pytest.mark.parametrize("split", sorted(EVAL_SPLITS))
def test_eval_splits_replay_exactly_from_their_seeds(split: str) -> None:
    difficulty, seed, episodes = EVAL_SPLITS[split]
    level = DIFFICULTIES[difficulty]
    layouts = []
    for _ in range(2):
        env = ReacherObstacleEnv(difficulty)
        runs = []
        for i in range(5):
            obs, _ = env.reset(seed=seed + i)
            obs2 = env.step(np.array([0.3, -0.2]))[0]
            runs.append((obs, obs2, env.obstacle_radius))
            assert level.radius[0] <= env.obstacle_radius <= level.radius[1]
        layouts.append(runs)
    for (a, a2, ra), (b, b2, rb) in zip(*layouts, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a2, b2)
        assert ra == rb
    assert not np.array_equal(layouts[0][0][0], layouts[0][1][0])
    assert episodes >= 10


def test_every_sampled_layout_leaves_the_start_pose_and_target_clear() -> None:
    env = ReacherObstacleEnv()
    for seed in range(60):
        env.reset(seed=seed)
        gap = env.obstacle_radius + ARM_RADIUS
        assert arm_clearance(*env.data.qpos, env.obstacle) > gap
        assert np.linalg.norm(env.target - env.obstacle) > gap
        assert 0.08 - 1e-9 <= np.linalg.norm(env.target) <= 0.2 + 1e-9


def test_observations_match_the_observation_space() -> None:
    env = gym.make(ENV_ID, difficulty="hard")
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (15,)
    assert obs.dtype == env.observation_space.dtype
    assert info["cost"] == 0.0
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample())
        assert obs.shape == (15,) and np.all(np.isfinite(obs))
    # The last entry is the obstacle radius in units of the reach.
    assert obs[-1] == pytest.approx(env.unwrapped.obstacle_radius / 0.21)
    assert math.isclose(np.hypot(obs[0], obs[2]), 1.0)  # cos² + sin² of joint 0


def test_unknown_difficulty_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown difficulty"):
        ReacherObstacleEnv("impossible")
