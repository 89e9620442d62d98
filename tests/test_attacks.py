"""Attacks by whoever can write to the tracker: files no manager wrote, put where it reads.

Each case is refused with a reason and management goes on: the client records the refusal and
applies the next legitimate version, the daemon keeps deciding, the audit trail stays readable.
"""

from __future__ import annotations

import json
import math
import resource
import time

import pytest
from typer.testing import CliRunner

from integrations.protocol import (
    AUDIT_DIR,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_REJECTED,
    TAG_LAST_INTERVENTION,
    TAG_MANAGED,
    TAG_PARAMS_VERSION,
    ParamsVersion,
    Source,
    audit_path,
    params_path,
)
from integrations.redact import redact
from integrations.trackers import strict_json
from manager_daemon import cli
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon
from manager_daemon.policies import RulesPolicy
from tests.conftest import Backend
from tests.helpers import LoopThread, issue, overfitting_run, wait_for

# Numbers JSON cannot carry, and nesting no manager file has: each once accepted by the
# parser and left to fail where nothing expected it (signing raised; the client logged a
# traceback every poll and never recorded a refusal; nothing was applied again).
UNREADABLE = {
    "NaN": '{"version": 1, "values": {"learning_rate": NaN}}',
    "Infinity": '{"version": 1, "values": {"learning_rate": Infinity}}',
    "1e309": '{"version": 1, "values": {"learning_rate": 1e309}}',
    "a 5,000-digit integer": '{"version": 1' + "0" * 5000 + "}",
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.fixture
def loop(memory: Backend):
    thread = LoopThread(memory.new_run(), memory.uri)
    thread.start()
    yield thread
    thread.stop()
    assert thread.error is None


def _refused(memory: Backend, run_id: str, version: int) -> str:
    def reason() -> str | None:
        tag = memory.tracker.get_run(run_id).tags.get(TAG_CLIENT_REJECTED, "")
        return tag if tag.startswith(f"v{version}:") else None

    return wait_for(reason, 20)


def test_unreadable_params_files_are_refused_and_the_next_version_applies(
    loop: LoopThread, memory: Backend
) -> None:
    run_id = loop.knobs.client.run_id
    tracker = memory.tracker
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags)
    for version, (what, text) in enumerate(UNREADABLE.items(), start=1):
        memory.put_text(run_id, params_path(version), text)
        tracker.set_tags(run_id, {TAG_PARAMS_VERSION: str(version)})
        assert "malformed params file" in _refused(memory, run_id, version), what
    legitimate = len(UNREADABLE) + 1
    issue(tracker, run_id, legitimate, {"learning_rate": 0.005}, parent_version=0)
    wait_for(
        lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == str(legitimate)
    )
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("key", [None, "a-signing-key"])
def test_the_writers_skip_an_unreadable_params_file_and_keep_deciding(
    memory: Backend, key: str | None
) -> None:
    tracker = memory.tracker
    run_id = overfitting_run(memory)
    # A complete, well-formed version but for one number: what a forger copies and edits.
    fields = ParamsVersion(
        version=1, parent_version=0, issued_at=1.0, source=Source.HUMAN, decision_id=1,
        values={"learning_rate": 0.001},
    ).signed(key).model_dump(mode="json")  # fmt: skip
    fields["values"]["learning_rate"] = math.nan
    memory.put_text(run_id, params_path(1), json.dumps(fields))
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "1"})
    Daemon(tracker, RulesPolicy(), experiments=[memory.experiment], signing_key=key).run_once()
    assert tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "2"
    assert tracker.read_json(run_id, params_path(2))["parent_version"] == 0


