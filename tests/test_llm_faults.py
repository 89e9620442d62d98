"""The model's endpoint under faults, with runs that keep evaluating: a call that hangs holds
up no other run, 500s fall back to the rules, slow answers are dropped as stale. The endpoint
is a real HTTP server on loopback (``openai_replay``); the runs are on the in-memory tracker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from integrations.protocol import PARAMS_DIR, AuditRecord, Source
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon, in_background
from manager_daemon.policies.llm import LLMConfig, LLMFallback, LLMPolicy
from manager_daemon.policies.openai_chat import OpenAIChat
from manager_daemon.supervisor import SupervisorConfig
from manager_daemon.validation import ValidationConfig
from tests.conftest import Backend
from tests.helpers import overfitting_run, wait_for
from tests.openai_replay import ReplayServer, Reply, turning_lr

EVAL_EVERY_S = 0.25
TICK_S = 0.2


class Evaluations(threading.Thread):
    """Training runs that log a new, slightly better evaluation every ``EVAL_EVERY_S``."""

    def __init__(self, memory: Backend, runs: list[str]) -> None:
        super().__init__(daemon=True)
        self.memory, self.runs = memory, runs
        self.halt = threading.Event()

    def run(self) -> None:
        step = 80
        while not self.halt.wait(EVAL_EVERY_S):
            for run_id in self.runs:
                # The train loss goes on from where `overfitting_run` left it (no spike).
                train, loss = 0.8 - step / 100_000, 2.0 - step / 10_000
                self.memory.log_metrics(run_id, {"loss": train, "eval_loss": loss}, step)
            step += 10


def supervised(
    memory: Backend,
    replay: ReplayServer,
    runs: int,
    *,
    timeout_s: float,
    stale_evals: int = 2,
    fallback: LLMFallback = LLMFallback.RULES,
) -> tuple[Daemon, list[str]]:
    ids = [overfitting_run(memory) for _ in range(runs)]
    model = OpenAIChat("replay", base_url=replay.base_url, api_key="x")
    policy = LLMPolicy(model, LLMConfig(timeout_s=timeout_s, fallback=fallback))
    config = SupervisorConfig(
        # Every evaluation decided: no cooldown, and no wait for a version's effect (no client
        # applies them here).
        validation=ValidationConfig(cooldown_steps=0, settle_evals=0, budget=1000),
        audit_no_action=True,
        stale_evals=stale_evals,
    )
    return Daemon(memory.tracker, policy, config, interval_s=TICK_S), ids


def records(memory: Backend, run_id: str) -> list[AuditRecord]:
    return AuditLog(memory.tracker).records(run_id)


def first_request_hangs(then: Callable[[dict[str, Any]], Reply]) -> Callable[..., Reply]:
    asked = threading.Event()

    def answer(body: dict[str, Any]) -> Reply:
        if not asked.is_set():
            asked.set()
            return Reply(delay_s=60)
        return then(body)

    return answer


def test_a_hanging_model_call_holds_up_no_other_run(memory: Backend, replay: ReplayServer) -> None:
    replay.answer = first_request_hangs(turning_lr((0.002, 0.004)))
    daemon, runs = supervised(memory, replay, 2, timeout_s=3.0)
    evaluations = Evaluations(memory, runs)
    started = time.time()
    with in_background([daemon], TICK_S):
        evaluations.start()
        time.sleep(2.5)  # the hung call waits out its 3 s timeout meanwhile
        quiet = [r for r in runs if not records(memory, r)]
        assert len(quiet) == 1, "one run waits for its model call, the other does not"
        (hung,) = quiet
        wait_for(lambda: records(memory, hung), 15)
        hang_over = time.time()
        time.sleep(1.5)
        evaluations.halt.set()
    other = next(r for r in runs if r != hung)
    during = [r for r in records(memory, other) if r.created_at < hang_over]
    # The other run was decided at its evaluations while the hung call waited out its timeout.
    assert hang_over - started >= 3.0
    assert len(during) >= 4, [r.summary() for r in during]
    assert all(r.source == Source.LLM and r.status == "issued" for r in during), [
        (r.summary(), r.error) for r in during
    ]
    first = records(memory, hung)[0]
    assert "timeout" in (first.error or "")
    assert first.status == "stale" or first.source == Source.RULES, first.summary()
    later = records(memory, hung)[1:]
    assert any(r.source == Source.LLM and r.status == "issued" for r in later), "it recovers"


def test_a_model_answering_500_falls_back_to_the_rules_and_recovers(
    memory: Backend, replay: ReplayServer
) -> None:
    failing_until = time.time() + 3.0
    turning = turning_lr((0.002, 0.004))

    def answer(body: dict[str, Any]) -> Reply:
        return Reply(status=500) if time.time() < failing_until else turning(body)

    replay.answer = answer
    daemon, (run_id,) = supervised(memory, replay, 1, timeout_s=3.0)
    evaluations = Evaluations(memory, [run_id])
    with in_background([daemon], TICK_S):
        evaluations.start()
        wait_for(lambda: any(r.created_at > failing_until + 1 for r in records(memory, run_id)), 15)
        evaluations.halt.set()
    trail = records(memory, run_id)
    failing = [r for r in trail if r.created_at < failing_until]
    after = [r for r in trail if r.created_at > failing_until + 0.5]
    assert len(failing) >= 4, "decisions kept coming at the evaluations"
    for record in failing:
        assert record.source == Source.RULES, record.summary()
        assert "model call failed" in (record.error or "") and "fell back" in (record.error or "")
    assert after and all(r.source == Source.LLM for r in after)


def test_a_model_slower_than_the_run_leaves_it_to_the_rules(
    memory: Backend, replay: ReplayServer
) -> None:
    """Answers take 1.5 s, the run evaluates every 0.25 s: the first answer comes too late and
    the rules decide on the run's state instead; then the model is no longer asked, and the
    rules decide at once."""
    slow = turning_lr((0.002, 0.004))
    replay.answer = lambda body: Reply(slow(body).content, delay_s=1.5)
    daemon, (run_id,) = supervised(memory, replay, 1, timeout_s=10.0, stale_evals=2)
    evaluations = Evaluations(memory, [run_id])
    with in_background([daemon], TICK_S):
        evaluations.start()
        wait_for(lambda: len(records(memory, run_id)) >= 4, 15)
    evaluations.halt.set()
    first, *later = records(memory, run_id)
    # The late answer is not applied: the rules decide on the run's current state instead, or,
    # seeing nothing to do there, the answer is audited as stale.
    replaced = "rules decided on the run's current state" in (first.note or "")
    assert replaced or first.status == "stale", first.summary()
    assert first.raw_response, "the late answer is kept in the record"
    assert replaced or first.params_version is None
    assert len(replay.requests) == 1, "asked once: its answers come after the next evaluation"
    for record in later:
        assert record.source == Source.RULES and record.model is None, record.summary()
        assert "the model answers in about 1." in (record.note or ""), record.note
        assert "the run evaluates every" in (record.note or ""), record.note


def test_slow_answers_without_a_fallback_are_dropped_as_stale_and_issue_nothing(
    memory: Backend, replay: ReplayServer
) -> None:
    slow = turning_lr((0.002, 0.004))
    replay.answer = lambda body: Reply(slow(body).content, delay_s=1.5)
    daemon, (run_id,) = supervised(
        memory, replay, 1, timeout_s=10.0, stale_evals=2, fallback=LLMFallback.NONE
    )
    evaluations = Evaluations(memory, [run_id])
    with in_background([daemon], TICK_S):
        evaluations.start()
        wait_for(lambda: len(records(memory, run_id)) >= 2, 15)
    evaluations.halt.set()  # after the answers in flight: the run moves on past them too
    trail = records(memory, run_id)
    for record in trail:
        assert record.status == "stale" and record.params_version is None, record.summary()
        assert "moved on" in (record.error or ""), record.error
    assert memory.tracker.list_artifacts(run_id, PARAMS_DIR) == []
