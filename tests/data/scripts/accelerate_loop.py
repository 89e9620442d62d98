"""A plain PyTorch loop under Hugging Face Accelerate, logging through the Accelerator's
trackers (``log_with``) only.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``python accelerate_loop.py [STEPS] [SLEEP_S] [TRACKER]``: TRACKER is ``mlflow`` (the default;
MLflow reads its tracking URI and experiment from the environment) or ``wandb`` (W&B reads its
server, entity and project from the environment).
"""

import os
import sys
import time

import torch
from accelerate import Accelerator
from torch import nn

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
tracker = sys.argv[3] if len(sys.argv) > 3 else "mlflow"
torch.manual_seed(0)
torch.set_num_threads(1)

accelerator = Accelerator(cpu=True, log_with=tracker)
project = os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("WANDB_PROJECT") or "demo"
accelerator.init_trackers(project, config={"lr": 0.01, "weight_decay": 0.01})

x, x_eval = torch.randn(256, 8), torch.randn(64, 8)
y, y_eval = x.sum(1, keepdim=True), x_eval.sum(1, keepdim=True)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)

for step in range(1, steps + 1):
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    accelerator.backward(loss)
    optimizer.step()
    schedule.step()
    metrics = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
    if step % 10 == 0:
        with torch.no_grad():
            metrics["eval_loss"] = nn.functional.mse_loss(model(x_eval), y_eval).item()
    accelerator.log(metrics, step=step)
    time.sleep(sleep_s)
accelerator.end_training()
