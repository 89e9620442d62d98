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
from manager_daemon.policies.rules import RulesPolicy, is_acute
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


# Decisions left to the rules, for a model too slow for the run, before it is asked again.
REPROBE_AFTER = 20


class LatencyEstimate:
    """How long a model takes to answer: a moving average of its recent calls."""

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight
        self.seconds: float | None = None

    def observe(self, seconds: float) -> None:
        if self.seconds is None:
            self.seconds = seconds
        else:
            self.seconds += self.weight * (seconds - self.seconds)


class LLMPolicy:
    """Decisions by a chat model, validated against the menu.

    The rules decide at once where the model's answer would land only after the run's next
    evaluation (``_too_slow_for``): a late answer is a decision on a state the run has left.
    """

    name = "llm"
    source = Source.LLM

    def __init__(
        self, model: ChatModel, config: LLMConfig | None = None, rules: RulesPolicy | None = None
    ) -> None:
        self.model = model
        self.config = config or LLMConfig()
        self.rules = rules or RulesPolicy()
        self.fallback = self.rules if self.config.fallback is LLMFallback.RULES else None
        # How long the model takes to answer, from its recent answers (None before the first).
        self.latency = LatencyEstimate()
        self._skipped = 0  # decisions left to the rules since the model was last asked

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
        if self.fallback is not None and is_acute(diagnosis):
            return PolicyAnswer(
                diagnosis,
                source=Source.RULES,
                note="an acute symptom: the rules acted at once, without waiting for the model",
            )
        if self.fallback is not None and (late := self._too_slow_for(snapshot)) is not None:
            return self._without_model(diagnosis, late)
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
            self.latency.observe(time.monotonic() - started)
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

    def _too_slow_for(self, snapshot: Snapshot) -> str | None:
        """Why the model's answer would land only after the run's next evaluation, or None.

        An answer that arrives later is decided on a state the run has left; the rules,
        which answer at once, do better then. Unknown until the model has answered once (or
        been timed by ``calibrate``) and the run has evaluated twice.
        """
        pace = snapshot.objective.seconds_per_eval
        expected = self.latency.seconds
        if pace is None or expected is None or expected <= pace:
            return None
        self._skipped += 1
        if self._skipped > REPROBE_AFTER:
            # Asked again now and then: the model (or the machine it shares) may have become
            # faster, which a model never asked cannot show.
            self._skipped = 0
            return None
        return (
            f"the model answers in about {expected:.1f} s and the run evaluates every "
            f"{pace:.1f} s, so its answer would come after the next evaluation"
        )

    def _without_model(self, diagnosis: Proposal, late: str) -> PolicyAnswer:
        """The rules' decision, at once, for a run the model cannot keep pace with."""
        if diagnosis.action == "no_action":
            return PolicyAnswer(
                Proposal(action="no_action", reason=f"model not consulted: {late}"[:200]),
                source=Source.RULES,
                note=f"model not consulted: {late}",
            )
        return PolicyAnswer(
            diagnosis, model=None, source=Source.RULES, note=f"the rules acted at once: {late}"
        )

    def calibrate(self, snapshot: Snapshot, menu: Menu) -> float | None:
        """Time one answer on a typical situation, so that the first real decision already
        knows whether the model keeps pace with the run; the seconds it took, or None when the
        model failed."""
        diagnosis = self.rules.decide(snapshot, menu)
        options = answer_options(menu, diagnosis) if self._mode() == "choose" else None
        prompt = build_prompt(snapshot, menu, diagnosis=diagnosis, options=options)
        schema = options_schema(options) if options is not None else decision_schema(menu)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        started = time.monotonic()
        try:
            self.model.complete(messages, schema, timeout=self.config.timeout_s)
        except ChatError:
            return None
        took = time.monotonic() - started
        self.latency.observe(took)
        return took

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
