"""The cost benchmarks, small: they run, measure and write what they measured (``-m bench``).

The figures in the README come from the scripts at full size; these check that the scripts
still measure what they say on a few runs and steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_scripts import bench_colocation, bench_scale


@pytest.mark.bench
def test_bench_scale_on_a_few_runs(tmp_path: Path) -> None:
    ticks = bench_scale.main(
        [
            "--store", "sqlite", "--runs", "5,20", "--points", "200",
            "--long-points", "2000", "--history-runs", "3", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert {t.kind for t in ticks} == {"restart", "quiet", "new evaluation"}
    # A quiet tick costs the listing alone: as many requests for 20 runs as for 5.
    quiet = {
        t.runs: t.requests for t in ticks if t.kind == "quiet" and t.scenario.startswith("runs-")
    }
    assert set(quiet) == {5, 20} and quiet[5] == quiet[20], quiet
    # A tick after every run logged a new evaluation decides for every run.
    news = [t for t in ticks if t.kind == "new evaluation"]
    assert news and all(t.decisions == t.runs for t in news), news
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["ticks"]) == len(ticks) and results["quiet_client_polls_per_s"] > 0
    assert "| " in (tmp_path / "results.md").read_text()


@pytest.mark.bench
def test_bench_colocation_side_by_side(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="the managed variant runs the embedded model")
    variants = ["alone", "client", "managed", "managed-idle"]
    trials = bench_colocation.main(
        [
            "--repeats",
            "1",
            "--steps",
            "60",
            "--variants",
            ",".join(variants),
            "--out",
            str(tmp_path),
        ]
    )
    assert [t.variant for t in trials] == variants
    assert all(t.steps >= 50 and 0 < t.median_s <= t.p99_s <= t.max_s for t in trials)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {variant} |" in table for variant in variants)
