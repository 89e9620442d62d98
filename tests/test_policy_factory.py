"""Choosing the policy: an endpoint, the embedded model, or rules — and saying which."""

from __future__ import annotations

import pytest

from manager_daemon.policies import RulesPolicy, factory
from manager_daemon.policies.factory import PolicySettings, make_policy
from manager_daemon.policies.llm import LLMPolicy
from manager_daemon.policies.openai_chat import OpenAIChat


def test_rules_on_request() -> None:
    policy, why = make_policy(PolicySettings(policy="rules"))
    assert isinstance(policy, RulesPolicy) and why == "policy: rules"


def test_an_endpoint_wins_over_the_embedded_model() -> None:
    settings = PolicySettings(base_url="http://127.0.0.1:9/v1", model="qwen")
    policy, why = make_policy(settings)
    assert isinstance(policy, LLMPolicy) and isinstance(policy.model, OpenAIChat)
    assert "qwen" in why and "127.0.0.1:9" in why


def test_without_endpoint_or_embedded_model_auto_says_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(factory, "local_model_available", lambda: False)
    policy, why = make_policy(PolicySettings())
    assert isinstance(policy, RulesPolicy) and "not installed" in why
    with pytest.raises(ValueError, match="no LLM available"):
        make_policy(PolicySettings(policy="llm"))


def test_a_crashing_embedded_model_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "local_model_available", lambda: True)
    monkeypatch.setattr(
        factory, "probe_local_model", lambda: "a test generation crashed (signal 11)"
    )
    policy, why = make_policy(PolicySettings())
    assert isinstance(policy, RulesPolicy) and "crashed" in why


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy(PolicySettings(policy="magic"))


def test_settings_read_the_openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    monkeypatch.setenv("ATM_LLM_MODEL", "m")
    monkeypatch.setenv("ATM_POLICY", "llm")
    settings = PolicySettings.from_env(model="override")
    assert (settings.base_url, settings.model, settings.policy) == (
        "http://127.0.0.1:8000/v1",
        "override",
        "llm",
    )
