"""``BestState``: what ``rollback_to_best`` restores, on a real model and Adam optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from integrations.protocol import Objective
from integrations.torch_ops import BestState


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()


def test_restores_weights_and_moments_of_the_best_evaluation_but_keeps_the_current_lr() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    best = BestState(Objective.parse("minimize:eval_loss").better)
    train_steps(model, opt, 3)
    assert best.offer(1.0, 30, model, opt)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    train_steps(model, opt, 3)
    assert not best.offer(1.5, 60, model, opt), "a worse evaluation must not replace the best"
    assert not torch.equal(model.weight, weights["weight"])
    opt.param_groups[0]["lr"] = 2.5e-3  # the manager's new value, set after the best

    assert best.restore(model, opt) == 30
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], moments)
    assert opt.param_groups[0]["lr"] == 2.5e-3
    train_steps(model, opt, 1)  # the restored optimizer still steps


def test_maximize_objectives_keep_the_highest_value() -> None:
    model = nn.Linear(2, 1)
    best = BestState(Objective.parse("maximize:eval/safe_success").better)
    assert best.offer(0.2, 1, model, None) and best.offer(0.5, 2, model, None)
    assert not best.offer(0.4, 3, model, None)
    assert (best.value, best.step) == (0.5, 2)


def test_nothing_to_restore_before_an_evaluation_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="nothing to roll back to"):
        BestState(Objective.parse("minimize:eval_loss").better).restore(nn.Linear(2, 1), None)


def test_large_models_need_an_explicit_opt_in() -> None:
    small = nn.Linear(2, 1)
    assert BestState.worth_keeping(small, None)
    assert not BestState.worth_keeping(small, False)
    big = nn.Embedding(60_000_000, 1, _freeze=True, device="meta")
    assert not BestState.worth_keeping(big, None) and BestState.worth_keeping(big, True)
