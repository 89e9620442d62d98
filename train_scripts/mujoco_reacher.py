"""PPO on ReacherObstacle-v0 with one of three recipes, evaluated on fixed splits, logged to MLflow.

The recipes (baseline / cautious / reckless) differ in PPO hyperparameters and reward weights;
the presets size the run. Every ``eval_every`` PPO updates the deterministic policy plays the
``easy``, ``medium`` and ``hard`` splits; the metrics go to MLflow and to ``on_evaluated``
listeners, and the best score so far is kept for the summary.

    python train_scripts/mujoco_reacher.py --recipe baseline --preset cpu --seed 0 \\
        [--tracking-uri URI] [--experiment NAME] [--out DIR --filmstrip] [--managed]

With ``--managed`` the run is supervised (the three-line integration): objective
``eval/safe_success``, updates applied at evaluation boundaries (the episodic mode: an answer to
an evaluation that arrives within half an evaluation period applies on arrival, a later one at
the next evaluation), the reward weights as live knobs, and ``rollback_to_best`` on offer. A
daemon (``atm daemon``) decides.

The last line printed is a JSON summary of the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from integrations.knobs import Knob
from integrations.protocol import Boundary
from integrations.sb3 import ManagerSB3Callback, TrackerWriter, ensure_tracker_logging
from train_scripts.reacher_obstacle import EVAL_SPLITS, ReacherObstacleEnv

log = logging.getLogger("mujoco_reacher")


# ---- recipes and presets ----------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """PPO hyperparameters and reward weights, as the paper gives them."""

    learning_rate: float
    ent_coef: float
    clip_range: float
    n_epochs: int
    target_kl: float
    collision_penalty: float
    success_bonus: float
    progress_scale: float

    def reward_weights(self) -> dict[str, float]:
        """The weights ``ReacherObstacleEnv.set_reward_weights`` takes."""
        return {
            "progress_scale": self.progress_scale,
            "success_bonus": self.success_bonus,
            "collision_penalty": self.collision_penalty,
        }


RECIPES: dict[str, Recipe] = {
    "baseline": Recipe(3e-4, 0.01, 0.2, 6, 0.03, 5.0, 5.0, 3.0),
    "cautious": Recipe(3e-5, 0.001, 0.1, 3, 0.01, 25.0, 2.5, 1.5),
    "reckless": Recipe(3e-3, 0.08, 0.3, 8, 0.10, 1.0, 10.0, 5.0),
}


@dataclass(frozen=True)
class Preset:
    """How big a run is; the task and the PPO settings the recipes leave open."""

    n_envs: int
    n_steps: int  # per env and rollout
    updates: int  # PPO updates (rollouts) in the run
    eval_every: int  # evaluate every this many updates
    batch_size: int = 256
    gamma: float = 0.98
    gae_lambda: float = 0.95
    net_arch: tuple[int, ...] = (64, 64)
    eval_episodes: int | None = None  # per split; None = as EVAL_SPLITS says
    subprocess_envs: bool = False

    @property
    def env_steps(self) -> int:
        return self.n_envs * self.n_steps * self.updates


PRESETS: dict[str, Preset] = {
    # CI: the whole run well under a minute on one core.
    "tiny": Preset(n_envs=2, n_steps=64, updates=4, eval_every=2, batch_size=64, eval_episodes=4),
    # 409,600 env steps, three to five and a half minutes on one core. Measured: baseline ends
    # at 0.96 and 0.93 safe success (seeds 0, 1), cautious stays at 0, reckless peaks near 0.97
    # and then collapses as its entropy bonus inflates the action noise. Evaluated every 20
    # updates, as the paper's manager is called.
    "cpu": Preset(n_envs=8, n_steps=128, updates=400, eval_every=20, batch_size=128),
    # The paper's scale.
    "paper": Preset(n_envs=16, n_steps=128, updates=500, eval_every=25, subprocess_envs=True),
}


# ---- evaluation ---------------------------------------------------------------------------


def evaluate_split(policy: Any, difficulty: str, seed: int, episodes: int) -> dict[str, float]:
    """Safe success, collision rate and mean return of the deterministic ``policy`` over
    ``episodes`` episodes seeded ``seed``, ``seed + 1``, …; all episodes run in lockstep so that
    each step is one batched forward pass.

    The episodes use the env's default reward weights, so returns compare across recipes and
    do not move when training weights are changed live.
    """
    envs = [ReacherObstacleEnv(difficulty) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    running = np.ones(episodes, dtype=bool)
    returns = np.zeros(episodes)
    success = np.zeros(episodes)
    collision = np.zeros(episodes)
    while running.any():
        actions, _ = policy.predict(obs, deterministic=True)
        for i in np.flatnonzero(running):
            obs[i], reward, terminated, truncated, info = envs[i].step(actions[i])
            returns[i] += reward
            success[i], collision[i] = info["is_success"], info["collision"]
            running[i] = not (terminated or truncated)
    return {
        "safe_success": float(success.mean()),
        "collision": float(collision.mean()),
        "mean_reward": float(returns.mean()),
    }


@dataclass
class BestScore:
    """The best evaluation so far: safe success first, then fewer collisions. (Rolling back to
    it is the manager's ``rollback_to_best``, which keeps the policy's state itself.)"""

    score: tuple[float, float] = (-1.0, 0.0)
    num_timesteps: int = -1

    def offer(self, num_timesteps: int, metrics: dict[str, float]) -> bool:
        """Record ``metrics`` if they beat the best so far; True if they do."""
        score = (metrics["eval/safe_success"], -metrics["eval/collision"])
        if score <= self.score:
            return False
        self.score, self.num_timesteps = score, num_timesteps
        return True


class SplitEvaluation(BaseCallback):
    """Evaluates every ``eval_every`` PPO updates and once more when training ends.

    Evaluation runs at rollout ends, before the next update; the metrics are logged to the
    active MLflow run at ``model.num_timesteps`` and then passed to every ``on_evaluated``
    listener (the manager integration hooks in there). List this callback before one that acts
    at rollout ends, so that what a listener decides applies at the same boundary.
    """

    def __init__(self, eval_every: int, episodes: int | None = None) -> None:
        super().__init__()
        self.eval_every = eval_every
        self.episodes = episodes
        self.rollouts = 0  # complete rollouts; learn() updates the policy after each one
        self.updates = 0
        self.evaluated_at_update = -1
        self.best = BestScore()
        self.last: dict[str, float] = {}
        self.on_evaluated: list[Callable[[dict[str, float]], None]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.updates = self.rollouts  # the rollout just collected is not trained on yet
        self.rollouts += 1
        if self.updates > 0 and self.updates % self.eval_every == 0:
            self.evaluate()

    def _on_training_end(self) -> None:
        self.updates = self.rollouts
        if self.evaluated_at_update != self.updates:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Play every split, log and publish the metrics, and keep the policy if it is best."""
        metrics: dict[str, float] = {}
        for split, (difficulty, seed, episodes) in EVAL_SPLITS.items():
            result = evaluate_split(self.model.policy, difficulty, seed, self.episodes or episodes)
            for name, value in result.items():
                metrics[f"eval/{split}/{name}"] = value
        for name in ("safe_success", "collision", "mean_reward"):
            metrics[f"eval/{name}"] = float(
                np.mean([metrics[f"eval/{split}/{name}"] for split in EVAL_SPLITS])
            )
        self.evaluated_at_update, self.last = self.updates, metrics
        if mlflow.active_run() is not None:
            mlflow.log_metrics(metrics, step=self.model.num_timesteps)
        self.best.offer(self.model.num_timesteps, metrics)
        log.info(
            "update %d, step %d: safe success %.2f, collision %.2f",
            self.updates,
            self.model.num_timesteps,
            metrics["eval/safe_success"],
            metrics["eval/collision"],
        )
        for listener in self.on_evaluated:
            listener(metrics)
        return metrics


