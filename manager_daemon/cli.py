"""The ``atm`` command line."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_REJECTED,
    TAG_LAST_INTERVENTION,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    TAG_PARAMS_VERSION,
    AuditRecord,
    Boundary,
    Command,
    Objective,
    RunSpec,
    Source,
)
from integrations.trackers import (
    RunNotFound,
    Tracker,
    TrackerError,
    TrackerUnavailable,
    default_tracking_uri,
    open_tracker,
)
from manager_daemon.audit import AuditLog
from manager_daemon.policies import PolicyAnswer, RulesConfig
from manager_daemon.policies.factory import PolicySettings, make_policy
from manager_daemon.policies.llm import LLMConfig
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig, human_proposal
from manager_daemon.validation import ValidationConfig

app = typer.Typer(
    help="ai-training-manager: a bounded, auditable supervisor for live training runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        "-u",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI.",
        show_default=False,
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """An error to report as one line, with a non-zero exit."""


def _one_line_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (CliError, ValueError) as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        except RunNotFound as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        except TrackerUnavailable as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(3) from None
        except TrackerError as exc:
            err_console.print(f"[red]error:[/red] tracker error: {exc}")
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    for noisy in ("apscheduler", "urllib3", "mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _tracker(uri: str | None) -> Tracker:
    uri = uri or default_tracking_uri()
    if not uri:
        raise CliError("no tracker: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    # The CLI and the daemon fail fast; MLflow's default retries would hang for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    tracker = open_tracker(uri)
    if not tracker.ping():
        raise TrackerUnavailable(f"tracker unreachable at {uri}")
    return tracker


def _rules_config(path: Path | None) -> RulesConfig:
    if path is None:
        return RulesConfig()
    try:
        return RulesConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise CliError(f"cannot read rules config {path}: {exc}") from exc


@app.command()
@_one_line_errors
def daemon(
    tracking_uri: TrackingUri = None,
    once: Annotated[
        bool, typer.Option("--once", help="One pass over the managed runs, then exit.")
    ] = False,
    interval: Annotated[
        float, typer.Option(envvar="ATM_INTERVAL", min=0.1, help="Seconds between ticks.")
    ] = 10.0,
    policy: Annotated[
        str,
        typer.Option(
            envvar="ATM_POLICY",
            help="auto (an endpoint if configured, else the embedded model, else rules), "
            "llm, or rules.",
        ),
    ] = "auto",
    llm_base_url: Annotated[
        str | None,
        typer.Option(
            envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint.", show_default=False
        ),
    ] = None,
    llm_model: Annotated[
        str | None, typer.Option(envvar="ATM_LLM_MODEL", help="Model name at the endpoint.")
    ] = None,
    llm_timeout: Annotated[
        float, typer.Option(envvar="ATM_LLM_TIMEOUT", min=0.1, help="Seconds per model call.")
    ] = LLMConfig().timeout_s,
    llm_fallback: Annotated[
        str, typer.Option(envvar="ATM_LLM_FALLBACK", help="After a failed retry: rules or none.")
    ] = "rules",
    response_mode: Annotated[
        str,
        typer.Option(envvar="ATM_LLM_RESPONSE_MODE", help="auto, json_schema, json_object, tools."),
    ] = "auto",
    llm_mode: Annotated[
        str,
        typer.Option(
            envvar="ATM_LLM_MODE",
            help="compose (the model writes its answer from the menu), choose (it picks one of "
            "a list of complete answers; for small models), or auto.",
        ),
    ] = "auto",
    llm_consult: Annotated[
        str,
        typer.Option(
            envvar="ATM_LLM_CONSULT",
            help="always, on_symptom (only when the rules see one), or auto (on_symptom when "
            "choosing).",
        ),
    ] = "auto",
    stale_evals: Annotated[
        int,
        typer.Option(
            envvar="ATM_STALE_EVALS", min=0, help="Discard answers older than this many evals."
        ),
    ] = SupervisorConfig().stale_evals,
    rules_config: Annotated[
        Path | None,
        typer.Option(envvar="ATM_RULES_CONFIG", help="YAML thresholds of the rules policy."),
    ] = None,
    cooldown_steps: Annotated[
        int, typer.Option(envvar="ATM_COOLDOWN_STEPS", min=0)
    ] = ValidationConfig().cooldown_steps,
    budget: Annotated[
        int, typer.Option(envvar="ATM_BUDGET", min=0, help="Automatic interventions per run.")
    ] = ValidationConfig().budget,
    audit_no_action: Annotated[
        bool, typer.Option(help="Also audit decisions to do nothing.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Threads for tracker I/O and policies.")] = 4,
    experiment: Annotated[
        list[str] | None,
        typer.Option(help="Only runs of this experiment (repeatable; default: all)."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Supervise every managed run on the tracker (or on the experiments named)."""
    from manager_daemon.daemon import Daemon

    _setup_logging(verbose)
    if llm_fallback not in ("rules", "none"):
        raise CliError(f"--llm-fallback must be rules or none, not {llm_fallback!r}")
    if llm_mode not in ("auto", "compose", "choose"):
        raise CliError(f"--llm-mode must be auto, compose or choose, not {llm_mode!r}")
    if llm_consult not in ("auto", "always", "on_symptom"):
        raise CliError(f"--llm-consult must be auto, always or on_symptom, not {llm_consult!r}")
    tracker = _tracker(tracking_uri)
    settings = PolicySettings.from_env(
        policy=policy,
        base_url=llm_base_url,
        model=llm_model,
        response_mode=response_mode,
        llm=LLMConfig(
            timeout_s=llm_timeout,
            fallback=llm_fallback,  # type: ignore[arg-type]
            mode=llm_mode,  # type: ignore[arg-type]
            consult=llm_consult,  # type: ignore[arg-type]
        ),
        rules=_rules_config(rules_config),
    )
    chosen, why = make_policy(settings)
    logging.getLogger("manager_daemon").info(why)
    config = SupervisorConfig(
        validation=ValidationConfig(cooldown_steps=cooldown_steps, budget=budget),
        audit_no_action=audit_no_action,
        stale_evals=stale_evals,
    )
    runner = Daemon(tracker, chosen, config, workers=workers, experiments=experiment)
    if once:
        report = runner.run_once()
        runner.close()
        for record in report.decisions:
            console.print(f"{record.run_id[:8]}  {record.summary()}")
        console.print(f"{report.runs} managed run(s), {len(report.decisions)} decision(s)")
        console.print(runner.totals_line())
        if "*" in report.errors:
            raise TrackerUnavailable(report.errors["*"])
        return
    runner.serve(interval)


