"""Ranks that step together only through the manager: the three-line ``TorchKnobs`` integration
on a ``torch.distributed`` world (gloo), without DDP, so the only collective is the manager's.

Test data for a rank that dies: the survivors must not wait on the manager. Usage, with the
variables torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
``python ranks_loop.py TRACE_DIR [STEPS] [SLEEP_S]``; each rank writes the learning rate it uses
at every step and when the step began (``time.monotonic()``) to TRACE_DIR/rankN.jsonl, and
``{"done": true}`` when its loop has finished.
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

from integrations.torch_hooks import TorchKnobs

trace_dir = Path(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
sleep_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)

model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
knobs = TorchKnobs(optimizer=optimizer, model=model).start()
trace_dir.mkdir(parents=True, exist_ok=True)
trace = (trace_dir / f"rank{rank}.jsonl").open("w")

for step in range(1, steps + 1):
    began = time.monotonic()
    knobs.step(step)
    lr = optimizer.param_groups[0]["lr"]
    x = torch.randn(64, 8)
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    trace.write(json.dumps({"step": step, "lr": lr, "t": began}) + "\n")
    trace.flush()
    if rank == 0 and step % 10 == 0:
        mlflow.log_metrics({"loss": loss.item()}, step=step)
    time.sleep(sleep_s)

knobs.close()
trace.write(json.dumps({"done": True}) + "\n")
trace.close()
