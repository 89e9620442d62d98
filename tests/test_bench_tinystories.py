"""The TinyStories benchmark at preset ``tiny``: every variant really runs and is recorded.

A real MLflow server, real transformers training (``train_scripts/tinystories.py`` on generated
stories), managed runs under ``atm run`` beside the benchmark's daemons; the LLM variant talks
to a loopback OpenAI-compatible server replaying one decision (halve the learning rate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import TAG_MANAGED, Source
from integrations.trackers import Tracker
from manager_daemon.audit import AuditLog
from tests.openai_replay import ReplayServer, halve_lr
from train_scripts.tinystories import PRESETS

VARIANTS = {"fixed", "rules", "llm", "plateau"}


@pytest.mark.slow
def test_tiny_preset_runs_every_variant_into_mlflow(
    tracking_uri: str, tracker: Tracker, repo_root: Path, tmp_path: Path
) -> None:
    replay = ReplayServer(replies=[halve_lr(PRESETS["tiny"].recipe.learning_rate)])
    out = tmp_path / "bench"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(repo_root / "train_scripts" / "bench_tinystories.py"),
                *("--preset", "tiny", "--seeds", "1", "--lr-factors", "3", "--out", str(out)),
                *("--llm-base-url", replay.base_url, "--llm-model", "replay"),
            ],
            cwd=tmp_path,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        replay.close()
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in results if not r["sweep"]} == VARIANTS
    assert {(r["variant"], round(r["learning_rate"], 9)) for r in results if r["sweep"]} == {
        ("fixed", 9e-3),
        ("rules", 9e-3),
    }
    client = MlflowClient(tracking_uri)
    for r in results:
        run = client.get_run(r["run_id"])
        assert run.data.tags["bench.variant"] == r["variant"]
        assert run.data.tags["data.source"] == "generated"
        evals = client.get_metric_history(r["run_id"], "eval_loss")
        assert len(evals) >= 5, r
        assert r["eval_curve"] and r["steps_per_s"] > 0
        managed = r["variant"] in ("rules", "llm")
        assert (TAG_MANAGED in run.data.tags) is managed, r
        if managed:
            records = [x for x in AuditLog(tracker).records(r["run_id"]) if x.params_version]
            assert records, f"{r['variant']} run has no intervention in its audit trail"
            assert len(r["interventions"]) == len(records)
    llm = next(r for r in results if r["variant"] == "llm")
    first = AuditLog(tracker).records(llm["run_id"])[0]
    assert first.source is Source.LLM and first.model == "replay"
    assert replay.requests, "the LLM endpoint was never asked"

    table = (out / "results.md").read_text()
    assert "| rules |" in table and "starting lr" in table
    assert (out / "eval_loss.png").stat().st_size > 10_000
    assert (out / "lr_sweep.png").stat().st_size > 10_000
    summary = client.search_runs(
        [client.get_experiment_by_name("tinystories-bench").experiment_id]
    )[0]
    logged = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"results.json", "results.md", "eval_loss.png", "lr_sweep.png"} <= logged
