"""The real embedded model (llama.cpp + Gemma 3 270M) deciding on a recorded snapshot."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[local]')"
)

from integrations.protocol import RunSpec, Source
from manager_daemon.policies.llm import LLMConfig, LLMPolicy
from manager_daemon.policies.local_model import LocalChat
from manager_daemon.telemetry import Snapshot
from manager_daemon.validation import Menu, RunState, ValidationConfig, validate
from train_scripts.bench_llm_decisions import load_cases, run_case


@pytest.fixture(scope="module")
def local() -> LocalChat:
    return LocalChat()


def test_embedded_model_acts_on_a_clearly_overfitting_run(local: LocalChat) -> None:
    case = next(c for c in load_cases() if c["name"] == "overfitting")
    # A generous cut-off: latency is measured by train_scripts/bench_llm_decisions.py, not here.
    policy = LLMPolicy(local, LLMConfig(timeout_s=60, fallback="none"))
    answer = policy.propose(
        Snapshot.model_validate(case["snapshot"]), Menu.model_validate(case["menu"])
    )
    assert answer.error is None, answer.error
    assert answer.model == local.name and answer.usage["prompt_tokens"] > 0
    state = RunState(spec=RunSpec.model_validate(case["spec"]), **case["state"])
    result = validate(answer.proposal, state, ValidationConfig(cooldown_steps=40), Source.LLM)
    assert all(v.verdict != "rejected" for v in result.verdicts), result.verdicts
    assert all(c.verdict == "accepted" for c in result.command_verdicts)
    # It chose among complete options (scoring is deterministic) and chose to act.
    assert answer.proposal.action == "adjust" and "---scores" in (answer.raw_response or "")
    assert answer.proposal.reason


def test_embedded_model_also_composes_under_a_grammar(local: LocalChat) -> None:
    case = next(c for c in load_cases() if c["name"] == "overfitting")
    policy = LLMPolicy(local, LLMConfig(timeout_s=60, fallback="none", mode="compose"))
    answer = policy.propose(
        Snapshot.model_validate(case["snapshot"]), Menu.model_validate(case["menu"])
    )
    assert answer.error is None, answer.error
    assert answer.usage["completion_tokens"] > 0 and answer.usage["attempts"] == 1


@pytest.mark.bench
def test_bench_embedded_model_over_the_recorded_snapshots(local: LocalChat) -> None:
    policy = LLMPolicy(local, LLMConfig(timeout_s=30, fallback="none"))
    rows = [run_case(policy, case) for case in load_cases()]
    for row in rows:
        print(row["case"], row["action"], row["consulted"], row["seconds"], row["prompt_tokens"])
    assert all(row["valid"] for row in rows), [r for r in rows if not r["valid"]]
    assert all(row["first_try_valid"] for row in rows if row["consulted"])
