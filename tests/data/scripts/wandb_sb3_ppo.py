"""A stable-baselines3 PPO script that logs to Weights & Biases itself, with ``wandb.log``.

Test data: an unmodified training script that knows nothing of the manager. PPO on
CartPole; at each rollout end it logs the optimizer's learning rate, the entropy coefficient
and the mean episode reward. W&B reads its server, entity and project from the environment.
Usage: ``python wandb_sb3_ppo.py [TIMESTEPS] [SLEEP_S]``.
"""

import sys
import time

import numpy as np
import torch
import wandb
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

timesteps = int(sys.argv[1]) if len(sys.argv) > 1 else 6000
sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
torch.set_num_threads(1)


class LogToWandb(BaseCallback):
    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        episodes = [info["r"] for info in self.model.ep_info_buffer]
        metrics = {
            "lr": self.model.policy.optimizer.param_groups[0]["lr"],
            "ent_coef": float(self.model.ent_coef),
        }
        if episodes:
            metrics["mean_reward"] = float(np.mean(episodes))
        wandb.log(metrics, step=self.num_timesteps)
        time.sleep(sleep_s)


with wandb.init(config={"algo": "PPO", "env": "CartPole-v1"}):
    model = PPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=128,
        batch_size=64,
        n_epochs=2,
        ent_coef=0.01,
        policy_kwargs={"net_arch": [16]},
        device="cpu",
        seed=0,
    )
    model.learn(total_timesteps=timesteps, callback=LogToWandb())