@app.command(
    context_settings={"allow_interspersed_args": False},
    epilog="Example: atm run --objective minimize:eval_loss -- python train.py --epochs 3",
)
@_one_line_errors
def run(
    command: Annotated[
        list[str], typer.Argument(help="The training command, after --.", show_default=False)
    ],
    objective: Annotated[
        str, typer.Option(help="minimize:METRIC or maximize:METRIC")
    ] = DEFAULT_OBJECTIVE,
    bounds: Annotated[
        Path | None,
        typer.Option(help="YAML: per knob min, max, max_rel_step, scale, cooldown_steps."),
    ] = None,
    poll_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between the client's polls.")
    ] = 2.0,
    apply_at: Annotated[
        str | None, typer.Option(help="step, eval or rollout (default: each framework's own).")
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            help="Continue this run (a restart from a checkpoint): its params history goes on "
            "and the last applied version is applied again."
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Run a training command with the manager's client injected; the script is unchanged."""
    import integrations.autoinject
    from integrations.inject import ENV, InjectConfig
    from integrations.knobs import parse_bounds

    Objective.parse(objective)
    try:
        boundary = Boundary(apply_at) if apply_at else None
    except ValueError as exc:
        raise CliError(f"--apply-at must be step, eval or rollout, not {apply_at!r}") from exc
    overrides: dict[str, dict[str, Any]] = {}
    if bounds is not None:
        try:
            overrides = parse_bounds(yaml.safe_load(bounds.read_text()))
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise CliError(f"cannot use bounds file {bounds}: {exc}") from exc
    config = InjectConfig(
        objective=objective,
        poll_interval=poll_interval,
        apply_at=boundary.value if boundary else None,
        bounds=overrides,
    )
    env = dict(os.environ)
    autoinject = os.path.dirname(integrations.autoinject.__file__)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (autoinject, env.get("PYTHONPATH")) if p)
    env[ENV] = config.to_env()
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise CliError(f"cannot run {command[0]!r}: {exc.strerror}") from exc