class TrainingMetrics(BaseCallback):
    """Sends SB3's own metrics to the MLflow run and adds the rollouts' collision rate."""

    def __init__(self, run_id: str, tracking_uri: str | None) -> None:
        super().__init__()
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.writer: TrackerWriter | None = None
        self.episodes = self.collisions = 0

    def _on_training_start(self) -> None:
        self.writer = ensure_tracker_logging(
            self.model, run_id=self.run_id, tracking_uri=self.tracking_uri
        )

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
            if done:
                self.episodes += 1
                self.collisions += int(info.get("collision", False))
        return True

    def _on_rollout_end(self) -> None:
        if self.episodes:
            self.logger.record("rollout/collision_rate", self.collisions / self.episodes)
        self.episodes = self.collisions = 0

    def _on_training_end(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- the run ------------------------------------------------------------------------------


def build_model(recipe: Recipe, preset: Preset, seed: int) -> PPO:
    """PPO on a vectorized ReacherObstacle with the recipe's hyperparameters and weights."""
    env = make_vec_env(
        ReacherObstacleEnv,
        n_envs=preset.n_envs,
        seed=seed,
        env_kwargs=recipe.reward_weights(),
        vec_env_cls=SubprocVecEnv if preset.subprocess_envs else DummyVecEnv,
    )
    return PPO(
        "MlpPolicy",
        env,
        learning_rate=recipe.learning_rate,
        ent_coef=recipe.ent_coef,
        clip_range=recipe.clip_range,
        n_epochs=recipe.n_epochs,
        target_kl=recipe.target_kl,
        n_steps=preset.n_steps,
        batch_size=preset.batch_size,
        gamma=preset.gamma,
        gae_lambda=preset.gae_lambda,
        policy_kwargs={"net_arch": list(preset.net_arch)},
        seed=seed,
        device="cpu",
    )


def filmstrip(model: PPO, out_dir: Path, frames: int = 6) -> Path | None:
    """A PNG strip of one deterministic hard-split episode of ``model``'s policy, or None.

    Rendering happens in a child process: MuJoCo picks its OpenGL backend when it is first
    imported, so each backend (EGL, then OSMesa) is tried in a fresh interpreter.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    policy_path, png_path = out_dir / "final_policy.zip", out_dir / "filmstrip.png"
    model.save(policy_path)
    root = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "train_scripts.filmstrip", str(policy_path), str(png_path)]
    for backend in ("egl", "osmesa"):
        env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
        env["PYTHONPATH"] = python_path
        try:
            done = subprocess.run(
                [*command, "--frames", str(frames)],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            log.info("rendering with MUJOCO_GL=%s took over 300 s; giving up on it", backend)
            continue
        if done.returncode == 0:
            return png_path
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.info("rendering with MUJOCO_GL=%s failed: %s", backend, reason)
    print("no filmstrip: no OpenGL backend works here (tried MUJOCO_GL=egl and osmesa)")
    return None


# The paper's menu ranges, and a cap on epochs that keeps an update's cost bounded.
MANAGED_BOUNDS: dict[str, dict[str, float | str]] = {
    Knob.LEARNING_RATE: {"min": 1e-5, "max": 3e-3},
    Knob.ENT_COEF: {"min": 0.0, "max": 0.1, "max_rel_step": 0.5},
    Knob.CLIP_RANGE: {"min": 0.03, "max": 0.3},
    Knob.N_EPOCHS: {"min": 1, "max": 10},
    Knob.TARGET_KL: {"min": 0.003, "max": 0.1},
    "collision_penalty": {"min": 1.0, "max": 50.0, "scale": "log", "max_rel_step": 1.0},
    "success_bonus": {"min": 1.0, "max": 20.0, "scale": "log", "max_rel_step": 1.0},
    "progress_scale": {"min": 0.5, "max": 10.0, "scale": "log", "max_rel_step": 1.0},
}


def manager_callback(model: PPO, recipe: Recipe, eval_every: int) -> ManagerSB3Callback:
    """The manager's callback: reward weights reach every training env through ``env_method``.

    The daemon answers an evaluation within seconds, a few updates after it; waiting for the
    next evaluation to apply that answer would cost a whole evaluation period per decision. So
    the evaluation's boundary stays open for half a period, as the paper's manager applies an
    answer when it arrives.
    """

    def set_weights(changed: dict[str, float]) -> None:
        model.get_env().env_method("set_reward_weights", **changed)

    return ManagerSB3Callback(
        objective="maximize:eval/safe_success",
        apply_at=Boundary.EVAL,
        live=recipe.reward_weights(),
        on_live=set_weights,
        bounds=MANAGED_BOUNDS,
        keep_best=True,
        eval_window=eval_every // 2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="baseline")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--experiment", default="mujoco-reacher")
    parser.add_argument("--variant", default="unmanaged", help="the run's variant tag")
    parser.add_argument("--out", type=Path, default=None, help="directory for the filmstrip")
    parser.add_argument("--filmstrip", action="store_true", help="render the final policy")
    parser.add_argument("--managed", action="store_true", help="add the manager's callback")
    parser.add_argument("--updates", type=int, help="override the preset's PPO updates")
    parser.add_argument("--eval-every", type=int, help="override the preset's evaluation period")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    recipe, preset = RECIPES[args.recipe], PRESETS[args.preset]
    overrides = {"updates": args.updates, "eval_every": args.eval_every}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    tracking_uri = args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='mlruns-')}/mlflow.db"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(args.experiment)
    started = time.perf_counter()
    tags = {"recipe": args.recipe, "variant": args.variant, "seed": str(args.seed)}
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params({**asdict(recipe), **asdict(preset), "preset": args.preset})
        model = build_model(recipe, preset, args.seed)
        evaluation = SplitEvaluation(preset.eval_every, preset.eval_episodes)
        metrics = TrainingMetrics(run.info.run_id, tracking_uri)
        callbacks: list[BaseCallback] = [metrics, evaluation]
        if args.managed:
            manager = manager_callback(model, recipe, preset.eval_every)
            evaluation.on_evaluated.append(manager.on_evaluation)
            callbacks.append(manager)
        model.learn(preset.env_steps, callback=callbacks)
        if args.filmstrip:
            strip = filmstrip(model, args.out or Path(tempfile.mkdtemp(prefix="reacher-")))
            if strip is not None:
                mlflow.log_artifact(str(strip))
        model.get_env().close()
    final = evaluation.last
    summary = {
        "run_id": run.info.run_id,
        "tracking_uri": tracking_uri,
        "recipe": args.recipe,
        "preset": args.preset,
        "seed": args.seed,
        "safe_success": final["eval/safe_success"],
        "collision": final["eval/collision"],
        **{
            f"{split}/{name}": final[f"eval/{split}/{name}"]
            for split in EVAL_SPLITS
            for name in ("safe_success", "collision")
        },
        "best_safe_success": evaluation.best.score[0],
        "env_steps": model.num_timesteps,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
