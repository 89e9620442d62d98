"""A ``pytorch_lightning`` script (Lightning's older package name) logging to CSV files only.

Test data: an unmodified training script that knows nothing of the manager and logs to no
tracker the manager reads. Usage: ``python lightning_csv.py [MAX_STEPS]``.
"""

import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data(n: int) -> DataLoader:
    x = torch.randn(n, 8)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        max_steps=int(sys.argv[1]) if len(sys.argv) > 1 else 100,
        val_check_interval=20,
        check_val_every_n_epoch=None,
        logger=CSVLogger("logs"),
        accelerator="cpu",
        enable_progress_bar=False,
    )
    trainer.fit(Regressor(), data(1024), data(128))
    print(f"trained {trainer.global_step} steps")
