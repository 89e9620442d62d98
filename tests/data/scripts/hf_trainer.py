"""A transformers ``Trainer`` script that reports to MLflow (``report_to=["mlflow"]``).

Test data: an unmodified training script that knows nothing of the manager. A one-layer
GPT-2 learns random token sequences. Usage: ``python hf_trainer.py OUTPUT_DIR [STEPS] [SLEEP_S]
[--save-steps N] [--resume] [--trace DIR]``: ``--resume`` continues from the last checkpoint in
OUTPUT_DIR; ``--trace`` writes each rank's learning rate after every step to DIR/rankN.jsonl.
Runs under ``torchrun`` as it is (the Trainer sets up the ranks).
"""

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

parser = argparse.ArgumentParser()
parser.add_argument("output_dir")
parser.add_argument("steps", nargs="?", type=int, default=200)
parser.add_argument("sleep_s", nargs="?", type=float, default=0.05)
parser.add_argument("--save-steps", type=int, default=0)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--trace", type=Path)
options = parser.parse_args()
output_dir, steps, sleep_s = options.output_dir, options.steps, options.sleep_s
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
torch.manual_seed(0)
torch.set_num_threads(1)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Pace(TrainerCallback):
    """Slows steps down a little, as a bigger model would be."""

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(sleep_s)


class Trace(TrainerCallback):
    """Records this rank's learning rate after every optimizer step."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = (folder / f"rank{os.environ.get('RANK', '0')}.jsonl").open("a")

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        lr = optimizer.param_groups[0]["lr"]
        self.file.write(json.dumps({"step": state.global_step, "lr": lr}) + "\n")
        self.file.flush()


model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
args = TrainingArguments(
    output_dir=output_dir,
    max_steps=steps,
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    weight_decay=0.01,
    lr_scheduler_type="constant",
    eval_strategy="steps",
    eval_steps=10,
    logging_steps=5,
    save_strategy="steps" if options.save_steps else "no",
    save_steps=options.save_steps or 500,
    report_to=["mlflow"],
    use_cpu=True,
    disable_tqdm=True,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=Tokens(256, 0),
    eval_dataset=Tokens(32, 1),
    callbacks=[Pace()] + ([Trace(options.trace)] if options.trace else []),
)
trainer.train(resume_from_checkpoint=options.resume or None)
