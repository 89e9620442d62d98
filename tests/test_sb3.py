"""The stable-baselines3 callback applies every knob and command between rollouts or evaluations,
and SB3's own metrics reach the MLflow run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.noise import (
    NormalActionNoise,
    OrnsteinUhlenbeckActionNoise,
    VectorizedActionNoise,
)
from stable_baselines3.common.utils import LinearSchedule

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    Boundary,
    RunSpec,
    Scale,
)
from integrations.sb3 import ManagerSB3Callback, TrackerWriter, ensure_tracker_logging
from integrations.trackers import open_tracker
from tests.helpers import issue, wait_for


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOTAL = 1_000_000  # never reached: the tests end training with the stop command
LR = LinearSchedule(start=1e-3, end=1e-4, end_fraction=1.0)


def tiny(**kw: Any) -> dict[str, Any]:
    # A fresh policy_kwargs each time: SB3 writes into the dict it is given.
    return dict(policy_kwargs=dict(net_arch=[8]), device="cpu", **kw)


def tiny_ppo(**kw: Any) -> PPO:
    return PPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=64,
        batch_size=64,
        n_epochs=2,
        policy_kwargs=dict(net_arch=[16]),
        device="cpu",
        seed=0,
        **kw,
    )


class Pace(BaseCallback):
    """Records what ``snapshot`` reads at each rollout start, slows each env step by ``delay``,
    and ends training after ``deadline`` seconds should the manager never stop it."""

    def __init__(
        self,
        snapshot: Callable[[Any], dict[str, Any]],
        *,
        delay: float = 0.0,
        deadline: float = 40.0,
    ) -> None:
        super().__init__()
        self.snapshot, self.delay, self.deadline = snapshot, delay, deadline
        self.rows: list[dict[str, Any]] = []
        self.timed_out = False

    def _on_training_start(self) -> None:
        self.started = time.monotonic()

    def _on_rollout_start(self) -> None:
        self.rows.append({"step": self.model.num_timesteps, **self.snapshot(self.model)})

    def _on_step(self) -> bool:
        time.sleep(self.delay)
        self.timed_out = time.monotonic() - self.started > self.deadline
        return not self.timed_out


def ppo_state(model: PPO) -> dict[str, Any]:
    """What the train() that just ran used (progress is the one its lr was computed from)."""
    return {
        "lr": model.policy.optimizer.param_groups[0]["lr"],
        "progress": model._current_progress_remaining,
        "n_updates": model._n_updates,
        "ent_coef": model.ent_coef,
        "vf_coef": model.vf_coef,
        "clip_range": model.clip_range(1.0),
        "target_kl": model.target_kl,
        "n_epochs": model.n_epochs,
    }


def learn_managed(
    model: BaseAlgorithm,
    callbacks: list[BaseCallback],
    tracking_uri: str,
    intervene: Callable[[str], None],
) -> str:
    """Run ``learn`` inside an MLflow run while ``intervene(run_id)`` runs on a thread."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("sb3")
    with mlflow.start_run() as run:
        thread = threading.Thread(target=intervene, args=(run.info.run_id,), daemon=True)
        thread.start()
        model.learn(TOTAL, callback=callbacks)
        thread.join(10)
    return run.info.run_id


