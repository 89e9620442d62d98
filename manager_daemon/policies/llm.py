"""The LLM policy: a schema-conditioned model picks an update from the menu.

One call; if the answer is malformed or off the menu, one retry carrying the validation error;
then the fallback (the rules policy, or no action). Every attempt, its raw answer, latency and
token usage go into the decision's audit record.

A capable model composes its answer from the menu. A small one (the embedded model) chooses
among complete answers instead (``mode="choose"``: no action, the rules' remedy, one move per
knob each way, the commands), and is consulted only when the rules see a symptom
(``consult="on_symptom"``): measured on the recorded snapshots, a 270M model cannot tell a
healthy run from a sick one, but it can pick among remedies.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from integrations.protocol import Proposal, Source
from manager_daemon.policies.base import PolicyAnswer
from manager_daemon.policies.chat import ChatError, ChatModel
from manager_daemon.policies.prompt import (
    SYSTEM,
    InvalidAnswer,
    answer_options,
    build_prompt,
    chosen_option,
    decision_schema,
    options_schema,
    parse_answer,
)
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.telemetry import Snapshot
from manager_daemon.validation import Menu


class LLMFallback(StrEnum):
    """Who decides after a failed call or an answer still invalid on retry."""

    RULES = "rules"
    NONE = "none"


class LLMMode(StrEnum):
    """How a model answers: composing from the menu, or choosing among complete answers."""

    AUTO = "auto"
    COMPOSE = "compose"
    CHOOSE = "choose"


class LLMConsult(StrEnum):
    """When the model is asked: at every evaluation, or only when the rules see a symptom."""

    AUTO = "auto"
    ALWAYS = "always"
    ON_SYMPTOM = "on_symptom"


class LLMConfig(BaseModel):
    timeout_s: float = Field(60.0, gt=0, description="Seconds per model call")
    retries: int = Field(1, ge=0, description="Retries carrying the validation error")
    fallback: LLMFallback = Field(
        LLMFallback.RULES, description="After a failed retry: the rules decide, or nothing is done"
    )
    mode: LLMMode = Field(
        LLMMode.AUTO,
        description="compose (the model writes its answer from the menu), choose (it picks one "
        "of a list of complete answers; for small models), or auto (choose where the model "
        "prefers to)",
    )
    consult: LLMConsult = Field(
        LLMConsult.AUTO,
        description="always, on_symptom (only when the rules see one), or auto (on_symptom "
        "when choosing)",
    )


class LLMPolicy:
    """Decisions by a chat model, validated against the menu."""

    name = "llm"
    source = Source.LLM

    def __init__(
        self, model: ChatModel, config: LLMConfig | None = None, rules: RulesPolicy | None = None
    ) -> None:
        self.model = model
        self.config = config or LLMConfig()
        self.rules = rules or RulesPolicy()

    def propose(self, snapshot: Snapshot, menu: Menu) -> PolicyAnswer:
        if menu.empty:
            return PolicyAnswer(Proposal(action="no_action", reason="nothing is on the menu"))
        diagnosis = self.rules.decide(snapshot, menu)
        if self._consult() == "on_symptom" and diagnosis.action == "no_action":
            return PolicyAnswer(
                Proposal(
                    action="no_action",
                    reason=f"no symptom, model not consulted ({diagnosis.reason})"[:200],
                ),
                source=Source.RULES,
            )
        options: list[dict[str, Any]] | None = None
        if self._mode() == "choose":
            options = answer_options(menu, diagnosis)
            prompt = build_prompt(snapshot, menu, diagnosis=diagnosis, options=options)
            schema = options_schema(options)
        else:
            prompt = build_prompt(snapshot, menu, diagnosis=diagnosis)
            schema = decision_schema(menu)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        answer = PolicyAnswer(Proposal(action="no_action"), model=self.model.name, prompt=prompt)
        raws: list[str] = []
        problem = ""
        for attempt in range(1 + self.config.retries):
            started = time.monotonic()
            try:
                result = self.model.complete(messages, schema, timeout=self.config.timeout_s)
            except ChatError as exc:
                answer.timings[f"llm_call_{attempt}_s"] = round(time.monotonic() - started, 3)
                problem = f"model call failed: {exc}"
                break
            answer.timings[f"llm_call_{attempt}_s"] = round(time.monotonic() - started, 3)
            answer.model = result.model
            answer.usage["prompt_tokens"] = answer.usage.get("prompt_tokens", 0) + (
                result.prompt_tokens or 0
            )
            answer.usage["completion_tokens"] = answer.usage.get("completion_tokens", 0) + (
                result.completion_tokens or 0
            )
            if result.cached_tokens:
                answer.usage["cached_tokens"] = (
                    answer.usage.get("cached_tokens", 0) + result.cached_tokens
                )
            answer.usage["attempts"] = attempt + 1
            raws.append(
                result.text
                if not result.scores
                else f"{result.text}\n---scores of the options, in order---\n{result.scores}"
            )
            answer.raw_response = raws[0] if len(raws) == 1 else "\n---retry---\n".join(raws)
            text = result.text if options is None else chosen_option(result.text, options)
            try:
                answer.proposal = parse_answer(text, menu, offered=options)
                return answer
            except InvalidAnswer as exc:
                problem = f"invalid answer: {exc}"
                messages += [
                    {"role": "assistant", "content": result.text},
                    {
                        "role": "user",
                        "content": f"That answer is invalid: {exc}. Answer again with one JSON "
                        "object in the format above, choosing only from the menu.",
                    },
                ]
        return self._fall_back(snapshot, menu, answer, problem)

    def _mode(self) -> str:
        if self.config.mode != "auto":
            return self.config.mode
        return "choose" if getattr(self.model, "chooses", False) else "compose"

    def _consult(self) -> str:
        if self.config.consult != "auto":
            return self.config.consult
        return "on_symptom" if self._mode() == "choose" else "always"

    def _fall_back(
        self, snapshot: Snapshot, menu: Menu, answer: PolicyAnswer, problem: str
    ) -> PolicyAnswer:
        if self.config.fallback == "rules":
            answer.proposal = self.rules.decide(snapshot, menu)
            answer.source = Source.RULES
            answer.error = f"{problem}; fell back to the rules policy"
        else:
            answer.proposal = Proposal(action="no_action", reason="the model gave no valid answer")
            answer.error = f"{problem}; no action"
        return answer
