"""Choosing the policy: an endpoint, the embedded model, or rules — and saying which."""

from __future__ import annotations

import pytest

from manager_daemon.policies import RulesPolicy, factory
from manager_daemon.policies.factory import make_policy
from manager_daemon.policies.llm import LLMPolicy
from manager_daemon.policies.openai_chat import OpenAIChat
from manager_daemon.settings import DaemonSettings


def test_rules_on_request() -> None:
    policy, why = make_policy(DaemonSettings(policy="rules"))
    assert isinstance(policy, RulesPolicy) and why == "policy: rules"


def test_an_endpoint_wins_over_the_embedded_model() -> None:
    settings = DaemonSettings(llm_base_url="http://127.0.0.1:9/v1", llm_model="qwen")
    policy, why = make_policy(settings)
    assert isinstance(policy, LLMPolicy) and isinstance(policy.model, OpenAIChat)
    assert "qwen" in why and "127.0.0.1:9" in why


def test_without_endpoint_or_embedded_model_auto_says_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(factory, "local_model_available", lambda: False)
    policy, why = make_policy(DaemonSettings())
    assert isinstance(policy, RulesPolicy) and "not installed" in why
    with pytest.raises(ValueError, match="no LLM available"):
        make_policy(DaemonSettings(policy="llm"))


def test_a_crashing_embedded_model_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "local_model_available", lambda: True)
    monkeypatch.setattr(
        factory, "probe_local_model", lambda: "a test generation crashed (signal 11)"
    )
    policy, why = make_policy(DaemonSettings())
    assert isinstance(policy, RulesPolicy) and "crashed" in why


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        DaemonSettings(policy="magic")


def test_settings_read_the_openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    monkeypatch.setenv("ATM_LLM_MODEL", "m")
    monkeypatch.setenv("ATM_POLICY", "llm")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    settings = DaemonSettings.from_options(llm_model="override", llm_base_url=None)
    assert settings.llm_api_key is not None
    assert settings.llm_api_key.get_secret_value() == "sk-test"
    assert "sk-test" not in repr(settings)
    assert (settings.llm_base_url, settings.llm_model, settings.policy) == (
        "http://127.0.0.1:8000/v1",
        "override",
        "llm",
    )
