"""A compact telemetry snapshot of a run, built from metric points read incrementally."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, Field

from integrations.knobs import Knob
from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    Command,
    Objective,
    Outcome,
    RunSpec,
)
from integrations.trackers import MetricPoint, Window

TRAIN_LOSS_KEYS = ("loss", "train_loss", "train/loss")
LR_KEYS = (Knob.LEARNING_RATE.value, "lr", "train/learning_rate")
GRAD_NORM_KEYS = ("grad_norm", "train/grad_norm")
# Latest values of these, where a run logs them, reach policies as ``signals``: how large the
# policy updates are (PPO's KL and clip fraction) and how unsafe the evaluated policy is.
APPROX_KL_KEYS = ("train/approx_kl", "approx_kl")
# Minus the policy's entropy, as stable-baselines3 logs it.
ENTROPY_LOSS_KEYS = ("train/entropy_loss",)
SAFETY_KEYS = ("eval/collision", "eval/cost", "eval/collision_rate", "rollout/collision_rate")
SIGNAL_KEYS = (*APPROX_KL_KEYS, "train/clip_fraction", *ENTROPY_LOSS_KEYS, *SAFETY_KEYS)
RECENT_EVALS = 8
# Train-loss points whose mean is the loss's starting level, and the points each mean of the
# recent and best train loss averages.
START_POINTS = 10
MEAN_POINTS = 10
EVALS_FOR_OUTCOME = 2
# Points of each metric a reader keeps, and reads at most when it starts.
METRIC_WINDOW = 400
# Evaluations of the objective a reader keeps, and reads at most when it starts: what a
# snapshot shows and any patience needs. Those before are kept as the best and the first, and
# how many came after the best; after a restart, as the last decision's snapshot saw them.
OBJECTIVE_WINDOW = 4 * RECENT_EVALS
ROLLBACK = Command.ROLLBACK_TO_BEST.value


@dataclass
class Intervention:
    """An issued params version, as the daemon knows it from the audit trail."""

    version: int
    decision_id: int
    decision_step: int
    source: str
    changes: dict[str, tuple[float | None, float | None]]
    commands: list[str]
    expected_effect: str = ""
    applied_step: int | None = None
    outcome: Outcome | None = None

    @property
    def step(self) -> int:
        """Where it took effect: applied there, or decided there while not applied yet (from
        its decision on, what came before is no guide: other settings are coming)."""
        return self.applied_step if self.applied_step is not None else self.decision_step


class ObjectiveView(BaseModel):
    metric: str
    direction: str
    last: float | None = None
    best: float | None = None
    best_step: int | None = None
    evaluations: int = 0
    evals_since_best: int = 0
    first: float | None = None
    recent: list[tuple[int, float]] = Field(default_factory=list)
    trend: float | None = Field(default=None, description="relative change per evaluation")
    seconds_per_eval: float | None = Field(
        default=None, description="median wall-clock seconds between the recent evaluations"
    )


class TrainView(BaseModel):
    """The train loss: where it started (its own scale), and its recent mean, best mean, peak,
    spikes and trend, measured from ``since_step`` (the last intervention's) on."""

    metric: str | None = None
    last: float | None = None
    first: float | None = Field(default=None, description="the first value the run logged")
    start: float | None = Field(
        default=None, description="mean of the first points the run logged: the loss's scale"
    )
    recent_mean: float | None = None
    best_mean: float | None = None
    peak: float | None = Field(default=None, description="the highest mean of a few points")
    spikes: int = 0
    spike_rise: float | None = Field(
        default=None, description="median height of the spikes above the points before them"
    )
    trend: float | None = None
    since_step: int | None = Field(
        default=None,
        description="points after this step only: those before the last intervention were "
        "made with other settings, or with weights a rollback replaced",
    )


class GapView(BaseModel):
    """Objective minus train loss at recent evaluations (loss objectives only)."""

    last: float | None = None
    relative: float | None = None
    trend: float | None = Field(default=None, description="change of the gap per evaluation")


class InterventionView(BaseModel):
    version: int
    step: int
    source: str
    changes: dict[str, str]
    expected: str = ""
    objective_before: float | None = None
    objective_after: float | None = None
    evaluations_after: int = 0


class Snapshot(BaseModel):
    """What a policy sees: compact, JSON-serializable, stored in every audit record."""

    step: int
    objective: ObjectiveView
    train: TrainView
    gap: GapView
    non_finite: bool
    learning_rate_logged: float | None = None
    signals: dict[str, float] = Field(default_factory=dict, description="latest, by metric key")
    signal_rise: dict[str, float] = Field(
        default_factory=dict, description="recent mean minus the lowest earlier mean, by key"
    )
    knobs: dict[str, dict[str, float | str]]
    interventions: list[InterventionView]
    rolled_back_at: int | None = Field(
        default=None,
        description="the step the last rollback took effect at (decided at, until applied): "
        "what came before it describes weights the run no longer has",
    )


class RunTelemetry:
    """Windows of a run's metrics, fed with points as they are read."""

    def __init__(
        self,
        objective: Objective,
        window: int = METRIC_WINDOW,
        objective_window: int = OBJECTIVE_WINDOW,
    ) -> None:
        self.window = window
        self.objective = objective
        self.evals: deque[tuple[int, float]] = deque(maxlen=objective_window)
        # When the recent evaluations were logged (unix seconds): the run's pace.
        self.eval_times: deque[float] = deque(maxlen=RECENT_EVALS + 1)
        self.evaluations = 0  # read by this reader, those before the window included
        self.train: deque[tuple[int, float]] = deque(maxlen=window)
        self.train_key: str | None = None
        # Where the loss started, kept as its first points leave the window.
        self.train_first: float | None = None
        self.train_start: float | None = None
        self._start_points: list[float] = []
        self.lr: float | None = None
        self.step = 0
        self.applied_steps: dict[int, int] = {}
        self.non_finite_steps: list[int] = []
        self.signals: dict[str, float] = {}
        self.signal_history: dict[str, deque[float]] = {}
        # The evaluations before the window: the best (step, value) and the first value, and
        # how many came after the best, counted up to the step ``counted_until``.
        self.earlier_best: tuple[int, float] | None = None
        self.earlier_first: float | None = None
        # A first read that found the objective's window full began mid-run: its first
        # evaluation is not the run's, which this reader never saw.
        self.first_unknown = False
        self.earlier_since_best = 0
        self.counted_until = -1

    @property
    def read_window(self) -> Window:
        """How much of each key a first read takes."""
        return Window(self.window, {self.objective.metric: self.evals.maxlen or self.window})

    def remember(self, earlier: ObjectiveView, train: TrainView | None = None) -> None:
        """The best and first evaluations an earlier snapshot saw, and the evaluations since
        that best (and where the train loss started), for a reader that has read only a
        recent window of the history (after a restart)."""
        if train is not None and train.start is not None:
            self.train_first, self.train_start = train.first, train.start
        if earlier.best is not None and earlier.best_step is not None:
            self.earlier_best = (earlier.best_step, earlier.best)
            self.earlier_since_best = earlier.evals_since_best
            self.counted_until = earlier.recent[-1][0] if earlier.recent else earlier.best_step
        if earlier.first is not None:
            self.earlier_first = earlier.first

    def _leaving(self, step: int, value: float) -> None:
        """An evaluation leaves the window: what it adds to the earlier ones."""
        if math.isfinite(value):
            if self.earlier_first is None and not self.first_unknown:
                self.earlier_first = value
            if self.earlier_best is None or self.objective.better(value, self.earlier_best[1]):
                self.earlier_best = (step, value)
                self.earlier_since_best, self.counted_until = 0, step
                return
        if step > self.counted_until:
            self.earlier_since_best += 1
            self.counted_until = step

    def keys_to_read(self, available: Iterable[str]) -> list[str]:
        """The metric keys worth reading from what the run has logged."""
        available = set(available)
        wanted = {self.objective.metric, METRIC_PARAMS_VERSION}
        wanted |= {k for k in (*TRAIN_LOSS_KEYS, *LR_KEYS, *SIGNAL_KEYS) if k in available}
        return sorted(k for k in wanted if k in available)

    def add(self, points: Iterable[MetricPoint]) -> None:
        for p in points:
            self.step = max(self.step, p.step)
            if p.key == METRIC_PARAMS_VERSION:
                self.applied_steps.setdefault(int(p.value), p.step)
                continue
            if not math.isfinite(p.value):
                self.non_finite_steps.append(p.step)
            if p.key in SIGNAL_KEYS:
                self.signals[p.key] = p.value
                self.signal_history.setdefault(p.key, deque(maxlen=self.window)).append(p.value)
            if p.key == self.objective.metric:
                if len(self.evals) == self.evals.maxlen:
                    self._leaving(*self.evals[0])
                self.evals.append((p.step, p.value))
                self.eval_times.append(p.timestamp / 1000)
                self.evaluations += 1
            elif p.key in TRAIN_LOSS_KEYS and self.train_key in (None, p.key):
                self.train_key = p.key
                self.train.append((p.step, p.value))
                self._note_start(p.value)
            elif p.key in LR_KEYS:
                self.lr = p.value

    def _note_start(self, value: float) -> None:
        if self.train_start is not None or not math.isfinite(value):
            return
        if self.train_first is None:
            self.train_first = value
        self._start_points.append(value)
        if len(self._start_points) == START_POINTS:
            self.train_start = statistics.fmean(self._start_points)

    def signal_rise(self, key: str, width: int = 5) -> float | None:
        """How far the mean of a signal's last ``width`` points is above the lowest mean of
        ``width`` consecutive points before them: a rate that climbed back up, not one that is
        merely high (as a collision rate is while a policy is still random)."""
        values = [v for v in self.signal_history.get(key, ()) if math.isfinite(v)]
        if len(values) < 2 * width:
            return None
        earlier = [
            statistics.fmean(values[i : i + width]) for i in range(len(values) - 2 * width + 1)
        ]
        return statistics.fmean(values[-width:]) - min(earlier)

    def regressed_evals(self, margin: float, after_step: int = -1) -> int:
        """How many of the latest evaluations after ``after_step``, in a row, are worse than the
        best so far by more than ``margin`` of its magnitude (non-finite ones count as worse)."""
        best = self.objective_view().best
        if best is None:
            return 0
        sign = 1.0 if self.objective.direction == "minimize" else -1.0
        count = 0
        for step, value in reversed(self.evals):
            worse = not math.isfinite(value) or sign * (value - best) > margin * abs(best)
            if step <= after_step or not worse:
                break
            count += 1
        return count

    def objective_view(self) -> ObjectiveView:
        view = ObjectiveView(metric=self.objective.metric, direction=self.objective.direction)
        finite = [(s, v) for s, v in self.evals if math.isfinite(v)]
        if not self.evals or not (finite or self.earlier_best):
            return view
        earlier = self.earlier_best is not None
        best_step, best = self.earlier_best or finite[0]
        for s, v in finite:
            if self.objective.better(v, best):
                best_step, best, earlier = s, v, False
        view.last = self.evals[-1][1]
        view.best, view.best_step = best, best_step
        view.evaluations = self.evaluations
        if earlier:
            after = max(best_step, self.counted_until)
            since = self.earlier_since_best + sum(1 for s, _ in self.evals if s > after)
        else:
            since = sum(1 for s, _ in self.evals if s > best_step)
        view.evals_since_best = since
        if self.earlier_first is not None:
            view.first = self.earlier_first
        elif not self.first_unknown:
            view.first = finite[0][1]
        view.recent = [(s, round(v, 6)) for s, v in list(self.evals)[-RECENT_EVALS:]]
        view.trend = _relative_slope([v for _, v in finite[-4:]])
        view.seconds_per_eval = self.seconds_per_eval()
        return view

    def read_first(self, points: Iterable[MetricPoint]) -> None:
        """Take a first read of the run (``points``, oldest first), noting when the
        objective's window was full: the run's first evaluations came before it."""
        points = list(points)
        self.add(points)
        objective = sum(1 for p in points if p.key == self.objective.metric)
        if objective >= (self.evals.maxlen or 0) and self.earlier_first is None:
            self.first_unknown = True

    def seconds_per_eval(self) -> float | None:
        """The median wall-clock time between the recent evaluations (None before two)."""
        times = sorted(self.eval_times)
        gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
        return round(statistics.median(gaps), 3) if gaps else None

    def train_view(self, since_step: int | None = None) -> TrainView:
        """The train loss, its baselines (best mean, spikes) measured after ``since_step``."""
        after = -1 if since_step is None else since_step
        values = [v for s, v in self.train if s > after and math.isfinite(v)]
        start = self.train_start
        if start is None and self._start_points:
            start = statistics.fmean(self._start_points)  # fewer points than START_POINTS yet
        view = TrainView(
            metric=self.train_key, first=self.train_first, start=start, since_step=since_step
        )
        if not values:
            return view
        view.last = values[-1]
        width = MEAN_POINTS
        view.recent_mean = statistics.fmean(values[-width:])
        means = [
            statistics.fmean(values[i : i + width])
            for i in range(0, max(1, len(values) - width + 1), width // 2)
        ]
        view.best_mean = min(means)
        view.peak = max(statistics.fmean(values[i : i + 5]) for i in range(0, len(values), 5))
        rises = _spikes(values)
        view.spikes = len(rises)
        view.spike_rise = statistics.median(rises) if rises else None
        view.trend = _relative_slope(
            [statistics.fmean(values[i : i + 5]) for i in range(0, len(values), 5)][-4:]
        )
        return view

    def train_mean_near(self, step: int, width: int = 5, after: int = -1) -> float | None:
        near = [v for s, v in self.train if after < s <= step and math.isfinite(v)][-width:]
        return statistics.fmean(near) if near else None

    def gap_view(self, since_step: int | None = None) -> GapView:
        """The eval-train gap at the last evaluations (those after ``since_step``)."""
        if self.objective.direction != "minimize" or "loss" not in self.objective.metric:
            return GapView()
        after = -1 if since_step is None else since_step
        gaps = []
        for s, v in [e for e in self.evals if e[0] > after][-4:]:
            train = self.train_mean_near(s, after=after)
            if train is not None and math.isfinite(v):
                gaps.append((v - train, train))
        if not gaps:
            return GapView()
        last, train = gaps[-1]
        trend = (gaps[-1][0] - gaps[0][0]) / (len(gaps) - 1) if len(gaps) > 1 else None
        return GapView(last=last, relative=last / abs(train) if train else None, trend=trend)

    def evaluations_since(self, step: int) -> int:
        """Evaluations of the objective at ``step`` or after (those kept: at most the window)."""
        return sum(1 for s, _ in self.evals if s >= step)

    def outcome(self, item: Intervention) -> Outcome:
        """The objective just before an intervention took effect, and as measured after."""
        start = item.applied_step if item.applied_step is not None else item.decision_step
        before = [v for s, v in self.evals if s < start]
        after = [v for s, v in self.evals if s >= start]
        measured = after[:EVALS_FOR_OUTCOME]
        return Outcome(
            metric=self.objective.metric,
            before=before[-1] if before else None,
            after=measured[-1] if measured else None,
            measured_at_step=self.step,
            evaluations_after=len(measured),
        )

    def snapshot(
        self, spec: RunSpec | None, values: dict[str, float], history: list[Intervention]
    ) -> Snapshot:
        knobs: dict[str, dict[str, float | str]] = {}
        for knob in spec.knobs if spec else []:
            current = values.get(knob.name, knob.value)
            knobs[knob.name] = {
                "value": current,
                "min": knob.min,
                "max": knob.max,
                "scale": knob.scale.value,
            }
        since = history[-1].decision_step if history else -1
        rolled_back = rollback_step(history)
        changed = history[-1].step if history else None
        views = []
        for item in history[-5:]:
            # Once measured, an outcome is the one recorded: its evaluations may have left
            # the window since.
            outcome = item.outcome or self.outcome(item)
            views.append(
                InterventionView(
                    version=item.version,
                    step=item.step,
                    source=item.source,
                    changes={k: f"{_g(a)}→{_g(b)}" for k, (a, b) in item.changes.items()}
                    | {c: "command" for c in item.commands},
                    expected=item.expected_effect,
                    objective_before=outcome.before,
                    objective_after=outcome.after,
                    evaluations_after=outcome.evaluations_after,
                )
            )
        return Snapshot(
            step=self.step,
            objective=self.objective_view(),
            train=self.train_view(changed),
            gap=self.gap_view(rolled_back),
            non_finite=any(s > since for s in self.non_finite_steps),
            learning_rate_logged=self.lr,
            signals=dict(sorted(self.signals.items())),
            signal_rise={
                k: round(r, 6)
                for k in sorted(self.signals)
                if (r := self.signal_rise(k)) is not None
            },
            knobs=knobs,
            interventions=views,
            rolled_back_at=rolled_back,
        )


def rollback_step(history: list[Intervention]) -> int | None:
    """The step the last rollback took effect at (``Intervention.step``)."""
    return next((item.step for item in reversed(history) if ROLLBACK in item.commands), None)


def _relative_slope(values: list[float]) -> float | None:
    """Least-squares slope per point, relative to the mean magnitude."""
    n = len(values)
    if n < 2:
        return None
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    scale = abs(mean_y) or 1.0
    return num / den / scale


def _spikes(
    values: list[float], recent: int = 10, lookback: int = 10, k: float = 6.0
) -> list[float]:
    """How far each spike among the recent points rose above what came just before it.

    Each of the last ``recent`` points is compared with the median of the ``lookback`` points
    before it: a spike is above that median by ``k`` MADs and by at least half of it, so a
    loss that is merely falling fast (its early points above a later median) is no spike.
    """
    rises = []
    for i in range(max(lookback, len(values) - recent), len(values)):
        before = values[i - lookback : i]
        median = statistics.median(before)
        mad = statistics.median(abs(v - median) for v in before) or abs(median) * 0.01 or 1e-12
        if values[i] > median + k * mad and values[i] > 1.5 * median:
            rises.append(values[i] - median)
    return rises


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"
