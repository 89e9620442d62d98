"""The contract between a training process and the manager.

Every tag name, artifact path and serialized model that crosses the process boundary lives
here, and only here. Both sides import it; everything read from a tracker is validated by
these models before it is used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from integrations.settings import DEFAULT_POLL_INTERVAL_S

SCHEMA_VERSION = 1

# Run tags (MLflow). All under "atm.".
TAG_MANAGED = "atm.managed"
TAG_OBJECTIVE = "atm.objective"
TAG_PARAMS_VERSION = "atm.params.version"
TAG_CLIENT_HEARTBEAT = "atm.client.heartbeat"
TAG_CLIENT_APPLIED_VERSION = "atm.client.applied_version"
TAG_CLIENT_APPLIED_STEP = "atm.client.applied_step"
TAG_CLIENT_REJECTED = "atm.client.rejected"
TAG_LAST_INTERVENTION = "atm.last_intervention"
# The digest of the spec in force: a reader notices a newly published spec from the run's
# tags, which the run listing carries, without reading the spec each time.
TAG_SPEC_DIGEST = "atm.spec.digest"
# The daemon replica that supervises the run, while it holds the lease (see ``Lease``).
TAG_DAEMON_LEASE = "atm.daemon.lease"
# Whether the manager can do its job for the run: ``STATE: reason`` (``Health``), written by
# the daemon only when it changes.
TAG_HEALTH = "atm.health"

# Artifacts (JSON, UTF-8).
SPEC_PATH = "atm/spec.json"
PARAMS_DIR = "atm/params"
AUDIT_DIR = "atm/audit"
# The run's report (``atm report``): a self-contained HTML page and its plots as PNG files.
REPORT_DIR = "atm/report"
REPORT_PAGE_PATH = f"{REPORT_DIR}/index.html"

# Metric logged by the client at the step a version was applied.
METRIC_PARAMS_VERSION = "atm.params_version"

DEFAULT_OBJECTIVE = "minimize:eval_loss"

# On Weights & Biases the names above map onto W&B's own places (the W&B tracker backend):
# the managed flag is the run tag WANDB_TAG_MANAGED; the tags the daemon and the command line
# write are run tags "NAME=VALUE"; the tags only the training client writes (WANDB_CLIENT_TAGS)
# are summary keys of its own run; each artifact path is a version of one artifact per run and
# kind (WANDB_ARTIFACT_KINDS), found by an alias (``wandb_alias``). A W&B run tag holds at most
# WANDB_TAG_MAX characters.
WANDB_TAG_MANAGED = "atm-managed"
WANDB_TAG_MAX = 64
WANDB_CLIENT_TAGS = (
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_REJECTED,
)
WANDB_ARTIFACT_KINDS = {
    SPEC_PATH: "atm-spec",
    PARAMS_DIR: "atm-params",
    AUDIT_DIR: "atm-audit",
    REPORT_DIR: "atm-report",
}
# The job type of the run through which a daemon (or a command) logs its artifacts.
WANDB_WRITER_JOB_TYPE = "atm-daemon"
# Logged beside METRIC_PARAMS_VERSION: the training step the version was applied at (W&B
# counts its own steps, which need not be the script's).
WANDB_METRIC_APPLIED_STEP = "atm/applied_step"


# The signing key shared by the daemon and the client, when one is configured.
SIGNING_KEY_ENV = "ATM_SIGNING_KEY"


def rejected_version(tag_value: str | None) -> int | None:
    """The version named by an ``atm.client.rejected`` value (``vN: reason``), if any."""
    head = (tag_value or "").partition(":")[0]
    if head.startswith("v") and head[1:].isdigit():
        return int(head[1:])
    return None


def params_path(version: int) -> str:
    """Artifact path of params version ``version``."""
    return f"{PARAMS_DIR}/v{version:06d}.json"


def audit_path(decision_id: int) -> str:
    """Artifact path of the audit record of decision ``decision_id``."""
    return f"{AUDIT_DIR}/d{decision_id:06d}.json"


def report_plot_path(name: str) -> str:
    """Artifact path of the report's plot ``name`` (``objective``, ``knobs``…)."""
    return f"{REPORT_DIR}/{name}.png"


