"""A plain PyTorch loop that logs to Weights & Biases with ``wandb.log`` and no ``step=``.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``python wandb_stepless_loop.py [STEPS] [SLEEP_S]``; W&B reads its server, entity and project
from the environment, and numbers the rows itself.
"""

import sys
import time

import torch
import wandb
from torch import nn

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
torch.manual_seed(0)
torch.set_num_threads(1)

x, x_eval = torch.randn(256, 8), torch.randn(64, 8)
y, y_eval = x.sum(1, keepdim=True), x_eval.sum(1, keepdim=True)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

run = wandb.init()
for step in range(steps):
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    wandb.log({"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
    if step % 10 == 0:
        with torch.no_grad():
            wandb.log({"eval_loss": nn.functional.mse_loss(model(x_eval), y_eval).item()})
    time.sleep(sleep_s)
run.finish()
