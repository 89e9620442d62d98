"""A transformers ``Trainer`` script that reports to Weights & Biases (``report_to=["wandb"]``).

Test data: an unmodified training script that knows nothing of the manager. A one-layer
GPT-2 learns random token sequences; W&B reads its server, entity and project from the
environment. Usage: ``python wandb_hf_trainer.py OUTPUT_DIR [STEPS] [SLEEP_S]``.
"""

import sys
import time

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

output_dir = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
sleep_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
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
    save_strategy="no",
    report_to=["wandb"],
    use_cpu=True,
    disable_tqdm=True,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=Tokens(256, 0),
    eval_dataset=Tokens(32, 1),
    callbacks=[Pace()],
)
trainer.train()
