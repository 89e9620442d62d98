"""``atm demo``: one overfitting recipe, trained twice side by side, once under the manager.

Everything is local: an MLflow server on a free loopback port with a sqlite store under the
work directory (unless ``MLFLOW_TRACKING_URI`` points elsewhere), two training subprocesses,
and the daemon on a background scheduler in this process.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from integrations.protocol import AuditRecord
from integrations.trackers import Cursor, Tracker, open_tracker
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon, in_background
from manager_daemon.demo.lm import DEMO_RECIPE
from manager_daemon.leases import Leases, Replica
from manager_daemon.mlflow_server import MlflowServer, start_server
from manager_daemon.policies.factory import make_policy
from manager_daemon.settings import DaemonSettings
from manager_daemon.supervisor import SupervisorConfig
from manager_daemon.validation import ValidationConfig

RUN_MARKER = "ATM_DEMO_RUN "
EXPERIMENT = "atm-demo"
DAEMON_INTERVAL_S = 2.0


@dataclass
class Variant:
    name: str
    managed: bool
    log_path: Path
    process: subprocess.Popen[str] | None = None
    run_id: str | None = None
    cursor: Cursor | None = None
    step: int = 0
    eval_loss: float | None = None
    summary: dict[str, object] | None = None


def run_demo(workdir: Path, console: Console, policy_name: str = "auto") -> dict[str, object]:
    """Run the demo, print its summary, and return the figures it printed."""
    workdir.mkdir(parents=True, exist_ok=True)
    # Fail fast rather than wait out MLflow's default retries (minutes) on a stopped server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    server: MlflowServer | None = None
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        with console.status("starting a local MLflow server (about 20 s)…"):
            server = start_server(workdir / "mlflow")
        uri = server.uri
    console.print(f"MLflow tracking server: [bold]{uri}[/bold]")
    tracker = open_tracker(uri)
    with console.status("loading the policy…"):
        settings = DaemonSettings.from_options(policy=policy_name)
        policy, why = make_policy(settings)
    console.print(f"Manager {why}")
    # The demo's evaluations come every few seconds while a CPU model call takes longer, so
    # answers may arrive several evaluations late and are still worth applying.
    # Its trainings last about a minute: below them (the daemon's default nice) the embedded
    # model answered after both had ended, so the demo decides at their priority unless
    # ATM_NICE says otherwise.
    nice = settings.nice if "nice" in settings.model_fields_set else 0
    # A lease on each run, as `atm daemon` takes: `atm status` shows the runs as watched.
    leases = Leases(
        tracker,
        Replica.from_name("atm-demo", 0, 1),
        ttl_s=settings.lease_ttl_s(),
        settle_s=settings.lease_settle,
        interval_s=DAEMON_INTERVAL_S,
    )
    daemon = Daemon(
        tracker,
        policy,
        SupervisorConfig(
            validation=ValidationConfig(cooldown_steps=2 * DEMO_RECIPE.eval_steps),
            stale_evals=8,
        ),
        signing_key=settings.key(),
        nice=nice,
        leases=leases,
    )
    with in_background([daemon], DAEMON_INTERVAL_S):
        variants = _train_side_by_side(workdir, uri, tracker, console)
    try:
        return _summarise(variants, tracker, uri, console)
    finally:
        if server is not None:
            server.stop()
            console.print(
                "The runs are kept under "
                f"{workdir}; browse them with:\n  mlflow server --backend-store-uri "
                f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'} --artifacts-destination "
                f"{workdir / 'mlflow' / 'artifacts'} --host 127.0.0.1 --port {server.port}"
            )


def _train_side_by_side(
    workdir: Path, uri: str, tracker: Tracker, console: Console
) -> list[Variant]:
    variants = [
        Variant("unmanaged", False, workdir / "unmanaged.log"),
        Variant("managed", True, workdir / "managed.log"),
    ]
    console.print(
        f"Training a tiny GPT-2 on generated stories, {DEMO_RECIPE.max_steps} steps, with an "
        f"overfitting recipe (lr {DEMO_RECIPE.learning_rate:g}, weight decay "
        f"{DEMO_RECIPE.weight_decay:g}, dropout {DEMO_RECIPE.dropout:g}): unmanaged and managed "
        "side by side."
    )
    for v in variants:
        cmd = [
            sys.executable,
            "-m",
            "manager_daemon.demo.train_lm",
            "--tracking-uri",
            uri,
            "--experiment",
            EXPERIMENT,
            "--run-name",
            v.name,
            "--threads",
            "1",
        ]
        if v.managed:
            cmd.append("--managed")
        v.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=v.log_path.open("w"), text=True, bufsize=1
        )
    with Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        TextColumn("step {task.completed:>4.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[eval]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks = {
            v.name: progress.add_task(v.name, total=DEMO_RECIPE.max_steps, eval="")
            for v in variants
        }
        _follow(variants, tracker, progress, tasks)
    for v in variants:
        if v.summary is None:
            tail = v.log_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"the {v.name} training failed (log {v.log_path}):\n{tail}")
    return variants


def _follow(variants: list[Variant], tracker: Tracker, progress: Progress, tasks: dict) -> None:
    selector = selectors.DefaultSelector()
    for v in variants:
        assert v.process is not None and v.process.stdout is not None
        selector.register(v.process.stdout, selectors.EVENT_READ, v)
    open_streams = len(variants)
    while open_streams:
        for key, _ in selector.select(timeout=1.0):
            v = key.data
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            if line.startswith(RUN_MARKER):
                v.run_id = line[len(RUN_MARKER) :].strip()
            elif line.startswith("{") and '"run_id"' in line:
                v.summary = json.loads(line)
        for v in variants:
            _update_progress(v, tracker, progress, tasks[v.name])
    for v in variants:
        assert v.process is not None
        v.process.wait()
        _update_progress(v, tracker, progress, tasks[v.name])


def _update_progress(v: Variant, tracker: Tracker, progress: Progress, task: int) -> None:
    if v.run_id is None:
        return
    try:
        points, v.cursor = tracker.read_new_points(v.run_id, ["loss", "eval_loss"], v.cursor)
    except Exception:  # progress display only; the tracker may be busy
        return
    for p in points:
        v.step = max(v.step, p.step)
        if p.key == "eval_loss":
            v.eval_loss = p.value
    text = f"eval loss {v.eval_loss:.3f}" if v.eval_loss is not None else ""
    progress.update(task, completed=v.step, eval=text)


def _summarise(
    variants: list[Variant], tracker: Tracker, uri: str, console: Console
) -> dict[str, object]:
    managed = next(v for v in variants if v.managed)
    unmanaged = next(v for v in variants if not v.managed)
    assert managed.summary and unmanaged.summary and managed.run_id
    records = [r for r in AuditLog(tracker).records(managed.run_id) if r.params_version]
    _print_interventions(records, console)
    result = Table(title="final eval loss")
    for col in ("run", "final eval loss", "best eval loss", "steps", "median step"):
        result.add_column(col)
    for v in (unmanaged, managed):
        s = v.summary
        assert s is not None
        step_s = s.get("median_step_s")
        result.add_row(
            v.name,
            f"{s['final_eval_loss']:.4f}",
            f"{s['best_eval_loss']:.4f}",
            str(s["steps"]),
            f"{1000 * step_s:.0f} ms" if isinstance(step_s, float) else "-",
        )
    console.print(result)
    for v in (unmanaged, managed):
        experiment_id = _experiment_id(tracker, v.run_id)
        console.print(f"{v.name:>9}: {uri}/#/experiments/{experiment_id}/runs/{v.run_id}")
    final_m = float(managed.summary["final_eval_loss"])  # type: ignore[arg-type]
    final_u = float(unmanaged.summary["final_eval_loss"])  # type: ignore[arg-type]
    verdict = "lower" if final_m < final_u else "NOT lower"
    console.print(
        f"Managed final eval loss {final_m:.4f} vs unmanaged {final_u:.4f}: "
        f"[bold]{verdict}[/bold] ({(final_m - final_u) / final_u:+.1%}). "
        f"Audit trail: atm log {managed.run_id} --tracking-uri {uri}"
    )
    return {
        "managed_final_eval_loss": final_m,
        "unmanaged_final_eval_loss": final_u,
        "interventions": len(records),
        "managed_run_id": managed.run_id,
        "unmanaged_run_id": unmanaged.run_id,
    }


def _print_interventions(records: list[AuditRecord], console: Console) -> None:
    table = Table(title="interventions on the managed run")
    for col in ("version", "step", "by", "what", "why"):
        table.add_column(col, overflow="fold")
    for r in records:
        what = ", ".join(
            f"{v.knob} {v.current:.3g}→{v.final:.3g}"
            for v in r.verdicts
            if v.verdict in ("accepted", "clamped")
            and v.current is not None
            and v.final is not None
        )
        what += "".join(f", {c.command}" for c in r.command_verdicts if c.verdict == "accepted")
        table.add_row(
            f"v{r.params_version}",
            str(r.step),
            f"{r.source.value}\n{r.model}" if r.model else r.source.value,
            what.strip(", "),
            (r.proposal.reason if r.proposal else "") + (f" ({r.note})" if r.note else ""),
        )
    console.print(table if records else "no interventions were made")


def _experiment_id(tracker: Tracker, run_id: str | None) -> str:
    return tracker.get_run(run_id).experiment_id if run_id else "0"