@app.command()
@_one_line_errors
def attach(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    objective: Annotated[
        str, typer.Option(help="minimize:METRIC or maximize:METRIC")
    ] = DEFAULT_OBJECTIVE,
    knob: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE: a knob of a run without a client, and its current value "
            "(repeatable; default: read from the run's logged params)."
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Mark a run as managed by the daemon.

    A run whose script has no client is managed in advisory mode: decisions are made and
    audited as advisory, nothing is issued. Its knobs come from ``--knob`` or from the
    parameters the run logged. When a client appears (the script restarted under `atm run`),
    its own knob spec replaces these and control resumes.
    """
    from integrations.knobs import derive_knob, knobs_from_params

    parsed = Objective.parse(objective)
    values, commands = _parse_assignments(knob) if knob else ({}, [])
    if commands:
        raise CliError(f"--knob takes NAME=VALUE, not {commands[0]!r}")
    tracker = _tracker(tracking_uri)
    run = tracker.get_run(run_id)
    has_spec = tracker.read_json(run_id, SPEC_PATH) is not None
    if not has_spec or values:
        values = values or knobs_from_params(run.params)
        if values:
            spec = RunSpec(
                framework="attached",
                knobs=[derive_knob(name, value) for name, value in values.items()],
            )
            tracker.write_json(run_id, SPEC_PATH, spec.model_dump(mode="json"))
    tracker.set_tags(run_id, {TAG_MANAGED: "true", TAG_OBJECTIVE: str(parsed)})
    mode = "active" if TAG_CLIENT_HEARTBEAT in run.tags else "advisory (no client seen yet)"
    console.print(f"attached {run_id} ({run.name}), objective {parsed}, mode {mode}")
    if values:
        console.print("knobs: " + ", ".join(f"{k}={v:g}" for k, v in values.items()))
    elif not has_spec:
        console.print(
            "no knobs: none given (--knob NAME=VALUE) and none recognised in the run's params; "
            "the daemon decides once a client publishes them (atm run)"
        )


@app.command()
@_one_line_errors
def detach(
    run_id: Annotated[str, typer.Argument(help="Run id.")], tracking_uri: TrackingUri = None
) -> None:
    """Stop managing a run (its audit trail stays)."""
    tracker = _tracker(tracking_uri)
    tracker.get_run(run_id)
    tracker.set_tags(run_id, {TAG_MANAGED: "false"})
    console.print(f"detached {run_id}")


def _parse_assignments(items: list[str]) -> tuple[dict[str, float], list[str]]:
    changes: dict[str, float] = {}
    commands: list[str] = []
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            if item not in {c.value for c in Command}:
                raise CliError(
                    f"{item!r} is neither KNOB=VALUE nor a command "
                    f"({', '.join(c.value for c in Command)})"
                )
            commands.append(item)
            continue
        try:
            changes[name.strip()] = float(raw)
        except ValueError:
            raise CliError(f"{item!r}: {raw!r} is not a number") from None
    if not changes and not commands:
        raise CliError("nothing to set: give KNOB=VALUE pairs or a command")
    return changes, commands


@app.command("set")
@_one_line_errors
def set_(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    assignments: Annotated[
        list[str],
        typer.Argument(
            help="KNOB=VALUE pairs and/or commands (stop, checkpoint, rollback_to_best)."
        ),
    ],
    reason: Annotated[str, typer.Option(help="Why; kept in the audit trail.")] = "",
    tracking_uri: TrackingUri = None,
    cooldown_steps: Annotated[
        int, typer.Option(envvar="ATM_COOLDOWN_STEPS", min=0)
    ] = ValidationConfig().cooldown_steps,
) -> None:
    """A human intervention, validated and audited like any other."""
    changes, commands = _parse_assignments(assignments)
    tracker = _tracker(tracking_uri)
    config = SupervisorConfig(validation=ValidationConfig(cooldown_steps=cooldown_steps))
    supervisor = RunSupervisor(run_id, tracker, AuditLog(tracker), config)
    run = supervisor.refresh()
    if supervisor.spec is None:
        raise CliError(
            supervisor.spec_error
            or f"run {run_id} has no knob spec: no client has published one, so nothing can be set"
        )
    proposal = human_proposal(changes, commands, reason or "set by hand")
    record = supervisor.decide(run, Source.HUMAN, "human", lambda _s, _m: PolicyAnswer(proposal))
    assert record is not None
    _print_verdicts(record)
    if record.status not in ("issued", "advisory"):
        raise typer.Exit(1)


def _print_verdicts(record: AuditRecord) -> None:
    table = Table(title=f"decision d{record.decision_id:06d}: {record.status}")
    for col in ("knob", "current", "proposed", "final", "verdict", "reason"):
        table.add_column(col)
    for v in record.verdicts:
        colour = {"accepted": "green", "clamped": "yellow"}.get(v.verdict, "red")
        table.add_row(
            v.knob,
            _g(v.current),
            str(v.proposed),
            _g(v.final),
            f"[{colour}]{v.verdict}[/]",
            v.reason,
        )
    for c in record.command_verdicts:
        colour = "green" if c.verdict == "accepted" else "red"
        table.add_row(c.command, "", "", "", f"[{colour}]{c.verdict}[/]", c.reason)
    console.print(table)
    if record.params_version:
        console.print(f"issued params v{record.params_version}")


@app.command()
@_one_line_errors
def status(tracking_uri: TrackingUri = None) -> None:
    """Managed runs: objective, params version, what the client applied, heartbeat."""
    tracker = _tracker(tracking_uri)
    runs = tracker.find_managed_runs()
    table = Table(title=f"managed runs on {tracker.uri}")
    for col in (
        "run",
        "name",
        "objective",
        "params",
        "applied",
        "heartbeat",
        "mode",
        "last intervention",
    ):
        table.add_column(col, overflow="fold")
    now = time.time()
    for run in runs:
        tags = run.tags
        beat = tags.get(TAG_CLIENT_HEARTBEAT)
        age = f"{now - float(beat):.0f} s ago" if beat else "never"
        applied = tags.get(TAG_CLIENT_APPLIED_VERSION)
        applied_text = f"v{applied} @ {tags.get(TAG_CLIENT_APPLIED_STEP, '?')}" if applied else "-"
        if rejected := tags.get(TAG_CLIENT_REJECTED):
            applied_text += f"\n[red]refused {rejected}[/]"
        table.add_row(
            run.run_id[:12],
            run.name,
            tags.get(TAG_OBJECTIVE, DEFAULT_OBJECTIVE),
            f"v{tags.get(TAG_PARAMS_VERSION, '0')}",
            applied_text,
            age,
            "active" if beat else "advisory",
            tags.get(TAG_LAST_INTERVENTION, ""),
        )
    console.print(table)
    if not runs:
        console.print("no managed runs (mark one with `atm attach RUN`)")


@app.command("log")
@_one_line_errors
def log_(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """The audit trail of a run: every decision, with the telemetry it was based on."""
    tracker = _tracker(tracking_uri)
    tracker.get_run(run_id)
    records = AuditLog(tracker).records(run_id)
    if as_json:
        for record in records:
            sys.stdout.write(record.model_dump_json() + "\n")
        return
    table = Table(title=f"audit trail of {run_id}")
    for col in ("id", "time", "step", "by", "status", "changes", "telemetry", "reason", "outcome"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(
            f"d{r.decision_id:06d}",
            time.strftime("%H:%M:%S", time.localtime(r.created_at)),
            str(r.step),
            _by_text(r),
            r.status + (f" v{r.params_version}" if r.params_version else ""),
            _changes_text(r),
            _telemetry_text(r.telemetry),
            (r.proposal.reason if r.proposal else "") + (f" [red]{r.error}[/]" if r.error else ""),
            _outcome_text(r),
        )
    console.print(table)
    if not records:
        console.print("no decisions yet")


def _by_text(r: AuditRecord) -> str:
    """Who decided; for a model, which one, how long it took and what it cost."""
    text = r.policy if r.source.value == r.policy else f"{r.source.value} (via {r.policy})"
    calls = [v for k, v in r.timings.items() if k.startswith("llm_call_")]
    if r.model:
        text += f"\n{r.model}"
    if calls:
        tokens = r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0)
        text += f"\n{sum(calls):.2f} s, {len(calls)} call(s), {tokens} tokens"
    return text


def _changes_text(r: AuditRecord) -> str:
    parts = []
    for v in r.verdicts:
        if v.verdict in ("accepted", "clamped"):
            parts.append(
                f"{v.knob} {_g(v.current)}→{_g(v.final)}"
                + (" (clamped)" if v.verdict == "clamped" else "")
            )
        else:
            parts.append(f"{v.knob}={v.proposed} {v.verdict}: {v.reason}")
    parts += [
        f"{c.command} {c.verdict}" + (f": {c.reason}" if c.reason else "")
        for c in r.command_verdicts
    ]
    return "\n".join(parts) or "-"


def _telemetry_text(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    obj = t.get("objective", {})
    text = (
        f"{obj.get('metric')} {_g(obj.get('last'))} "
        f"(best {_g(obj.get('best'))} @ {obj.get('best_step')},"
        f" {obj.get('evals_since_best')} evals since)"
    )
    gap = t.get("gap", {})
    if gap.get("last") is not None:
        text += f"\ngap {_g(gap.get('last'))} trend {_g(gap.get('trend'))}"
    train = t.get("train", {})
    if train.get("recent_mean") is not None:
        text += f"\ntrain {_g(train.get('recent_mean'))}, spikes {train.get('spikes')}"
    return text


def _outcome_text(r: AuditRecord) -> str:
    o = r.outcome
    if o is None or o.before is None or o.after is None:
        return "-"
    return f"{_g(o.before)}→{_g(o.after)} ({o.after - o.before:+.3g})"


def _g(x: Any) -> str:
    return "?" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


@app.command()
@_one_line_errors
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the MLflow store and outputs go (kept).")
    ] = Path("atm-demo"),
    policy: Annotated[
        str,
        typer.Option(
            help="auto (an endpoint from OPENAI_BASE_URL/ATM_LLM_MODEL, else the embedded "
            "model, else rules), llm, or rules."
        ),
    ] = "auto",
    verbose: Verbose = False,
) -> None:
    """The end-to-end showcase: an overfitting run, managed and unmanaged, on a local MLflow."""
    from manager_daemon.demo.run import run_demo

    _setup_logging(verbose)
    run_demo(workdir.resolve(), console, policy)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