def parse_audit_path(path: str) -> int | None:
    """The decision id in an audit artifact path, or None if it is not one."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("d") and name.endswith(".json") and name[1:-5].isdigit():
        return int(name[1:-5])
    return None


def wandb_key(name: str) -> str:
    """The W&B summary or history key of a contract name: ``atm.client.heartbeat`` →
    ``atm/client/heartbeat`` (W&B groups keys by ``/`` in its charts and tables)."""
    if name.startswith("atm."):
        return "atm/" + name[4:].replace(".", "/")
    return name


def wandb_alias(path: str) -> str:
    """The alias that names artifact ``path`` among its kind's versions on W&B: ``spec``,
    ``params-vN``, ``decision-N`` (W&B keeps ``vN`` for its own version numbers)."""
    if path == SPEC_PATH:
        return "spec"
    directory, _, name = path.rpartition("/")
    number = name[1:-5]
    if (
        directory == PARAMS_DIR
        and name.startswith("v")
        and name.endswith(".json")
        and number.isdigit()
    ):
        return f"params-v{int(number)}"
    if directory == AUDIT_DIR and (decision := parse_audit_path(path)) is not None:
        return f"decision-{decision}"
    if directory == REPORT_DIR and name and "/" not in name and ":" not in name:
        return f"report-{name}"
    raise ValueError(f"{path!r} is not an artifact path of the contract")


def wandb_path(alias: str) -> str | None:
    """The artifact path an alias names (``wandb_alias`` reversed), or None."""
    kind, _, number = alias.rpartition("-")
    if alias == "spec":
        return SPEC_PATH
    if kind == "params" and number.startswith("v") and number[1:].isdigit():
        return params_path(int(number[1:]))
    if kind == "decision" and number.isdigit():
        return audit_path(int(number))
    if alias.startswith("report-") and len(alias) > len("report-"):
        return f"{REPORT_DIR}/{alias.removeprefix('report-')}"
    return None


class HealthState(StrEnum):
    """What the manager can do for a run, the most pressing first where several hold."""

    # No knob spec the daemon can use: none published, or one it cannot read.
    NO_KNOBS = "no_knobs"
    # The client refused the knob bounds it was given; the run is not managed.
    BOUNDS_REFUSED = "bounds_refused"
    # The framework hooks found no tracker run for the script (said by the client only).
    UNBOUND = "unbound"
    # No client heartbeat: decisions are audited, never applied.
    ADVISORY = "advisory"
    # The objective has not been logged: nothing to decide on.
    WAITING_OBJECTIVE = "waiting_objective"
    # The objective is logged at the same step over and over: new evaluations look old.
    NO_STEPS = "no_steps"
    # The policy's answers arrive after the run has moved on, and are discarded.
    STALE_ANSWERS = "stale_answers"
    # Managed and deciding.
    DECIDING = "deciding"


class Health(BaseModel):
    """One run's health: a state and one line saying why, in ``TAG_HEALTH``."""

    model_config = ConfigDict(frozen=True)

    state: HealthState
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.state is HealthState.DECIDING

    def tag_value(self) -> str:
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value

    @classmethod
    def parse(cls, text: str | None) -> Health | None:
        """The health in a tag value; None for no tag or a value that is not a health."""
        state, _, reason = (text or "").partition(":")
        try:
            return cls(state=HealthState(state.strip()), reason=reason.strip())
        except ValueError:
            return None

    def __str__(self) -> str:
        return self.tag_value()


