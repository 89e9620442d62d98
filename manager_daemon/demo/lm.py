"""A tiny GPT-2-style causal language model for the offline demo.

Everything here runs on CPU without network access: the byte-level BPE tokenizer is trained
locally on generated stories, the model is built from a fresh ``GPT2Config``, and the datasets
are plain ``torch`` datasets that the default data collator of ``transformers.Trainer`` accepts.

``DEMO_RECIPE`` is calibrated so that an unmanaged run visibly overfits within about a minute on
two CPU cores: eval loss bottoms out early and then climbs while train loss keeps falling. That
gives a supervisor something real to notice and correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from manager_daemon.demo.stories import generate_stories

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; ``<|endoftext|>`` is both eos and pad."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seed with every byte so any text round-trips, even characters unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_positions: int,
    dropout: float,
    seed: int,
) -> GPT2LMHeadModel:
    """Build a freshly initialised GPT-2 model sized for ``tokenizer``'s vocabulary."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed locally so the initial weights depend only on ``seed``, not on earlier RNG use.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


class BlockDataset(Dataset):
    """Fixed-length token blocks for causal LM training; labels equal the inputs."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        # The model shifts labels itself, so labels are a plain copy of the inputs.
        return {"input_ids": block, "labels": block.clone()}


def _blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], block_size: int) -> torch.Tensor:
    joined = tokenizer.eos_token.join(texts) + tokenizer.eos_token
    ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one block of {block_size}")
    # The tail shorter than a block is dropped so every item has the same length.
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def build_datasets(
    tokenizer: PreTrainedTokenizerFast,
    train_texts: list[str],
    eval_texts: list[str],
    block_size: int,
) -> tuple[BlockDataset, BlockDataset]:
    """Tokenize each split, joined with eos, into blocks of ``block_size`` tokens."""
    return (
        BlockDataset(_blocks(tokenizer, train_texts, block_size)),
        BlockDataset(_blocks(tokenizer, eval_texts, block_size)),
    )


@dataclass(frozen=True)
class LMRecipe:
    """Every size and hyperparameter of one demo training run."""

    n_train_stories: int
    n_eval_stories: int
    vocab_size: int
    block_size: int
    n_layer: int
    n_embd: int
    n_head: int
    dropout: float
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    max_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    eval_steps: int
    logging_steps: int
    lr_scheduler_type: str
    warmup_steps: int
    seed: int


# Calibrated on CPU (a run takes about 20 s on two idle cores, 35 s on one core): no
# regularisation, 80 train stories seen for about 36 epochs at a constant learning rate. Eval loss
# bottoms out near step 120 of 320 and then climbs by about a quarter while train loss keeps
# falling towards zero. The vocabulary is near word level for this corpus, which keeps sequences
# short; the eval split is three times the train split so its loss is a steady signal.
DEMO_RECIPE = LMRecipe(
    n_train_stories=80,
    n_eval_stories=250,
    vocab_size=768,
    block_size=128,
    n_layer=2,
    n_embd=128,
    n_head=4,
    dropout=0.0,
    learning_rate=3e-3,
    weight_decay=0.0,
    max_grad_norm=1.0,
    max_steps=320,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=64,
    eval_steps=20,
    logging_steps=10,
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=10,
    seed=0,
)


class Prepared(NamedTuple):
    """Everything ``Trainer`` needs for one run of a recipe."""

    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast
    train_dataset: BlockDataset
    eval_dataset: BlockDataset


def prepare(recipe: LMRecipe, seed: int | None = None) -> Prepared:
    """Generate the stories, train the tokenizer, and build the model and datasets.

    ``seed`` overrides ``recipe.seed``; train and eval stories use distinct derived seeds.
    """
    seed = recipe.seed if seed is None else seed
    train_texts = generate_stories(recipe.n_train_stories, seed=2 * seed)
    eval_texts = generate_stories(recipe.n_eval_stories, seed=2 * seed + 1)
    return prepare_texts(recipe, train_texts, eval_texts, seed)


def prepare_texts(
    recipe: LMRecipe, train_texts: list[str], eval_texts: list[str], seed: int
) -> Prepared:
    """Train the tokenizer on ``train_texts`` and build the model and both datasets."""
    tokenizer = train_tokenizer(train_texts, vocab_size=recipe.vocab_size)
    train_dataset, eval_dataset = build_datasets(
        tokenizer, train_texts, eval_texts, recipe.block_size
    )
    model = build_model(
        tokenizer,
        n_layer=recipe.n_layer,
        n_embd=recipe.n_embd,
        n_head=recipe.n_head,
        n_positions=recipe.block_size,
        dropout=recipe.dropout,
        seed=seed,
    )
    return Prepared(model, tokenizer, train_dataset, eval_dataset)


def training_arguments(recipe: LMRecipe, output_dir: str, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` for ``recipe`` on CPU; ``overrides`` win over the defaults here."""
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
        "max_grad_norm": recipe.max_grad_norm,
        "max_steps": recipe.max_steps,
        "per_device_train_batch_size": recipe.per_device_train_batch_size,
        "per_device_eval_batch_size": recipe.per_device_eval_batch_size,
        "lr_scheduler_type": recipe.lr_scheduler_type,
        "warmup_steps": recipe.warmup_steps,
        "eval_strategy": "steps",
        "eval_steps": recipe.eval_steps,
        "logging_strategy": "steps",
        "logging_steps": recipe.logging_steps,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": recipe.seed,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
