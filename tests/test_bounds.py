"""Bounds a user gives (a bounds file, ``bounds=`` in code): checked whole before anything
starts, and refused in one clear line in the training process when the run's knobs cannot
honour them. Bounds files under `atm run` are in ``test_atm_run``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from integrations.knobs import parse_bounds
from integrations.protocol import SPEC_PATH, TAG_MANAGED, RunSpec, Scale
from integrations.torch_hooks import TorchKnobs
from tests.conftest import Backend


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"learning_rate": {"min": 1e-2, "max": 1e-4}}, "knob 'learning_rate': min 0.01 is above"),
        ({"learning_rate": {"min": 0}}, "knob 'learning_rate': min 0 on a log scale"),
        ({"aux_weight": {"min": -1, "scale": "log"}}, "knob 'aux_weight': min -1 on a log scale"),
        (
            {"learning_rat": {"max": 1e-2}},
            "knob 'learning_rat': no such knob; did you mean 'learning",
        ),
        ({"weight-decay": {"max": 0.1}}, "did you mean 'weight_decay'?"),
        ({"lr": {"max": 0.1}}, "did you mean 'learning_rate'?"),  # a logged name, not the knob
        ({"learning_rate": {"maxx": 1e-2}}, "knob 'learning_rate': unknown field 'maxx'; did you"),
        ({"learning_rate": 1e-3}, "knob 'learning_rate': expected {min, max, max_rel_step, "),
        ({"dropout": {"max": float("nan")}}, "knob 'dropout': max: Input should be a finite"),
        ({"dropout": {"max_rel_step": 0}}, "knob 'dropout': max_rel_step: Input should be greater"),
        (["learning_rate"], "bounds map knob names to"),
    ],
)
def test_bounds_that_can_never_be_honoured_are_refused_in_one_line(
    bounds: object, message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        parse_bounds(bounds)
    assert str(refused.value).startswith(message) or message in str(refused.value)
    assert "\n" not in str(refused.value) and "<Knob" not in str(refused.value)


def test_a_scripts_own_knob_and_a_linear_lr_are_accepted() -> None:
    bounds = {
        "aux_weight": {"min": 0, "max": 2},  # known only once the script runs
        "learning_rate": {"min": 0, "max": 1e-2, "scale": "lin"},
        "dropout": None,
    }
    assert parse_bounds(bounds) == {
        "aux_weight": {"min": 0.0, "max": 2.0},
        "learning_rate": {"min": 0.0, "max": 1e-2, "scale": "lin"},
        "dropout": {},
    }


def _loop(backend: Backend, bounds: dict[str, Any], lr: float = 0.01) -> tuple[TorchKnobs, str]:
    run_id = backend.new_run()
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    knobs = TorchKnobs(optimizer=optimizer, live={"aux_weight": 0.5}, bounds=bounds)
    return knobs.start(run_id, backend.uri, poll_interval=0.05), run_id


@pytest.mark.parametrize(
    ("bounds", "lr", "reason"),
    [
        (
            {"dropout": {"max": 0.3}},
            0.01,
            "bounds given for dropout, which this run does not have (its knobs: learning_rate, "
            "weight_decay, aux_weight)",
        ),
        (
            {"learning_rate": {"min": 1e-3, "max": 1e-2}},
            1e-4,
            "learning_rate starts at 0.0001, outside its bounds [0.001, 0.01]",
        ),
    ],
)
def test_bounds_the_runs_knobs_cannot_honour_leave_it_unmanaged_saying_so_once(
    memory: Backend,
    caplog: pytest.LogCaptureFixture,
    bounds: dict[str, Any],
    lr: float,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING)
    knobs, run_id = _loop(memory, bounds, lr)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"atm: bounds_refused: {reason}; the run is not managed (training goes on): fix the "
        "bounds and start it again"
    ]
    assert knobs.client is None
    # Nothing published, nothing marked: no decision can go where the user said it must not.
    assert TAG_MANAGED not in memory.tracker.get_run(run_id).tags
    assert memory.tracker.read_json(run_id, SPEC_PATH) is None
    assert knobs.step(1) is None and knobs["aux_weight"] == 0.5  # training goes on
    knobs.close()


def test_bounds_the_run_can_honour_are_in_its_published_spec(memory: Backend) -> None:
    bounds = {"learning_rate": {"max": 0.05}, "aux_weight": {"min": 0, "max": 2}}
    knobs, run_id = _loop(memory, bounds)
    try:
        assert knobs.client is not None
        spec = RunSpec.model_validate(memory.tracker.read_json(run_id, SPEC_PATH))
        lr, aux = spec.knob("learning_rate"), spec.knob("aux_weight")
        assert lr is not None and lr.max == 0.05 and lr.scale is Scale.LOG
        # A range down to 0 for a script's own knob: a linear scale, not a log one it cannot be.
        assert aux is not None and (aux.min, aux.max, aux.scale) == (0.0, 2.0, Scale.LIN)
    finally:
        knobs.close()


def _hf(bounds: dict[str, Any]) -> object:
    from integrations.hf import ManagerCallback

    return ManagerCallback(bounds=bounds)


def _sb3(bounds: dict[str, Any]) -> object:
    from integrations.sb3 import ManagerSB3Callback

    return ManagerSB3Callback(bounds=bounds)


@pytest.mark.parametrize("make", [lambda b: TorchKnobs(bounds=b), _hf, _sb3])
def test_bounds_in_code_are_checked_where_they_are_given(
    make: Callable[[dict[str, Any]], object],
) -> None:
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        make({"learning_rat": {"max": 1e-2}})
    with pytest.raises(ValueError, match=r"min 1 is above max 0\.1"):
        make({"learning_rate": {"min": 1, "max": 0.1}})
