"""A PyTorch Lightning script that logs through Lightning's own ``MLFlowLogger``.

Test data: an unmodified training script that knows nothing of the manager. Usage:
``python lightning_mlflow.py [MAX_STEPS] [SLEEP_S]``; the logger reads its tracking URI from
``MLFLOW_TRACKING_URI`` and the script names the experiment after ``MLFLOW_EXPERIMENT_NAME``.
"""

import os
import sys
import time

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.01, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        time.sleep(self.hparams.sleep_s)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def data(n: int, seed: int) -> DataLoader:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)


def train(logger, max_steps: int, sleep_s: float) -> None:
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        log_every_n_steps=5,
        gradient_clip_val=1.0,
        logger=logger,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor(sleep_s=sleep_s), data(2048, 0), data(128, 1))
    print(f"trained {trainer.global_step} steps")


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    max_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
    logger = L.loggers.MLFlowLogger(
        experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "lightning_logs"),
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
    )
    train(logger, max_steps, sleep_s)