class Lease(BaseModel):
    """A daemon replica's claim on a run: ``OWNER RENEWED_AT TTL_S`` in ``TAG_DAEMON_LEASE``.

    Only the owner decides for the run. Other replicas judge expiry by their own clocks (the
    value unchanged for ``ttl_s`` seconds), so ``renewed_at`` (unix seconds) is for people and
    for telling one renewal from the next, not a deadline that needs synchronised clocks.
    """

    model_config = ConfigDict(frozen=True)

    owner: str = Field(pattern=r"^\S+$")
    renewed_at: float
    ttl_s: float = Field(gt=0)

    def tag_value(self) -> str:
        return f"{self.owner} {self.renewed_at:.3f} {self.ttl_s:g}"

    @classmethod
    def parse(cls, text: str | None) -> Lease | None:
        """The lease in a tag value; None for no tag or one that is not a lease."""
        parts = (text or "").split()
        if len(parts) != 3:
            return None
        try:
            return cls(owner=parts[0], renewed_at=float(parts[1]), ttl_s=float(parts[2]))
        except ValueError:
            return None


class Scale(StrEnum):
    LIN = "lin"
    LOG = "log"


class Boundary(StrEnum):
    """Where a staged version may be applied in the training loop."""

    STEP = "step"
    EVAL = "eval"
    ROLLOUT = "rollout"


class Command(StrEnum):
    STOP = "stop"
    CHECKPOINT = "checkpoint"
    ROLLBACK_TO_BEST = "rollback_to_best"


class Source(StrEnum):
    LLM = "llm"
    RULES = "rules"
    HUMAN = "human"


# An objective's directions, by how a misspelt one begins ("minimise", "Max").
_DIRECTIONS = {"min": "minimize", "max": "maximize"}


class Objective(BaseModel):
    """What the run optimises: a metric key and a direction."""

    model_config = ConfigDict(frozen=True)

    direction: Literal["minimize", "maximize"]
    metric: str

    @classmethod
    def parse(cls, text: str) -> Objective:
        """Parse ``minimize:eval_loss`` / ``maximize:eval/safe_success``.

        Raises ValueError with one line saying what is wrong and, where it can tell, the
        objective meant: a metric name with a space around it is never logged under that name,
        so a run given one would wait for it forever.
        """
        direction, sep, metric = text.partition(":")
        form = "'minimize:METRIC' or 'maximize:METRIC'"
        if not sep or not direction.strip() or not metric.strip():
            raise ValueError(f"objective {text!r} is not of the form {form}")
        meant = _DIRECTIONS.get(direction.strip().lower()[:3])
        if direction.strip() != direction or metric.strip() != metric:
            problem = "has spaces around its direction or metric"
        elif direction not in _DIRECTIONS.values():
            problem = f"has an unknown direction {direction!r}"
        else:
            return cls(direction=direction, metric=metric)  # type: ignore[arg-type]
        if meant is None:
            raise ValueError(f"objective {text!r} {problem}: write it as {form}")
        raise ValueError(f"objective {text!r} {problem}: did you mean '{meant}:{metric.strip()}'?")

    def __str__(self) -> str:
        return f"{self.direction}:{self.metric}"

    def better(self, a: float, b: float) -> bool:
        """True when value ``a`` is strictly better than ``b``."""
        return a < b if self.direction == "minimize" else a > b


class KnobSpec(BaseModel):
    """One knob the training side exposes, with the bounds it accepts.

    ``max_rel_step`` bounds a single change: on a log-scale knob the new value is within a
    factor of ``1 + max_rel_step`` of the current one (1.0 allows halving or doubling); on a
    linear knob it moves by at most ``max_rel_step * (max - min)``, so knobs that start at 0
    (weight decay, dropout) can still move.
    """

    name: str = Field(min_length=1, max_length=200)
    type: Literal["float", "int"] = "float"
    value: float
    min: float
    max: float
    max_rel_step: float = Field(gt=0)
    scale: Scale = Scale.LIN
    apply_at: Boundary = Boundary.STEP
    cooldown_steps: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> KnobSpec:
        if not all(math.isfinite(x) for x in (self.value, self.min, self.max)):
            raise ValueError(f"knob {self.name!r}: value and bounds must be finite")
        if self.min > self.max:
            raise ValueError(f"knob {self.name!r}: min {self.min} is above max {self.max}")
        if self.scale is Scale.LOG and self.min <= 0:
            raise ValueError(f"knob {self.name!r}: a log-scale knob needs min > 0")
        if not self.min <= self.value <= self.max:
            raise ValueError(
                f"knob {self.name!r}: value {self.value} outside [{self.min}, {self.max}]"
            )
        if self.type == "int" and self.value != int(self.value):
            raise ValueError(f"knob {self.name!r}: an int knob's value {self.value} is not whole")
        return self

    def step_limits(self, current: float) -> tuple[float, float]:
        """The lowest and highest value one change may move to from ``current``."""
        if self.scale is Scale.LOG and current > 0:
            factor = 1.0 + self.max_rel_step
            low, high = current / factor, current * factor
        else:
            span = self.max_rel_step * (self.max - self.min)
            low, high = current - span, current + span
        return max(low, self.min), min(high, self.max)


