"""The Lightning script of lightning_mlflow.py, logging through Lightning's ``WandbLogger``.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``python wandb_lightning.py [MAX_STEPS] [SLEEP_S]``; W&B reads its server, entity and project
from the environment.
"""

import sys

import torch
from lightning.pytorch.loggers import WandbLogger
from lightning_mlflow import train

if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    max_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
    train(WandbLogger(), max_steps, sleep_s)
