"""TinyStories: a GPT-2-style causal LM trained with transformers' ``Trainer``, logged to MLflow.

A recipe, top to bottom: pick a preset, load stories, train a tokenizer, build the model from a
config, train. It knows nothing about the manager; supervise it unmodified with::

    atm run -- python train_scripts/tinystories.py --preset cpu

Stories come from the ``roneneldan/TinyStories`` data set through ``datasets`` when it is
installed and the network allows, from a local TinyStories text file (``--data``, stories
separated by ``<|endoftext|>``), or, offline, from the project's story generator; the run's
``data.source`` tag says which. The presets' recipes overfit on purpose (a small training set,
a constant high learning rate, no regularisation): the failure a supervisor should catch.
``--plateau`` turns on what a careful engineer adds without a supervisor: ``ReduceLROnPlateau``
on eval loss, early stopping, and the best checkpoint restored at the end.

The last line printed is a JSON summary of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from manager_daemon.demo.lm import LMRecipe, prepare_texts, training_arguments
from manager_daemon.demo.stories import generate_stories

log = logging.getLogger("tinystories")

HF_DATASET = "roneneldan/TinyStories"
STORY_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Preset:
    recipe: LMRecipe
    about: str


# Each preset trains the same kind of model on a training set small enough to memorise, at a
# constant learning rate with no regularisation, for several times the steps its eval loss
# needs to bottom out. The eval split is larger than the train split so its loss is steady.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        LMRecipe(
            n_train_stories=30,
            n_eval_stories=120,
            vocab_size=512,
            block_size=64,
            n_layer=1,
            n_embd=96,
            n_head=2,
            dropout=0.0,
            learning_rate=3e-3,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=280,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=64,
            eval_steps=20,
            logging_steps=10,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=5,
            seed=0,
        ),
        "CI: a 1-layer model, about 20 s per run on one core; overfits from step 140",
    ),
    "cpu": Preset(
        LMRecipe(
            n_train_stories=60,
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
            max_steps=600,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=64,
            eval_steps=30,
            logging_steps=10,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=10,
            seed=0,
        ),
        "2 CPU cores: a 2-layer, 0.5M-parameter model, 600 steps, about a minute per run",
    ),
    "gpu": Preset(
        LMRecipe(
            n_train_stories=20_000,
            n_eval_stories=5_000,
            vocab_size=8192,
            block_size=256,
            n_layer=8,
            n_embd=512,
            n_head=8,
            dropout=0.0,
            learning_rate=1e-3,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=30_000,
            per_device_train_batch_size=64,
            per_device_eval_batch_size=128,
            eval_steps=500,
            logging_steps=100,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=500,
            seed=0,
        ),
        "one GPU: an 8-layer, 512-wide model (about 30M parameters) on 20k real stories",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, help="override the preset's")
    parser.add_argument("--weight-decay", type=float, help="override the preset's")
    parser.add_argument("--dropout", type=float, help="override the preset's")
    parser.add_argument("--max-steps", type=int, help="override the preset's")
    parser.add_argument(
        "--source",
        choices=["auto", "hf", "file", "generated"],
        default="auto",
        help="auto: --data if given, else the Hugging Face data set if reachable, else generated",
    )
    parser.add_argument("--data", type=Path, help="a TinyStories text file (file source)")
    parser.add_argument("--plateau", action="store_true", help="ReduceLROnPlateau + early stop")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--experiment", default="tinystories")
    parser.add_argument("--run-name")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--output-dir", type=Path, help="checkpoints (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.source == "file" and args.data is None:
        parser.error("--source file needs --data PATH")
    if args.data is not None and not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    for tag in args.tag:
        if "=" not in tag:
            parser.error(f"--tag {tag!r}: expected KEY=VALUE")
    return args


# ---- data ---------------------------------------------------------------------------------


def load_stories(args: argparse.Namespace, recipe: LMRecipe) -> tuple[list[str], list[str], str]:
    """Train and eval stories and where they came from (``hf``, ``file`` or ``generated``)."""
    n_train, n_eval = recipe.n_train_stories, recipe.n_eval_stories
    source = "file" if args.source == "auto" and args.data else args.source
    if source == "file":
        stories = _split_stories(args.data.read_text(encoding="utf-8"))
        if len(stories) < n_train + n_eval:
            sys.exit(f"{args.data} has {len(stories)} stories; the preset needs {n_train + n_eval}")
        return stories[:n_train], stories[-n_eval:], "file"
    if source in ("auto", "hf"):
        try:
            return (*_hf_stories(n_train, n_eval), "hf")
        except Exception as exc:
            if source == "hf":
                sys.exit(f"cannot load {HF_DATASET}: {exc}")
            log.warning("%s unavailable (%s); using generated stories", HF_DATASET, exc)
    train = generate_stories(n_train, seed=2 * args.seed)
    return train, generate_stories(n_eval, seed=2 * args.seed + 1), "generated"


def _hf_stories(n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    from datasets import load_dataset  # optional: only for users with the network

    train = load_dataset(HF_DATASET, split=f"train[:{n_train}]")["text"]
    evals = load_dataset(HF_DATASET, split=f"validation[:{n_eval}]")["text"]
    return list(train), list(evals)


def _split_stories(text: str) -> list[str]:
    return [s.strip() for s in text.split(STORY_SEPARATOR) if s.strip()]


# ---- training -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "dropout": args.dropout,
        "max_steps": args.max_steps,
    }
    recipe = dataclasses.replace(
        PRESETS[args.preset].recipe,
        seed=args.seed,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    train_texts, eval_texts, source = load_stories(args, recipe)
    # A tokenizer trained locally on the train stories, the datasets, a fresh GPT-2 model.
    data = prepare_texts(recipe, train_texts, eval_texts, recipe.seed)

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=args.run_name) as run:
        print(f"TINYSTORIES_RUN {run.info.run_id}", flush=True)
        mlflow.set_tags(
            {
                "data.source": source,
                "preset": args.preset,
                "recipe": "plateau" if args.plateau else "fixed",
                "seed": str(args.seed),
                **dict(t.split("=", 1) for t in args.tag),
            }
        )
        mlflow.log_params(
            {"n_params": data.model.num_parameters(), "train_blocks": len(data.train_dataset)}
        )
        trainer = Trainer(
            model=data.model,
            args=_arguments(recipe, args, str(args.output_dir or tmp)),
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=5)] if args.plateau else [],
        )
        metrics = trainer.train().metrics
        curve = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        final = trainer.evaluate()["eval_loss"]
        summary = {
            "run_id": run.info.run_id,
            "data_source": source,
            "final_eval_loss": final,
            "best_eval_loss": min([*curve, final]),
            "steps": trainer.state.global_step,
            "steps_per_s": metrics["train_steps_per_second"],
        }
        mlflow.log_metric("final_eval_loss", final, step=trainer.state.global_step)
    print(json.dumps(summary), flush=True)
    return summary


def _arguments(recipe: LMRecipe, args: argparse.Namespace, output_dir: str) -> TrainingArguments:
    wandb = ["wandb"] if os.environ.get("WANDB_PROJECT") or os.environ.get("WANDB_API_KEY") else []
    common = {"report_to": ["mlflow", *wandb], "run_name": args.run_name}
    if not args.plateau:
        return training_arguments(recipe, output_dir, **common)
    # Halve the lr after two evaluations without improvement; stop after five; keep the best.
    return training_arguments(
        recipe,
        output_dir,
        **common,
        lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"factor": 0.5, "patience": 2},
        save_strategy="steps",
        save_steps=recipe.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )


if __name__ == "__main__":
    main()
