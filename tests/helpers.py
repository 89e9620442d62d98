"""Small helpers shared by tests."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_MANAGED,
    TAG_PARAMS_VERSION,
    Command,
    KnobSpec,
    Objective,
    ParamsVersion,
    RunSpec,
    Source,
    params_path,
)
from integrations.torch_hooks import TorchKnobs
from integrations.trackers import MetricPoint, Tracker, TrackerError
from manager_daemon.telemetry import Intervention, RunTelemetry, Snapshot
from manager_daemon.validation import Menu, RunState, ValidationConfig, build_menu

if TYPE_CHECKING:
    from tests.conftest import Backend


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, every: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def issue(
    tracker: Tracker, run_id: str, version: int, values: dict[str, float], **kw: object
) -> None:
    """Write a correctly signed params version and bump the tag, as the daemon would."""
    fields: dict[str, object] = dict(
        version=version,
        parent_version=version - 1,
        issued_at=time.time(),
        source=Source.HUMAN,
        decision_id=version,
        values=values,
    )
    fields.update(kw)
    params = ParamsVersion(**fields).signed(None)  # type: ignore[arg-type]
    tracker.write_json(run_id, params_path(version), params.model_dump(mode="json"))
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: str(version)})


class LoopThread(threading.Thread):
    """A plain torch training loop using ``TorchKnobs``, run on a thread for tests.

    With ``evaluate_every`` it also logs ``loss`` and ``eval_loss`` every that many steps, as
    an asynchronous logger would: from a thread of its own that keeps what it could not send
    (the tracker down) for later, so that a step never waits for the tracker.
    """

    def __init__(
        self,
        run_id: str,
        uri: str,
        *,
        steps: int = 100_000,
        sleep: float = 0.01,
        evaluate_every: int = 0,
    ) -> None:
        super().__init__(daemon=True)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, weight_decay=1e-4)
        self.knobs = TorchKnobs(
            optimizer=self.optimizer, model=self.model, live={"aux_weight": 0.5}
        )
        self.knobs.start(run_id, uri, poll_interval=0.5)
        self.steps, self.sleep = steps, sleep
        self.step = 0
        self.lrs: list[tuple[int, float]] = []
        self.step_times: list[float] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.evaluate_every = evaluate_every
        self._to_log: queue.Queue[tuple[int, dict[str, float]]] = queue.Queue()
        self._logger = threading.Thread(target=self._log_metrics, args=(run_id,), daemon=True)

    def _log_metrics(self, run_id: str) -> None:
        tracker = self.knobs.client.tracker
        while not (self.halt.is_set() and self._to_log.empty()):
            try:
                step, values = self._to_log.get(timeout=0.2)
            except queue.Empty:
                continue
            while not self.halt.is_set():
                try:
                    tracker.log_metrics(run_id, values, step)
                    break
                except TrackerError:
                    time.sleep(0.5)

    def run(self) -> None:
        if self.evaluate_every:
            self._logger.start()
        try:
            for step in range(self.steps):
                if self.halt.is_set() or self.knobs.stop_requested:
                    break
                started = time.perf_counter()
                self.knobs.step(step)
                x = torch.randn(16, 4)
                loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean() * self.knobs[
                    "aux_weight"
                ]
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.step_times.append(time.perf_counter() - started)
                self.lrs.append((step, self.optimizer.param_groups[0]["lr"]))
                if self.evaluate_every and step % self.evaluate_every == 0 and step:
                    value = loss.item()
                    self._to_log.put((step, {"loss": value, "eval_loss": value}))
                self.step = step
                time.sleep(self.sleep)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.knobs.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        if self._logger.is_alive():
            self._logger.join(30)


OVERFIT_SPEC = RunSpec(
    framework="transformers",
    knobs=[
        KnobSpec(
            name="learning_rate", value=1e-3, min=1e-6, max=1e-2, max_rel_step=3.0, scale="log"
        ),
        KnobSpec(name="weight_decay", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
    ],
    commands=[Command.STOP],
)


def overfitting_run(backend: Backend) -> str:
    """A managed run whose eval loss turned up while its train loss keeps falling."""
    run_id = backend.new_run()
    evals = dict(zip(range(10, 80, 10), [3.0, 2.5, 2.2, 2.1, 2.15, 2.25, 2.4], strict=True))
    rows = [(step, {"loss": 3.0 - 2.2 * step / 69}) for step in range(70)]
    rows += [(step, {"eval_loss": value}) for step, value in evals.items()]
    backend.log_history(run_id, rows)
    tracker = backend.tracker
    tracker.write_json(run_id, SPEC_PATH, OVERFIT_SPEC.model_dump(mode="json"))
    tracker.set_tags(run_id, {TAG_MANAGED: "true", TAG_CLIENT_HEARTBEAT: str(time.time())})
    return run_id


def telemetry(train: list[float], evals: list[float], eval_every: int = 10) -> RunTelemetry:
    t = RunTelemetry(Objective.parse("minimize:eval_loss"))
    points = [MetricPoint("loss", i, v, i) for i, v in enumerate(train)]
    points += [
        MetricPoint("eval_loss", (i + 1) * eval_every, v, (i + 1) * eval_every)
        for i, v in enumerate(evals)
    ]
    t.add(sorted(points, key=lambda p: p.timestamp))
    return t


def snapshot_and_menu(
    t: RunTelemetry,
    spec: RunSpec,
    source: Source,
    values: dict[str, float] | None = None,
    history: list[Intervention] | None = None,
) -> tuple[Snapshot, Menu]:
    """What a policy is given for telemetry ``t``: its snapshot, and the menu without cooldowns."""
    values = values or spec.knob_values
    state = RunState(
        spec=spec, values=values, step=t.step, evals_since_best=t.objective_view().evals_since_best
    )
    menu = build_menu(state, ValidationConfig(cooldown_steps=0), source)
    return t.snapshot(spec, values, history or []), menu


def applied_then_evaluated(backend: Backend, run_id: str, version: int, *evals: float) -> None:
    """What a client and the run do after ``overfitting_run``'s first decision: version
    ``version`` applied at step 71, then evaluations at steps 100, 200, …"""
    backend.log_metrics(run_id, {METRIC_PARAMS_VERSION: version}, 71)
    backend.tracker.set_tags(run_id, {TAG_CLIENT_APPLIED_VERSION: str(version)})
    for i, value in enumerate(evals):
        backend.log_metrics(run_id, {"eval_loss": value}, 100 * (i + 1))