class RunSpec(BaseModel):
    """``atm/spec.json``: what the training side exposes."""

    schema_version: int = SCHEMA_VERSION
    framework: str
    knobs: list[KnobSpec]
    commands: list[Command] = Field(default_factory=list)
    apply_at: Boundary = Boundary.STEP
    # How often the publishing client polls for new params versions (recorded in the spec).
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    published_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _unique_names(self) -> RunSpec:
        names = [k.name for k in self.knobs]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate knob names in spec: {sorted(names)}")
        return self

    def knob(self, name: str) -> KnobSpec | None:
        return next((k for k in self.knobs if k.name == name), None)

    @property
    def knob_values(self) -> dict[str, float]:
        return {k.name: k.value for k in self.knobs}

    def values_problem(self, values: dict[str, float], commands: list[Command]) -> str | None:
        """Why ``values`` and ``commands`` do not fit this spec, or None when they do."""
        for name, value in values.items():
            knob = self.knob(name)
            if knob is None:
                return f"unknown knob {name!r}"
            if not math.isfinite(value):
                return f"{name}={value} is not finite"
            if not knob.min <= value <= knob.max:
                return f"{name}={value} outside [{knob.min}, {knob.max}]"
            if knob.type == "int" and value != int(value):
                return f"{name}={value} is not an integer"
        for command in commands:
            if command not in self.commands:
                return f"command {command.value!r} is not supported by this run"
        return None

    def digest(self) -> str:
        """A short digest of this spec's content, for ``atm.spec.digest``."""
        return hashlib.sha256(_canonical(self.model_dump(mode="json"))).hexdigest()[:16]


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_payload(payload: dict[str, Any], key: str | None) -> str:
    """``hmac-sha256:…`` with a shared key, else ``sha256:…`` (integrity only)."""
    body = _canonical(payload)
    if key:
        return "hmac-sha256:" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(body).hexdigest()


class ParamsVersion(BaseModel):
    """``atm/params/vNNNNNN.json``: one immutable, signed params version.

    ``values`` holds the absolute value of every knob the manager has set so far, so a client
    that skipped an intermediate version still ends up in the intended state.
    """

    version: int = Field(ge=1)
    parent_version: int = Field(ge=0)
    issued_at: float
    source: Source
    decision_id: int = Field(ge=0)
    step: int | None = Field(default=None, description="the run's step the decision was based on")
    values: dict[str, float]
    commands: list[Command] = Field(default_factory=list)
    reason: str = ""
    signature: str = ""

    def unsigned_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature"})

    def signed(self, key: str | None) -> ParamsVersion:
        return self.model_copy(update={"signature": sign_payload(self.unsigned_payload(), key)})

    def signature_problem(self, key: str | None) -> str | None:
        """Why the signature does not verify, or None when it does."""
        scheme = self.signature.partition(":")[0]
        if scheme == "hmac-sha256" and not key:
            return f"signed with a key this process lacks (set {SIGNING_KEY_ENV})"
        if key and scheme != "hmac-sha256":
            return "not signed with the shared key"
        if scheme not in ("sha256", "hmac-sha256"):
            return "missing or unknown signature"
        expected = sign_payload(self.unsigned_payload(), key)
        if not hmac.compare_digest(expected, self.signature):
            return "signature does not match the content (tampered or corrupted)"
        return None

    def problem(self, version: int, spec: RunSpec | None, key: str | None) -> str | None:
        """Why this file cannot be params version ``version`` of a run with ``spec``, or None.

        The checks both sides make before trusting a version: it names itself, it comes after
        its parent, its signature verifies, and every value and command fits the spec. Where
        its parent sits in the chain is ``chain_problem``'s business.
        """
        if self.version != version:
            return f"file claims version {self.version}, expected {version}"
        if self.parent_version >= version:
            return (
                f"parent version {self.parent_version} does not continue the chain "
                f"(a parent comes before v{version})"
            )
        if problem := self.signature_problem(key):
            return problem
        return None if spec is None else spec.values_problem(self.values, self.commands)


