"""Forged params versions, on every backend: an attacker who can write to the tracker but holds
no signing key writes a params version and bumps the tag.

The client refuses it; the writers (``atm set``, the daemon) must not take it as the run's
state either, or a later legitimate change would be measured against the forged value, signed
and applied: the forgery laundered through the legitimate path. The writers build their view
only from versions that verify; a refused version is skipped: the next legitimate version's
parent is the last one that verifies, and its number is above the forged one.
"""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from integrations.client import ManagerClient
from integrations.protocol import (
    SIGNING_KEY_ENV,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_REJECTED,
    TAG_PARAMS_VERSION,
    Boundary,
    ParamsVersion,
    Source,
    params_path,
)
from manager_daemon.audit import AuditLog
from manager_daemon.cli import app
from manager_daemon.daemon import Daemon
from manager_daemon.policies import RulesPolicy
from tests.conftest import Backend
from tests.helpers import OVERFIT_SPEC, overfitting_run

KEY = "a3f1c0de" * 8
KEYS = [pytest.param(None, id="digest"), pytest.param(KEY, id="hmac")]


def atm_set(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, key: str | None, run_id: str, *args: str
):
    if key:
        monkeypatch.setenv(SIGNING_KEY_ENV, key)
    else:
        monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    result = CliRunner().invoke(
        app, ["set", run_id, *args, "--cooldown-steps", "0", "--tracking-uri", backend.uri]
    )
    assert result.exit_code == 0, result.output
    return AuditLog(backend.tracker).records(run_id)[-1]


def forge(backend: Backend, run_id: str, version: int, payload: dict) -> None:
    """What an attacker with write access does: a params file, then the tag."""
    backend.tracker.write_json(run_id, params_path(version), payload)
    backend.tracker.set_tags(run_id, {TAG_PARAMS_VERSION: str(version)})


def version(n: int, parent: int, lr: float, **kw: object) -> ParamsVersion:
    return ParamsVersion(
        version=n,
        parent_version=parent,
        issued_at=time.time(),
        source=Source.HUMAN,
        decision_id=n,
        values={"learning_rate": lr},
        **kw,  # type: ignore[arg-type]
    )


class Trainer:
    """The training side, driven by hand: a client polled and applied at chosen moments."""

    def __init__(self, backend: Backend, run_id: str, key: str | None) -> None:
        self.backend, self.run_id = backend, run_id
        self.client = ManagerClient(run_id, OVERFIT_SPEC, tracker=backend.tracker, signing_key=key)
        self.step = 0
        self.poll()

    def poll(self) -> None:
        self.client.poll_once()
        self.step += 10
        self.client.apply_pending(Boundary.STEP, self.step, lambda values, commands: None)
        self.client.poll_once()  # delivers the ack

    @property
    def lr(self) -> float:
        return self.client.value("learning_rate")

    def tag(self, name: str) -> str | None:
        return self.backend.tracker.get_run(self.run_id).tags.get(name)


