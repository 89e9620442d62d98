"""The MuJoCo benchmark at preset ``tiny``: fixed and rules-managed runs of both recipes really
train, evaluate on every split and land in MLflow with the bench's table and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mujoco")

from mlflow.tracking import MlflowClient

from integrations.protocol import SPEC_PATH, TAG_MANAGED
from integrations.trackers import Tracker


@pytest.mark.slow
def test_tiny_preset_runs_both_recipes_fixed_and_managed(
    tracking_uri: str, tracker: Tracker, repo_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(repo_root / "train_scripts" / "bench_mujoco.py"),
            *("--preset", "tiny", "--seeds", "1", "--variants", "fixed,rules"),
            *("--out", str(out), "--no-filmstrip"),
        ],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert {(r["recipe"], r["variant"]) for r in results} == {
        (recipe, variant) for recipe in ("cautious", "reckless") for variant in ("fixed", "rules")
    }
    client = MlflowClient(tracking_uri)
    for r in results:
        assert r["env_steps"] == 512 and set(r["splits"]) == {"easy", "medium", "hard"}
        for key in ("eval/safe_success", "eval/collision", "eval/hard/collision"):
            assert client.get_metric_history(r["run_id"], key), (r["recipe"], r["variant"], key)
        managed = r["variant"] == "rules"
        assert (TAG_MANAGED in client.get_run(r["run_id"]).data.tags) is managed
        if managed:
            assert "rollback_to_best" in tracker.read_json(r["run_id"], SPEC_PATH)["commands"]
    assert "| reckless | rules |" in (out / "results.md").read_text()
    summary = client.search_runs([client.get_experiment_by_name("mujoco-bench").experiment_id])[0]
    logged = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"results.json", "results.md", "curves.png"} <= logged
