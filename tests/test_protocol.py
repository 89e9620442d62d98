"""The contract's models: parsing, bounds, signatures."""

from __future__ import annotations

import math
import re

import pytest
from pydantic import ValidationError

from integrations.protocol import (
    KnobSpec,
    Objective,
    ParamsVersion,
    RunSpec,
    Scale,
    Source,
    audit_path,
    params_path,
    parse_audit_path,
)


def test_paths_follow_the_contract() -> None:
    assert params_path(7) == "atm/params/v000007.json"
    assert audit_path(12) == "atm/audit/d000012.json"
    assert parse_audit_path("atm/audit/d000012.json") == 12
    assert parse_audit_path("atm/audit/notes.txt") is None


@pytest.mark.parametrize("text", ["eval_loss", "maximize:", ":x", "maximize: ", "up:eval_loss"])
def test_objective_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="minimize:METRIC"):
        Objective.parse(text)


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("minimize: val_loss", "minimize:val_loss"),  # a metric never logged by that name
        ("minimize :val_loss", "minimize:val_loss"),
        ("maximize:eval/accuracy ", "maximize:eval/accuracy"),
        ("minimise:val_loss", "minimize:val_loss"),
        ("Maximize:reward", "maximize:reward"),
        ("min:val_loss", "minimize:val_loss"),
    ],
)
def test_objective_with_spaces_or_a_misspelt_direction_suggests_the_one_meant(
    text: str, meant: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"did you mean '{meant}'")) as refused:
        Objective.parse(text)
    assert "\n" not in str(refused.value)


def test_objective_direction() -> None:
    assert Objective.parse("minimize:eval_loss").better(1.0, 2.0)
    assert Objective.parse("maximize:eval/safe_success").better(0.9, 0.5)
    assert str(Objective.parse("maximize:eval/safe_success")) == "maximize:eval/safe_success"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(value=1.0, min=2.0, max=1.0), "above max"),
        (dict(value=0.5, min=0.0, max=1.0, scale=Scale.LOG), "log-scale knob needs min > 0"),
        (dict(value=5.0, min=0.0, max=1.0), "outside"),
        (dict(value=math.nan, min=0.0, max=1.0), "finite"),
    ],
)
def test_knob_spec_rejects_inconsistent_bounds(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KnobSpec(name="k", max_rel_step=1.0, **fields)


def test_step_limits_log_and_linear() -> None:
    lr = KnobSpec(
        name="learning_rate", value=1e-3, min=1e-6, max=1e-2, max_rel_step=1.0, scale="log"
    )
    assert lr.step_limits(1e-3) == pytest.approx((5e-4, 2e-3))
    wd = KnobSpec(name="weight_decay", value=0.0, min=0.0, max=0.5, max_rel_step=0.2)
    assert wd.step_limits(0.0) == pytest.approx((0.0, 0.1))


def test_run_spec_rejects_duplicate_knobs() -> None:
    knob = KnobSpec(name="dropout", value=0.1, min=0, max=0.5, max_rel_step=0.2)
    with pytest.raises(ValidationError, match="duplicate"):
        RunSpec(framework="torch", knobs=[knob, knob])


def _params(**kw: object) -> ParamsVersion:
    fields = dict(
        version=2,
        parent_version=1,
        issued_at=1.0,
        source=Source.RULES,
        decision_id=3,
        values={"learning_rate": 1e-4},
    )
    fields.update(kw)
    return ParamsVersion(**fields)  # type: ignore[arg-type]


def test_digest_signature_detects_tampering() -> None:
    signed = _params().signed(None)
    assert signed.signature.startswith("sha256:")
    assert signed.signature_problem(None) is None
    tampered = signed.model_copy(update={"values": {"learning_rate": 1.0}})
    assert "tampered" in (tampered.signature_problem(None) or "")


def test_hmac_signature_needs_the_shared_key() -> None:
    signed = _params().signed("secret")
    assert signed.signature.startswith("hmac-sha256:")
    assert signed.signature_problem("secret") is None
    assert "tampered" in (signed.signature_problem("other") or "")
    assert "lacks" in (signed.signature_problem(None) or "")
    assert "shared key" in (_params().signed(None).signature_problem("secret") or "")
    assert "missing" in (_params().signature_problem(None) or "")
