"""The demo's training script: a tiny GPT-2 on generated stories, with transformers' Trainer.

It logs to MLflow like any script would; with ``--managed`` it adds the manager's callback
(the three-line integration). Run it as ``python -m manager_daemon.demo.train_lm --help``.
The last line it prints is a JSON summary (run id, final and best eval loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from transformers import Trainer, TrainerCallback

from integrations.hf import ManagerCallback
from manager_daemon.demo.lm import DEMO_RECIPE, prepare, training_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--experiment", default="atm-demo")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--managed", action="store_true", help="attach the manager's callback")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--eval-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=DEMO_RECIPE.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--step-times", default=None, help="write each training step's seconds to this JSON file"
    )
    return parser.parse_args(argv)


class StepTimes(TrainerCallback):
    """The wall time of each optimizer step, evaluations left out."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.seconds.append(time.perf_counter() - self._started)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in {
            "learning_rate": args.learning_rate,
            "max_steps": args.max_steps,
            "eval_steps": args.eval_steps,
        }.items()
        if v is not None
    }
    recipe = dataclasses.replace(DEMO_RECIPE, seed=args.seed, **overrides)
    data = prepare(recipe)
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=args.run_name) as run, tempfile.TemporaryDirectory() as out:
        print(f"ATM_DEMO_RUN {run.info.run_id}", flush=True)
        mlflow.set_tags({"demo.variant": "managed" if args.managed else "unmanaged"})
        callbacks: list[TrainerCallback] = (
            [ManagerCallback(poll_interval=args.poll_interval)] if args.managed else []
        )
        timer = StepTimes()
        callbacks.append(timer)
        trainer = Trainer(
            model=data.model,
            args=training_arguments(recipe, out, report_to=["mlflow"], run_name=args.run_name),
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            callbacks=callbacks,
        )
        trainer.train()
        history = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        final = trainer.evaluate()["eval_loss"]
        summary = {
            "run_id": run.info.run_id,
            "final_eval_loss": final,
            "best_eval_loss": min([*history, final]),
            "steps": trainer.state.global_step,
            "stopped_early": trainer.state.global_step < recipe.max_steps,
            "median_step_s": statistics.median(timer.seconds) if timer.seconds else None,
        }
    if args.step_times:
        Path(args.step_times).write_text(json.dumps(timer.seconds))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
