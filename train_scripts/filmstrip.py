"""Render a saved ReacherObstacle policy into a PNG strip of frames from one episode.

Run as its own process with ``MUJOCO_GL`` set, because MuJoCo binds its OpenGL backend on
import; exits non-zero when rendering fails, so the caller can try another backend::

    MUJOCO_GL=egl python -m train_scripts.filmstrip POLICY.zip OUT.png [--frames 6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from stable_baselines3 import PPO

from train_scripts.reacher_obstacle import EVAL_SPLITS, ReacherObstacleEnv


def episode_frames(model: PPO, difficulty: str, seed: int, frames: int) -> list[np.ndarray]:
    """``frames`` evenly spaced frames of one deterministic episode, the last frame included."""
    env = ReacherObstacleEnv(difficulty, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    shots = [env.render()]
    done = False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, _, terminated, truncated, _ = env.step(action)
        shots.append(env.render())
        done = terminated or truncated
    env.close()
    picks = np.linspace(0, len(shots) - 1, min(frames, len(shots))).round().astype(int)
    return [shots[i] for i in picks]


def save_strip(frames: list[np.ndarray], path: Path) -> None:
    """Frames side by side, separated by a thin white gap, as one PNG."""
    gap = np.full((frames[0].shape[0], 4, 3), 255, dtype=np.uint8)
    strip = np.concatenate([part for frame in frames for part in (frame, gap)][:-1], axis=1)
    try:
        from PIL import Image

        Image.fromarray(strip).save(path)
    except ImportError:
        import matplotlib.pyplot as plt

        plt.imsave(path, strip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--split", choices=sorted(EVAL_SPLITS), default="hard")
    args = parser.parse_args()
    difficulty, seed, _ = EVAL_SPLITS[args.split]
    model = PPO.load(args.policy, device="cpu")
    save_strip(episode_frames(model, difficulty, seed, args.frames), args.png)


if __name__ == "__main__":
    main()
