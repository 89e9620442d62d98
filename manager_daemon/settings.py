"""The daemon's settings: one model, read once from flags and the environment.

``atm daemon``'s options are this model's fields (their help is the fields' descriptions),
the environment fills what the flags leave out (``ATM_*``, and the OpenAI client's own
``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``), and the Helm chart's values are generated from it.
The policies, validation and supervisors receive the typed parts they need from here; none of
them reads the environment.
"""

from __future__ import annotations

import copy
import socket
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo

from integrations.settings import TrackerSettings
from manager_daemon.policies.llm import LLMConfig, LLMConsult, LLMFallback, LLMMode
from manager_daemon.policies.openai_chat import ResponseMode
from manager_daemon.policies.rules import RulesConfig
from manager_daemon.supervisor import SupervisorConfig
from manager_daemon.validation import ValidationConfig


class PolicyName(StrEnum):
    """Which policy decides: an LLM if one is available (auto), an LLM or nothing, the rules."""

    AUTO = "auto"
    LLM = "llm"
    RULES = "rules"


def _same_as(model: type[Any], name: str) -> Any:
    """The field ``name`` of ``model`` (default, bounds, description), for a settings field
    that configures it: one definition, two places."""
    info: FieldInfo = model.model_fields[name]
    return copy.copy(info)


class LogFormat(StrEnum):
    """How the daemon writes its logs: for people, or one JSON object per line."""

    TEXT = "text"
    JSON = "json"