@pytest.mark.parametrize("key", KEYS)
def test_a_forged_version_is_not_laundered_through_atm_set(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    run_id = backend.new_run()
    trainer = Trainer(backend, run_id, key)
    forge(backend, run_id, 1, version(1, 0, 9e-3).model_dump(mode="json"))  # unsigned
    trainer.poll()
    assert (trainer.tag(TAG_CLIENT_REJECTED) or "").startswith("v1:")
    assert trainer.lr == pytest.approx(1e-3)

    record = atm_set(backend, monkeypatch, key, run_id, "learning_rate=5e-4")
    verdict = record.verdicts[0]
    # Measured against the run's real 1e-3, not the forged 9e-3 (which would clamp it to a
    # quarter of the forged value, 2.25e-3, above where the run really is).
    assert verdict.current == pytest.approx(1e-3)
    assert verdict.verdict == "accepted" and verdict.final == pytest.approx(5e-4)
    issued = ParamsVersion.model_validate(backend.tracker.read_json(run_id, params_path(2)))
    assert issued.version == 2 and issued.parent_version == 0
    assert issued.signature_problem(key) is None

    trainer.poll()
    assert trainer.tag(TAG_CLIENT_APPLIED_VERSION) == "2"
    assert trainer.lr == pytest.approx(5e-4)


def _unsigned(v1: ParamsVersion) -> dict:
    return version(2, 1, 9e-3).model_dump(mode="json")


def _mis_signed(v1: ParamsVersion) -> dict:
    return version(2, 1, 9e-3).signed("the attacker's own key").model_dump(mode="json")


def _edited(v1: ParamsVersion) -> dict:
    signed = version(2, 1, 4e-3).signed(None).model_dump(mode="json")
    return signed | {"values": {"learning_rate": 9e-3}}


def _replayed(v1: ParamsVersion) -> dict:
    return v1.model_dump(mode="json")


def _out_of_order(v1: ParamsVersion) -> dict:
    # Claims to continue a version from the future; its digest is right.
    return version(2, 5, 9e-3).signed(None).model_dump(mode="json")


def _parent_mismatched(v1: ParamsVersion) -> dict:
    # Skips the run's real version 1, which verifies; its digest is right.
    return version(2, 0, 9e-3).signed(None).model_dump(mode="json")


TAMPERINGS = {
    "unsigned": (_unsigned, "signature"),
    "mis_signed": (_mis_signed, "key"),
    "edited": (_edited, "signature"),
    "replayed": (_replayed, "claims version 1"),
    "out_of_order": (_out_of_order, "parent version 5"),
    "parent_mismatched": (_parent_mismatched, "parent version 0"),
}


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_tampered_versions_are_refused_recorded_and_do_not_fool_the_writers(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, kind: str, key: str | None
) -> None:
    run_id = backend.new_run()
    trainer = Trainer(backend, run_id, key)
    atm_set(backend, monkeypatch, key, run_id, "learning_rate=2e-3")
    trainer.poll()
    assert trainer.tag(TAG_CLIENT_APPLIED_VERSION) == "1" and trainer.lr == pytest.approx(2e-3)
    v1 = ParamsVersion.model_validate(backend.tracker.read_json(run_id, params_path(1)))

    make, why = TAMPERINGS[kind]
    forge(backend, run_id, 2, make(v1))
    trainer.poll()
    refused = trainer.tag(TAG_CLIENT_REJECTED) or ""
    assert refused.startswith("v2:")
    if key is None:  # with a key, every forgery fails on its signature first
        assert why in refused
    assert trainer.lr == pytest.approx(2e-3), "training goes on with its current values"
    assert trainer.tag(TAG_CLIENT_APPLIED_VERSION) == "1"

    record = atm_set(backend, monkeypatch, key, run_id, "learning_rate=4e-3")
    assert record.verdicts[0].current == pytest.approx(2e-3)
    assert record.verdicts[0].final == pytest.approx(4e-3)
    issued = ParamsVersion.model_validate(backend.tracker.read_json(run_id, params_path(3)))
    assert issued.parent_version == 1
    trainer.poll()
    assert trainer.tag(TAG_CLIENT_APPLIED_VERSION) == "3"
    assert trainer.lr == pytest.approx(4e-3)


def test_the_daemon_is_not_fooled_by_a_forged_version(backend: Backend) -> None:
    run_id = overfitting_run(backend)
    forge(backend, run_id, 1, version(1, 0, 9e-3).model_dump(mode="json"))
    daemon = Daemon(backend.tracker, RulesPolicy(), experiments=[backend.experiment])
    try:
        report = daemon.run_once()
    finally:
        daemon.close()
    assert len(report.decisions) == 1
    record = report.decisions[0]
    lr = next(v for v in record.verdicts if v.knob == "learning_rate")
    assert lr.current == pytest.approx(1e-3)
    issued = ParamsVersion.model_validate(backend.tracker.read_json(run_id, params_path(2)))
    assert issued.parent_version == 0
    assert issued.values["learning_rate"] == pytest.approx(lr.final)
