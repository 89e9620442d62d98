"""A managed run with every kind of decision, made by the real writers, for report tests.

The training side is the real ``ManagerClient`` (polled by hand, so each version is applied
and acknowledged at a known step); the daemon side is a fresh ``RunSupervisor`` per
decision, as a daemon restarted between decisions would be; humans go through ``atm set``;
the LLM policy talks to the loopback OpenAI-compatible replay server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from typer.testing import CliRunner

from integrations.client import ManagerClient
from integrations.protocol import AuditRecord, Boundary, Command, KnobSpec, RunSpec
from integrations.trackers import Tracker
from manager_daemon.audit import AuditLog
from manager_daemon.cli import app
from manager_daemon.policies.base import Policy
from manager_daemon.policies.llm import LLMPolicy
from manager_daemon.policies.openai_chat import OpenAIChat
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig
from manager_daemon.validation import ValidationConfig
from tests.openai_replay import ReplayServer, Reply

SPEC = RunSpec(
    framework="torch",
    knobs=[
        KnobSpec(
            name="learning_rate", value=1e-3, min=1e-6, max=1e-2, max_rel_step=3.0, scale="log"
        ),
        KnobSpec(name="weight_decay", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
    ],
    commands=[Command.STOP, Command.ROLLBACK_TO_BEST],
)
CONFIG = SupervisorConfig(validation=ValidationConfig(cooldown_steps=0))
# A reason with markup in it, as a model might answer: the report shows it as text.
INJECTED = '<script>alert("x")</script><img src="https://attacker.example/p.png">'


@dataclass
class Scenario:
    run_id: str
    tracker: Tracker
    # Decision id → what the test expects of it.
    expected: dict[int, dict[str, object]] = field(default_factory=dict)


def _answer(action: str, changes: dict | None = None, reason: str = "") -> str:
    return json.dumps(
        {
            "action": action,
            "changes": changes or {},
            "reason": reason,
            "expect": "eval loss falls",
            "watch": "eval_loss",
        }
    )


class Training:
    """The training side: metrics logged step by step, the real client applying versions."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker, self.run_id, self.step = tracker, run_id, 0
        self.client = ManagerClient(run_id, SPEC, tracker=tracker, objective="minimize:eval_loss")
        self.client.poll_once()  # publishes the spec and the heartbeat

    def train(self, evals: list[float]) -> None:
        """Ten steps per evaluation; a staged version is applied two steps in."""
        for value in evals:
            self.steps(10)
            self.tracker.log_metrics(self.run_id, {"eval_loss": value}, self.step)

    def steps(self, count: int) -> None:
        """Training steps without an evaluation; a staged version is applied at steps 2, 12…"""
        for _ in range(count):
            self.step += 1
            if self.step % 10 == 2:
                self.client.poll_once()
                self.client.apply_pending(Boundary.STEP, self.step, lambda _c, _k: None)
                self.client.poll_once()  # the acknowledgement: atm.params_version @ step
            loss = max(0.2, 3.2 - 0.02 * self.step)
            self.tracker.log_metrics(self.run_id, {"loss": loss}, self.step)


def build(tracker: Tracker, run_id: str, replay: ReplayServer) -> Scenario:
    """LLM, rules and human decisions, a rollback, a clamp, a rejected proposal, a stop."""
    scenario = Scenario(run_id, tracker)
    training = Training(tracker, run_id)
    llm = LLMPolicy(OpenAIChat("replay-model", base_url=replay.base_url))
    runner = CliRunner()

    def tick(policy: Policy) -> AuditRecord:
        record = RunSupervisor(run_id, tracker, AuditLog(tracker), CONFIG).tick(policy)
        assert record is not None, "the policy was expected to decide"
        return record

    def human(*args: str, cooldown: int = 0) -> AuditRecord:
        result = runner.invoke(
            app,
            ["set", run_id, *args, "--cooldown-steps", str(cooldown), "--tracking-uri", tracker.uri],
        )
        assert result.exit_code in (0, 1), result.output
        return AuditLog(tracker).records(run_id)[-1]

    training.train([3.0, 2.6, 2.3, 2.1])
    replay.replies = [Reply(_answer("adjust", {"learning_rate": 5e-4}, INJECTED))]
    r = tick(llm)
    scenario.expected[r.decision_id] = {
        "source": "llm",
        "status": "issued",
        "verdicts": {"learning_rate": "accepted"},
    }

    training.train([2.0, 1.9, 1.95, 2.05])
    r = tick(RulesPolicy())
    scenario.expected[r.decision_id] = {"source": "rules", "status": "issued"}

    r = human("weight_decay=0.45", "--reason", "more regularisation")
    scenario.expected[r.decision_id] = {
        "source": "human",
        "status": "issued",
        "verdicts": {"weight_decay": "clamped"},
    }
    # The lr was changed a few steps ago: in a long cooldown, the change is refused.
    r = human("learning_rate=4e-4", "--reason", "a little lower", cooldown=1000)
    scenario.expected[r.decision_id] = {
        "source": "human",
        "status": "rejected",
        "verdicts": {"learning_rate": "rejected"},
    }

    training.train([2.1, 2.2, 2.3])
    replay.replies = [Reply(_answer("rollback_to_best", reason="regressed since the best"))]
    r = tick(llm)
    scenario.expected[r.decision_id] = {
        "source": "llm",
        "status": "issued",
        "verdicts": {"rollback_to_best": "accepted"},
    }

    training.train([1.92, 1.9])
    r = human("stop", "--reason", "good enough")
    scenario.expected[r.decision_id] = {
        "source": "human",
        "status": "issued",
        "verdicts": {"stop": "accepted"},
    }
    training.train([1.88, 1.87])
    # A last pass measures the outcomes of the latest versions.
    RunSupervisor(run_id, tracker, AuditLog(tracker), CONFIG).refresh()
    return scenario
