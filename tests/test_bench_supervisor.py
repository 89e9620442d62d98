"""The supervisor benchmark, small: it runs, judges and writes what it measured (``-m bench``).

The figures in the README come from the script over the whole corpus; this checks on a few
runs that a healthy managed run is left alone (and so ends exactly as unmanaged), that an lr
spike is caught soon after its onset, and that the results are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_scripts import bench_supervisor
from train_scripts.supervisor_tasks import FAULTS, TASKS, onset_step


@pytest.mark.bench
def test_bench_supervisor_on_a_few_runs(tmp_path: Path) -> None:
    results = bench_supervisor.main(
        [
            "--tasks", "digits,ppo", "--faults", "none,lr_spike", "--seeds", "0",
            "--policy", "rules", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    runs = {(r.task, r.fault, r.policy): r for r in results}
    assert set(runs) == {
        (task, fault, policy)
        for task in ("digits", "ppo")
        for fault in ("none", "lr_spike")
        for policy in ("unmanaged", "rules")
    }
    for task in ("digits", "ppo"):
        healthy, alone = runs[(task, "none", "rules")], runs[(task, "none", "unmanaged")]
        assert healthy.interventions == [], healthy.interventions
        assert healthy.final == alone.final and healthy.ratio == 1.0, "managing changed nothing"
    spiked = runs[("digits", "lr_spike", "rules")]
    onset = onset_step(FAULTS["lr_spike"], TASKS["digits"].steps)
    first = spiked.interventions[0]
    assert first["decision_step"] >= onset, "nothing before the fault"
    assert first["changes"]["learning_rate"][1] < first["changes"]["learning_rate"][0]
    assert spiked.detected_at is not None and spiked.latency is not None
    assert 1 <= spiked.latency <= 2, spiked

    payload = json.loads((tmp_path / "results.json").read_text())
    summary = payload["summary"]["rules"]
    assert summary["healthy_runs"] == 2 and summary["healthy_left_alone"] == 1.0
    assert summary["sick_runs"] == 2 and payload["setup"]["seeds"] == [0]
    assert len(payload["runs"]) == len(results)
    assert "| digits | lr_spike | rules |" in (tmp_path / "results.md").read_text()