def applied_steps(tracking_uri: str, run_id: str) -> dict[int, int]:
    """Params version → the step it was applied at, from the client's acks."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, METRIC_PARAMS_VERSION)
    return {int(m.value): m.step for m in history}


def test_ppo_knobs_apply_at_rollout_end_and_persist_until_stop(
    tracking_uri: str, tracker, tmp_path: Path
) -> None:
    model = tiny_ppo(learning_rate=LR, target_kl=0.5)
    pace = Pace(ppo_state, delay=0.001)
    manager = ManagerSB3Callback(poll_interval=0.3, checkpoint_dir=tmp_path)
    new = {
        "learning_rate": 5e-4,
        "ent_coef": 0.01,
        "vf_coef": 0.25,
        "clip_range": 0.1,
        "target_kl": 1.0,
        "n_epochs": 3,
    }
    specs: list[RunSpec] = []

    def intervene(run_id: str) -> None:
        wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags, 30)
        specs.append(RunSpec.model_validate(tracker.read_json(run_id, SPEC_PATH)))
        wait_for(lambda: len(pace.rows) >= 3, 30)  # two train() calls under the start values
        issue(tracker, run_id, 1, new)
        wait_for(lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == "1", 30)
        time.sleep(0.5)  # a few rollouts under the new values
        issue(tracker, run_id, 2, new, commands=["checkpoint", "stop"])

    run_id = learn_managed(model, [manager, pace], tracking_uri, intervene)

    spec = specs[0]
    assert spec.framework == "stable-baselines3" and spec.apply_at is Boundary.ROLLOUT
    assert spec.knob_values == {
        "learning_rate": pytest.approx(1e-3),
        "ent_coef": 0.0,
        "vf_coef": 0.5,
        "clip_range": pytest.approx(0.2),
        "target_kl": 0.5,
        "n_epochs": 2.0,
    }
    ent = spec.knob("ent_coef")
    assert (ent.min, ent.max, ent.scale) == (0.0, 0.1, Scale.LIN)
    assert spec.knob("n_epochs").type == "int" and spec.knob("n_epochs").min == 1.0
    assert spec.knob("clip_range").scale is Scale.LOG

    assert tracker.get_run(run_id).tags[TAG_CLIENT_APPLIED_VERSION] == "2"
    assert manager.stop_requested and not pace.timed_out
    assert model.num_timesteps < TOTAL / 10, "the stop command ended learn()"
    steps = applied_steps(tracking_uri, run_id)
    assert steps[1] % 64 == 0 and steps[2] > steps[1], "applied at rollout ends"

    before = [r for r in pace.rows if 0 < r["step"] < steps[1]]
    after = [r for r in pace.rows if r["step"] >= steps[1]]
    assert before and len(after) >= 2
    for row in before:
        assert row["lr"] == pytest.approx(LR(row["progress"]))
        assert (row["ent_coef"], row["clip_range"], row["n_epochs"]) == (0.0, 0.2, 2)
    # Every train() since v1 recomputed the lr from the schedule: the halved schedule held.
    for row in after:
        assert row["lr"] == pytest.approx(LR(row["progress"]) / 2)
        assert row["ent_coef"] == 0.01 and row["vf_coef"] == 0.25 and row["target_kl"] == 1.0
        assert row["clip_range"] == pytest.approx(0.1) and row["n_epochs"] == 3
    epochs_run = [b["n_updates"] - a["n_updates"] for a, b in pairwise(after)]
    assert epochs_run == [3] * (len(after) - 1), "each train() ran the new number of epochs"

    saved = PPO.load(tmp_path / f"checkpoint-{steps[2]}.zip", device="cpu")
    assert saved.lr_schedule(1.0) == pytest.approx(5e-4)
    assert saved.lr_schedule(0.5) == pytest.approx(LR(0.5) / 2)
    assert saved.clip_range(0.5) == pytest.approx(0.1)
    assert (saved.ent_coef, saved.n_epochs) == (0.01, 3)


def test_eval_boundary_applies_only_after_an_evaluation(tracking_uri: str, tracker) -> None:
    model = tiny_ppo()
    evaluator = EvalCallback(
        Monitor(gym.make("CartPole-v1")), eval_freq=150, n_eval_episodes=1, verbose=0
    )
    manager = ManagerSB3Callback(poll_interval=0.3, apply_at=Boundary.EVAL)
    pace = Pace(lambda m: {}, delay=0.002)

    def intervene(run_id: str) -> None:
        wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags, 30)
        issue(tracker, run_id, 1, {"ent_coef": 0.02}, commands=["stop"])

    run_id = learn_managed(model, [evaluator, manager, pace], tracking_uri, intervene)

    tags = tracker.get_run(run_id).tags
    assert tags[TAG_CLIENT_APPLIED_VERSION] == "1" and not pace.timed_out
    applied_at = int(tags[TAG_CLIENT_APPLIED_STEP])
    assert applied_at % 150 == 0, "applied right after an evaluation, not at a rollout end"
    assert model.num_timesteps == applied_at, "the stop ended learn() at that very step"
    assert model.ent_coef == 0.02


def test_eval_window_applies_an_answer_to_the_evaluation_that_arrives_soon_after(
    tracking_uri: str, tracker
) -> None:
    """A version staged within ``eval_window`` rollouts of an evaluation applies at once; one
    staged after the window waits for the next evaluation."""
    model = tiny_ppo()  # 64 env steps per rollout
    manager = ManagerSB3Callback(poll_interval=60, apply_at=Boundary.EVAL, eval_window=2)

    class Evaluate(BaseCallback):
        """Evaluates every 6 rollouts; stages v1 one rollout after the first evaluation and v2
        three rollouts after it."""

        rollouts = 0

        def _on_rollout_end(self) -> None:
            self.rollouts += 1
            if self.rollouts % 6 == 0:
                manager.on_evaluation({})
            staged = {7: (1, {"ent_coef": 0.02}, []), 9: (2, {"ent_coef": 0.03}, ["stop"])}
            if self.rollouts in staged:
                version, values, commands = staged[self.rollouts]
                run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
                issue(tracker, run_id, version, values, commands=commands)
                assert manager.client is not None
                manager.client.poll_once()  # staged now, as the client's thread would

        def _on_step(self) -> bool:
            return True

    run_id = learn_managed(model, [Evaluate(), manager], tracking_uri, lambda run_id: None)

    steps = applied_steps(tracking_uri, run_id)
    assert steps[1] == 7 * 64, "staged inside the window: applied at that rollout's end"
    assert steps[2] == 12 * 64, "staged after the window: applied at the next evaluation"
    assert model.ent_coef == 0.03
    assert model.num_timesteps == 12 * 64 + 1, "the stop in v2 ended learn() at the next env step"


def test_eval_window_needs_a_count_of_rollouts() -> None:
    with pytest.raises(ValueError, match="eval_window"):
        ManagerSB3Callback(apply_at=Boundary.EVAL, eval_window=-1)


def test_td3_exposes_and_scales_the_exploration_noise(tracking_uri: str, tracker) -> None:
    noise = NormalActionNoise(mean=np.zeros(1), sigma=np.full(1, 0.2))
    model = TD3(
        "MlpPolicy",
        "Pendulum-v1",
        action_noise=noise,
        learning_starts=50,
        batch_size=32,
        policy_kwargs=dict(net_arch=[16]),
        device="cpu",
        seed=0,
    )
    pace = Pace(lambda m: {"lr": m.actor.optimizer.param_groups[0]["lr"]})
    manager = ManagerSB3Callback(poll_interval=0.3)
    specs: list[RunSpec] = []
    new = {"learning_rate": 5e-4, "action_noise_sigma": 0.05}

    def intervene(run_id: str) -> None:
        wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags, 30)
        specs.append(RunSpec.model_validate(tracker.read_json(run_id, SPEC_PATH)))
        issue(tracker, run_id, 1, new)
        wait_for(lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == "1", 30)
        time.sleep(0.3)
        issue(tracker, run_id, 2, new, commands=["stop"])

    run_id = learn_managed(model, [manager, pace], tracking_uri, intervene)

    assert specs[0].knob_values == {"learning_rate": 1e-3, "action_noise_sigma": 0.2}
    assert tracker.get_run(run_id).tags[TAG_CLIENT_APPLIED_VERSION] == "2"
    assert not pace.timed_out and model.num_timesteps < TOTAL / 10
    assert model.action_noise is noise and noise._sigma == pytest.approx([0.05])
    v1_at = applied_steps(tracking_uri, run_id)[1]
    trained_after = [r for r in pace.rows if r["step"] > max(v1_at, model.learning_starts)]
    assert trained_after and all(r["lr"] == pytest.approx(5e-4) for r in trained_after)


def ou_noise_per_env() -> DDPG:
    noise = OrnsteinUhlenbeckActionNoise(mean=np.zeros(1), sigma=np.full(1, 0.3))
    env = make_vec_env("Pendulum-v1", n_envs=2)
    return DDPG("MlpPolicy", env, action_noise=VectorizedActionNoise(noise, 2), **tiny())


class Case(NamedTuple):
    make: Callable[[], BaseAlgorithm]
    exposed: dict[str, float]  # the knobs the algorithm has, with their start values
    update: dict[str, float]
    applied: Callable[[Any], bool]  # the update is visible in the model


ALGORITHMS = {
    "a2c": Case(
        lambda: A2C("MlpPolicy", "CartPole-v1", **tiny()),
        {"learning_rate": 7e-4, "ent_coef": 0.0, "vf_coef": 0.5},
        {"learning_rate": 7e-4, "ent_coef": 0.05, "vf_coef": 0.3},
        lambda m: (m.ent_coef, m.vf_coef) == (0.05, 0.3),
    ),
    "dqn": Case(
        lambda: DQN("MlpPolicy", "CartPole-v1", **tiny()),
        {"learning_rate": 1e-4},
        {"learning_rate": 2e-4},
        lambda m: m.lr_schedule(1.0) == pytest.approx(2e-4),
    ),
    "sac-auto-entropy": Case(
        lambda: SAC("MlpPolicy", "Pendulum-v1", **tiny()),
        {"learning_rate": 3e-4},
        {"learning_rate": 6e-4},
        lambda m: m.lr_schedule(0.5) == pytest.approx(6e-4),
    ),
    "sac-fixed-entropy": Case(
        lambda: SAC("MlpPolicy", "Pendulum-v1", **tiny(ent_coef=0.1)),
        {"learning_rate": 3e-4, "ent_coef": 0.1},
        {"learning_rate": 3e-4, "ent_coef": 0.05},
        lambda m: m.ent_coef_tensor.item() == pytest.approx(0.05),
    ),
    "ddpg-noise-per-env": Case(
        ou_noise_per_env,
        {"learning_rate": 1e-3, "action_noise_sigma": 0.3},
        {"learning_rate": 1e-3, "action_noise_sigma": 0.15},
        lambda m: [n._sigma.tolist() for n in m.action_noise.noises] == [[0.15], [0.15]],
    ),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_exposes_and_applies_its_own_knobs(
    algorithm: str, tracking_uri: str, tracker, new_run
) -> None:
    case = ALGORITHMS[algorithm]
    model = case.make()
    run_id = new_run()
    manager = ManagerSB3Callback(run_id=run_id, tracking_uri=tracking_uri, poll_interval=0.1)
    manager.init_callback(model)
    manager.on_training_start({}, {})
    try:
        assert manager.client is not None
        assert manager.client.spec.knob_values == pytest.approx(case.exposed)
        issue(tracker, run_id, 1, case.update)
        # Rollout ends, as learn() would reach them, until the version has arrived and applied.
        wait_for(lambda: manager.on_rollout_end() or manager.client.applied_version == 1, 30)
        assert case.applied(model)
    finally:
        manager.on_training_end()


def test_step_boundary_is_refused() -> None:
    with pytest.raises(ValueError, match="between rollouts"):
        ManagerSB3Callback(apply_at=Boundary.STEP)


def test_without_a_tracker_run_training_continues_unmanaged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert mlflow.active_run() is None
    model = tiny_ppo()
    manager = ManagerSB3Callback(log_to_tracker=True)
    with caplog.at_level(logging.WARNING, logger="integrations"):
        model.learn(128, callback=manager)
    assert model.num_timesteps == 128
    assert manager.client is None and manager.writer is None
    assert "training continues unmanaged" in caplog.text


def test_sb3_metrics_reach_the_run_with_num_timesteps_as_step(tracking_uri: str) -> None:
    model = tiny_ppo()
    manager = ManagerSB3Callback(poll_interval=0.3, log_to_tracker=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("sb3")
    with mlflow.start_run() as run:
        model.learn(256, callback=manager)
        assert ensure_tracker_logging(model) is manager.writer, "one writer per logger"
    client = MlflowClient(tracking_uri)

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    assert history("time/total_timesteps") == [(s, float(s)) for s in (64, 128, 192, 256)]
    # train() runs after each dump, so its metrics go out with the next rollout's.
    assert [s for s, _ in history("train/entropy_loss")] == [128, 192, 256]
    assert [v for _, v in history("train/clip_range")] == pytest.approx([0.2] * 3)


def test_tracker_writer_filters_values_and_never_raises(
    tracking_uri: str, new_run, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = new_run()
    writer = TrackerWriter(open_tracker(tracking_uri), run_id)
    values = {"a": 1.5, "n": np.float32(2.0), "i": 3, "flag": True, "text": "x", "hidden": 4.0}
    writer.write(values, {"hidden": ("mlflow",), "a": ("tensorboard",)}, step=7)
    writer.close()
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).data.metrics == {"a": 1.5, "n": 2.0, "i": 3.0}
    assert [m.step for m in client.get_metric_history(run_id, "i")] == [7]

    unreachable = TrackerWriter(open_tracker("http://127.0.0.1:9"), run_id)
    with caplog.at_level(logging.WARNING, logger="integrations.sb3"):
        for step in (1, 2):
            unreachable.write({"a": 1.0}, {}, step=step)
        assert unreachable.flush(timeout=60)
    unreachable.close()
    assert caplog.text.count("cannot log SB3 metrics") == 1


def test_rollback_restores_the_best_evaluated_policy_and_live_values_reach_the_script(
    tracking_uri: str, tracker
) -> None:
    model = tiny_ppo()
    live_changes: list[dict[str, float]] = []
    manager = ManagerSB3Callback(
        poll_interval=0.3,
        apply_at=Boundary.EVAL,
        objective="maximize:eval/score",
        live={"collision_penalty": 5.0},
        on_live=live_changes.append,
    )
    scores = [0.2, 0.9, 0.5, 0.4]

    class Evaluate(BaseCallback):
        """A script's own evaluation at each rollout end, with scripted scores."""

        def __init__(self) -> None:
            super().__init__()
            self.policies: list[dict[str, torch.Tensor]] = []
            self.after_rollback: dict[str, torch.Tensor] = {}

        def _on_rollout_end(self) -> None:
            score = scores[min(len(self.policies), len(scores) - 1)]
            self.policies.append(self.policy_state())
            if manager.on_evaluation({"eval/score": score}) is not None:
                self.after_rollback = self.policy_state()

        def policy_state(self) -> dict[str, torch.Tensor]:
            return {k: v.clone() for k, v in self.model.policy.state_dict().items()}

        def _on_step(self) -> bool:
            return True

    evaluate = Evaluate()
    pace = Pace(lambda m: {}, delay=0.002)

    def intervene(run_id: str) -> None:
        wait_for(lambda: len(evaluate.policies) >= 3, 30)
        spec = tracker.read_json(run_id, SPEC_PATH)
        assert "rollback_to_best" in spec["commands"]
        issue(
            tracker,
            run_id,
            1,
            {"collision_penalty": 10.0},
            commands=["rollback_to_best", "stop"],
        )

    run_id = learn_managed(model, [manager, evaluate, pace], tracking_uri, intervene)

    assert tracker.get_run(run_id).tags[TAG_CLIENT_APPLIED_VERSION] == "1" and not pace.timed_out
    assert manager.best is not None and manager.best.value == 0.9
    best = evaluate.policies[1]
    assert evaluate.after_rollback, "the version was not applied at an evaluation"
    for key, value in evaluate.after_rollback.items():
        assert torch.equal(value, best[key]), f"{key} is not the best evaluation's"
    assert live_changes == [{"collision_penalty": 10.0}]
