"""A reader keeps a bounded window of the objective's evaluations and sums up those before it:
the view it gives (best, its step, first, evaluations since the best) is the one a reader that
kept every evaluation gives, both as evaluations leave its window and after a restart that
reads only the last window and remembers the last decision's snapshot."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from integrations.protocol import Objective
from integrations.trackers import MetricPoint
from manager_daemon.telemetry import ObjectiveView, RunTelemetry

EVERYTHING = 10**9
VALUES = st.lists(
    st.one_of(
        st.floats(min_value=-5, max_value=5, allow_nan=False, allow_infinity=False),
        st.sampled_from([math.nan, math.inf, 1.0, 0.5]),  # non-finite ones, and ties
    ),
    min_size=1,
    max_size=60,
)
DIRECTIONS = st.sampled_from(["minimize", "maximize"])


def evaluations(values: list[float]) -> list[MetricPoint]:
    return [MetricPoint("eval_loss", 10 * (i + 1), v, 10 * (i + 1)) for i, v in enumerate(values)]


def summary(view: ObjectiveView) -> tuple[object, ...]:
    return view.best, view.best_step, view.first, view.evals_since_best, repr(view.last)


def reader(direction: str, window: int) -> RunTelemetry:
    return RunTelemetry(Objective.parse(f"{direction}:eval_loss"), objective_window=window)


@given(VALUES, DIRECTIONS, st.integers(1, 10))
def test_a_bounded_window_gives_the_view_of_every_evaluation(
    values: list[float], direction: str, window: int
) -> None:
    everything, bounded = reader(direction, EVERYTHING), reader(direction, window)
    for point in evaluations(values):  # one at a time, as ticks read them
        everything.add([point])
        bounded.add([point])
    assert len(bounded.evals) == min(window, len(values))
    assert bounded.evaluations == everything.evaluations == len(values)
    assert summary(bounded.objective_view()) == summary(everything.objective_view())


@given(VALUES, DIRECTIONS, st.data())
def test_a_restart_reading_the_last_window_gives_the_same_view(
    values: list[float], direction: str, data: st.DataObject
) -> None:
    points = evaluations(values)
    decided = data.draw(st.integers(0, len(values) - 1), label="evaluations at the decision")
    before = reader(direction, EVERYTHING)
    before.add(points[: decided + 1])
    snapshot = before.objective_view()  # as the last decision's audit record keeps it
    everything = reader(direction, EVERYTHING)
    everything.add(points)

    # The restart's window reaches back to the decision at least: nothing goes uncounted.
    last = min(decided + 1, len(values) - 1)
    start = data.draw(st.integers(0, last), label="first evaluation in the window")
    restarted = reader(direction, len(values) - start)
    restarted.remember(snapshot)
    restarted.add(points[start:])
    assert summary(restarted.objective_view()) == summary(everything.objective_view())
