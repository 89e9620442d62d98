"""A plain PyTorch loop that logs to MLflow without ``step=``, as many scripts do.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``python stepless_loop.py [STEPS] [SLEEP_S] [EVAL_EVERY]``; MLflow reads its tracking URI
and experiment from the environment, and the first ``log_metric`` starts the run. It prints
its last validation loss.
"""

import sys
import time

import mlflow
import torch
from torch import nn

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
eval_every = int(sys.argv[3]) if len(sys.argv) > 3 else 10
torch.manual_seed(0)
torch.set_num_threads(1)

x, x_val = torch.randn(256, 8), torch.randn(64, 8)
y, y_val = x.sum(1, keepdim=True), x_val.sum(1, keepdim=True)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

for step in range(steps):
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    mlflow.log_metrics({"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
    if step % eval_every == 0:
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(model(x_val), y_val).item()
        mlflow.log_metric("val_loss", val_loss)
    time.sleep(sleep_s)
print(f"val_loss {val_loss:.4f}")
