"""A plain PyTorch loop counting its steps from 0, logging its lr after ``optimizer.step()``.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``python zero_based_loop.py [STEPS] [SLEEP_S]``; MLflow reads its tracking URI and run from
the environment.
"""

import sys
import time

import mlflow
import torch
from torch import nn

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
torch.manual_seed(0)
torch.set_num_threads(1)

x = torch.randn(256, 8)
y = x.sum(1, keepdim=True)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000, gamma=0.5)

for step in range(steps):
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    mlflow.log_metric("lr", optimizer.param_groups[0]["lr"], step=step)
    mlflow.log_metric("loss", loss.item(), step=step)
    schedule.step()
    time.sleep(sleep_s)