class DaemonSettings(TrackerSettings):
    """Everything ``atm daemon`` can be told, with its default."""

    interval: float = Field(10.0, gt=0, description="Seconds between ticks")
    policy: PolicyName = Field(
        PolicyName.AUTO,
        description="auto (an endpoint if configured, else the embedded model, else rules), "
        "llm, or rules",
    )
    llm_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("ATM_LLM_BASE_URL", "OPENAI_BASE_URL"),
        description="An OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp, OpenAI…)",
    )
    llm_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("ATM_LLM_API_KEY", "OPENAI_API_KEY"),
        description="The endpoint's API key",
    )
    llm_model: str | None = Field(None, description="The model's name at the endpoint")
    llm_timeout: float = _same_as(LLMConfig, "timeout_s")
    llm_retries: int = _same_as(LLMConfig, "retries")
    llm_fallback: LLMFallback = _same_as(LLMConfig, "fallback")
    llm_mode: LLMMode = _same_as(LLMConfig, "mode")
    llm_consult: LLMConsult = _same_as(LLMConfig, "consult")
    llm_response_mode: ResponseMode = Field(
        ResponseMode.AUTO,
        description="How the endpoint is held to the answer's schema: json_schema, "
        "json_object, a forced tool call, or auto (the first the server accepts)",
    )
    llm_threads: int = Field(
        1,
        ge=0,
        description="Threads of the embedded model; one leaves the other cores to training "
        "beside it (0: llama.cpp's own choice, for a machine of the daemon's own)",
    )
    llm_busy_wait: bool = Field(
        False,
        description="Let the embedded model's threads spin between operations (OpenMP's active "
        "wait): a little faster on a machine of the daemon's own, but it takes cores from "
        "training beside it",
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How far below training the daemon's decision work runs (a Linux nice "
        "value): training beside it keeps most of the CPU; 19 also puts it in the idle "
        "scheduling class, where it gets only the CPU training leaves (on busy cores a "
        "decision then waits until training pauses); 0 on a machine of its own",
    )
    rules_config: Path | None = Field(None, description="A YAML file of the rules' thresholds")
    cooldown_steps: int = _same_as(ValidationConfig, "cooldown_steps")
    settle_evals: int = _same_as(ValidationConfig, "settle_evals")
    budget: int = _same_as(ValidationConfig, "budget")
    stop_after_evals: int = _same_as(ValidationConfig, "stop_after_evals")
    rollback_after_evals: int = _same_as(ValidationConfig, "rollback_after_evals")
    rollback_min_regression: float = _same_as(ValidationConfig, "rollback_min_regression")
    stale_evals: int = _same_as(SupervisorConfig, "stale_evals")
    audit_no_action: bool = _same_as(SupervisorConfig, "audit_no_action")
    workers: int = Field(4, ge=1, description="Threads for tracker I/O and policies")
    experiments: list[str] = Field(
        default_factory=list, description="Only runs of these experiments (default: all)"
    )
    ops_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the operations endpoints: /healthz, /readyz and /metrics "
        "(Prometheus); unset: not served",
    )
    ops_host: str = Field("0.0.0.0", description="Address the operations endpoints listen on")
    log_format: LogFormat = Field(
        LogFormat.TEXT, description="Logs for people (text) or one JSON object per line (json)"
    )
    replica_name: str = Field(
        default_factory=socket.gethostname,
        description="This replica's name, in the leases it writes (default: the host name, a "
        "StatefulSet pod's name)",
    )
    replica: int | None = Field(
        None,
        ge=0,
        description="This replica's ordinal among the replicas (default: the -N suffix of its "
        "name, else 0)",
    )
    replicas: int = Field(
        1, ge=1, description="How many daemon replicas share the managed runs of this tracker"
    )
    lease_ttl: float | None = Field(
        None,
        gt=0,
        description="Seconds a replica's lease on a run lasts unrenewed: how long the runs of "
        "a replica that died wait before another takes them; at least three intervals "
        "(default: 60, or three intervals if longer)",
    )
    lease_settle: float = Field(
        3.0,
        gt=0,
        description="Seconds between writing a lease and reading it back to confirm it (a "
        "lease write must land within half of this)",
    )
    drain_timeout: float = Field(
        90.0,
        ge=0,
        description="Seconds a stopping daemon (SIGTERM) waits for the decisions in flight",
    )
    report_every: int = Field(
        0,
        ge=0,
        description="Log a run's report (atm/report/) after every N of its decisions, on a "
        "thread of its own; 0: never",
    )
    report_at_end: bool = Field(False, description="Log a run's report when the run ends")

    @model_validator(mode="after")
    def _lease_outlasts_ticks(self) -> DaemonSettings:
        if self.lease_ttl is not None and self.lease_ttl < 3 * self.interval:
            raise ValueError(
                f"lease_ttl ({self.lease_ttl:g} s) must be at least three intervals "
                f"({3 * self.interval:g} s): leases are renewed at ticks"
            )
        return self

    def lease_ttl_s(self) -> float:
        """The lease TTL in force: the setting, else 60 s or three intervals if longer."""
        return self.lease_ttl if self.lease_ttl is not None else max(60.0, 3 * self.interval)

    @classmethod
    def from_options(cls, **given: Any) -> DaemonSettings:
        """Settings from flags (those not given are None) over the environment."""
        return cls(**{k: v for k, v in given.items() if v is not None})

    def validation_config(self) -> ValidationConfig:
        return ValidationConfig(
            cooldown_steps=self.cooldown_steps,
            settle_evals=self.settle_evals,
            budget=self.budget,
            stop_after_evals=self.stop_after_evals,
            rollback_after_evals=self.rollback_after_evals,
            rollback_min_regression=self.rollback_min_regression,
        )

    def supervisor_config(self) -> SupervisorConfig:
        return SupervisorConfig(
            validation=self.validation_config(),
            audit_no_action=self.audit_no_action,
            stale_evals=self.stale_evals,
        )

    def llm_config(self) -> LLMConfig:
        return LLMConfig(
            timeout_s=self.llm_timeout,
            retries=self.llm_retries,
            fallback=self.llm_fallback,
            mode=self.llm_mode,
            consult=self.llm_consult,
        )

    def rules(self) -> RulesConfig:
        """The rules' thresholds: the defaults, or the YAML file's."""
        if self.rules_config is None:
            return RulesConfig()
        try:
            return RulesConfig.model_validate(yaml.safe_load(self.rules_config.read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise ValueError(f"cannot read rules config {self.rules_config}: {exc}") from exc
