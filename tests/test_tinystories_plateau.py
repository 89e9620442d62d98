"""``tinystories.py --plateau`` warms up exactly as the fixed recipe's ``constant_with_warmup``."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from transformers import TrainerControl, TrainerState, get_constant_schedule_with_warmup

from train_scripts.tinystories import PlateauWarmup


def test_plateau_warmup_follows_the_fixed_recipes_schedule() -> None:
    lr, warmup = 3e-3, 10
    fixed = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_constant_schedule_with_warmup(fixed, warmup)
    plateau = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    callback = PlateauWarmup(lr, warmup)
    for step in range(15):
        state = TrainerState(global_step=step)
        callback.on_step_begin(None, state, TrainerControl(), optimizer=plateau)  # type: ignore[arg-type]
        assert plateau.param_groups[0]["lr"] == pytest.approx(fixed.param_groups[0]["lr"])
        fixed.step()  # no gradients: nothing moves, but the scheduler sees the usual order
        schedule.step()
    # After the warmup the callback leaves the lr to ReduceLROnPlateau.
    plateau.param_groups[0]["lr"] = lr / 2
    callback.on_step_begin(None, TrainerState(global_step=20), TrainerControl(), optimizer=plateau)  # type: ignore[arg-type]
    assert plateau.param_groups[0]["lr"] == lr / 2
