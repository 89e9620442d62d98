"""A plain PyTorch DDP loop (``torchrun``, gloo on the CPU) that logs to MLflow from rank 0.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``torchrun --nproc-per-node N ddp_loop.py TRACE_DIR [STEPS] [SLEEP_S]``; each rank writes its
learning rate at every step to TRACE_DIR/rankN.jsonl. Rank 0 logs with
``mlflow.log_metrics`` only, every 10 steps (the tracking URI and run come from the
environment).
"""

import json
import logging
import sys
import time
from pathlib import Path

import mlflow
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

trace_dir = Path(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
sleep_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)

model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
generator = torch.Generator().manual_seed(rank)
trace_dir.mkdir(parents=True, exist_ok=True)
trace = (trace_dir / f"rank{rank}.jsonl").open("w")

for step in range(steps):
    x = torch.randn(64, 8, generator=generator)
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]  # the one this step used
    schedule.step()
    trace.write(json.dumps({"step": step, "lr": lr}) + "\n")
    trace.flush()
    if rank == 0 and step % 10 == 0:
        mlflow.log_metrics({"loss": loss.item(), "lr": lr}, step=step)
    time.sleep(sleep_s)

dist.destroy_process_group()