def test_an_unreadable_audit_record_is_skipped_and_the_run_still_decided(memory: Backend) -> None:
    tracker = memory.tracker
    run_id = overfitting_run(memory)
    for decision_id, text in enumerate(UNREADABLE.values(), start=1):
        memory.put_text(run_id, audit_path(decision_id), text)
    assert AuditLog(tracker).records(run_id) == []
    Daemon(tracker, RulesPolicy(), experiments=[memory.experiment]).run_once()
    assert tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "1"
    readable = AuditLog(tracker).records(run_id)
    assert [r.params_version for r in readable] == [1]
    assert readable[0].decision_id > len(UNREADABLE), "no decision id reused"
    assert len(tracker.list_artifacts(run_id, AUDIT_DIR)) == len(UNREADABLE) + 1


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_a_params_file_far_over_the_cap_is_refused_unread(mlflow_backend: Backend) -> None:
    """35 MB put up as the next version: refused from its size, before it is read or
    parsed; the training process neither grows nor stops stepping (it once took 2.9 s for
    one step and grew by 564 MB parsing such a file)."""
    backend = mlflow_backend
    tracker = backend.tracker
    run_id = backend.new_run()
    loop = LoopThread(run_id, backend.uri)
    loop.start()
    try:
        wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags, 60)
        huge = '{"version": 1, "values": {"learning_rate": 0.005}, "pad": "' + "x" * 35_000_000
        tracker.write_file(run_id, params_path(1), (huge + '"}').encode())
        del huge
        before_mb, steps_before = _max_rss_mb(), len(loop.step_times)
        tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "1"})
        reason = wait_for(
            lambda: (
                (t := tracker.get_run(run_id).tags.get(TAG_CLIENT_REJECTED, "")).startswith("v1:")
                and t
            ),
            120,
        )
        grown_mb = _max_rss_mb() - before_mb
        during = loop.step_times[steps_before:]
    finally:
        loop.stop()
    assert loop.error is None
    assert f"over the {strict_json.MAX_BYTES:,}-byte limit" in reason
    print(
        f"\n35 MB params file refused: {len(during)} steps meanwhile, the longest "
        f"{max(during) * 1000:.0f} ms; peak memory grew by {grown_mb:.0f} MB"
    )
    assert during, "training kept stepping while the client refused the file"
    assert grown_mb < 100, f"the process grew by {grown_mb:.0f} MB"


def test_atm_status_shows_tampered_tags_as_text(
    memory: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Markup in a reason, a heartbeat that is no number, terminal escape sequences in a run's
    name: each once broke `atm status` for every run on the tracker, or reached the terminal."""
    monkeypatch.setattr(cli.console, "width", 250)
    tracker = memory.tracker
    run_id = memory.new_run("\x1b]0;owned\x07\x1b[2Jrenamed")
    tracker.set_tags(
        run_id,
        {
            TAG_MANAGED: "true",
            TAG_CLIENT_HEARTBEAT: "soon",
            TAG_LAST_INTERVENTION: "v1 @ step 3 by llm: [/INST] lr cut [bold]",
            TAG_CLIENT_REJECTED: "v2: [/red] refused",
        },
    )
    healthy = memory.new_run("healthy")
    tracker.set_tags(healthy, {TAG_MANAGED: "true", TAG_CLIENT_HEARTBEAT: str(time.time())})
    result = CliRunner().invoke(cli.app, ["status", "--tracking-uri", memory.uri])
    assert result.exit_code == 0, result.output
    assert healthy[:12] in result.output and run_id[:12] in result.output
    assert "[/INST]" in result.output  # the column wraps the rest
    assert "the client refused v2: [/red] refused" in result.output
    assert "unreadable" in result.output, "the heartbeat that is no number"
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\ufffd]0;owned" in result.output and "named" in result.output


@pytest.mark.parametrize("password", ["it's", 'say"hi"', "(a)!$&*+,;=b", "p%40ss:wo:rd"])
def test_a_password_with_any_character_a_uri_allows_is_masked(password: str) -> None:
    """RFC 3986 allows quotes and sub-delimiters in user info; a `'` in a password once left
    the whole password in `atm status` and every "tracker unreachable" error."""
    uri = f"http://atm:{password}@tracker.internal:5000/api"
    for text in (uri, f"tracker unreachable at {uri}: refused", f"'{uri}'"):
        masked = redact(text)
        assert password not in masked and "http://***@tracker.internal:5000/api" in masked
