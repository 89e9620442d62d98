"""A plain PyTorch loop that logs to no tracker: it prints its loss.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``python unlogged_loop.py [STEPS]``.
"""

import sys

import torch
from torch import nn

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
torch.manual_seed(0)
torch.set_num_threads(1)

x = torch.randn(256, 8)
y = x.sum(1, keepdim=True)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

for step in range(steps):
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 100 == 0:
        print(f"step {step} loss {loss.item():.4f}")
print(f"done: {steps} steps, loss {loss.item():.4f}")