Verdict = Literal["accepted", "clamped", "rejected", "noop"]


class KnobVerdict(BaseModel):
    """What validation did with one proposed change."""

    knob: str
    proposed: Any = None
    current: float | None = None
    final: float | None = None
    verdict: Verdict
    reason: str = ""


class CommandVerdict(BaseModel):
    command: str
    verdict: Literal["accepted", "rejected"]
    reason: str = ""


class Proposal(BaseModel):
    """A policy's (or a human's) proposed update, before validation."""

    action: Literal["no_action", "adjust", "command"] = "adjust"
    changes: dict[str, Any] = Field(default_factory=dict)
    commands: list[str] = Field(default_factory=list)
    reason: str = ""
    expected_effect: str = ""
    watch: str = ""


class Outcome(BaseModel):
    """The objective before a change and as measured after it."""

    metric: str
    before: float | None
    after: float | None
    measured_at_step: int
    evaluations_after: int


DecisionStatus = Literal["issued", "no_action", "rejected", "advisory", "stale", "error"]


class AuditRecord(BaseModel):
    """``atm/audit/dNNNNNN.json``: one decision, whatever came of it."""

    decision_id: int = Field(ge=0)
    run_id: str
    created_at: float
    source: Source
    policy: str
    model: str | None = None
    status: DecisionStatus
    step: int | None = None
    telemetry: dict[str, Any] | None = None
    prompt: str | None = None
    prompt_digest: str | None = None
    raw_response: str | None = None
    proposal: Proposal | None = None
    verdicts: list[KnobVerdict] = Field(default_factory=list)
    command_verdicts: list[CommandVerdict] = Field(default_factory=list)
    params_version: int | None = None
    values: dict[str, float] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    usage: dict[str, int] = Field(default_factory=dict)
    error: str | None = None
    # Why the decision was made by whom it was: the rules acting for a model too slow for the
    # run, or in place of a model's answer that came too late.
    note: str | None = None
    outcome: Outcome | None = None

    def summary(self) -> str:
        """One human-readable line, as shown in ``atm.last_intervention``: what was decided,
        why, and the note on how (the rules acting without a slow model, say)."""
        changed = [
            f"{v.knob} {_fmt(v.current)}→{_fmt(v.final)}"
            for v in self.verdicts
            if v.verdict in ("accepted", "clamped")
        ]
        changed += [c.command for c in self.command_verdicts if c.verdict == "accepted"]
        what = ", ".join(changed) or "no change"
        why = f" — {self.proposal.reason}" if self.proposal and self.proposal.reason else ""
        why += f" ({self.note})" if self.note else ""
        if self.params_version:
            return f"v{self.params_version} @ step {self.step} by {self.source}: {what}{why}"
        # Not issued: say so before anything that reads like a change made.
        if self.status == "stale":
            head = "discarded as stale"
        elif self.status == "advisory":
            head = "advisory, not applied"
        else:
            head = self.status.replace("_", " ")
        late = f" ({self.error})" if self.status == "stale" and self.error else ""
        would = f": would have made {what}" if changed else ""
        return f"{head} @ step {self.step} by {self.source}{would}{why}{late}"


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"
