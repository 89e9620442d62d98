"""The ``atm`` command line."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import unicodedata
from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    REPORT_DIR,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_REJECTED,
    TAG_DAEMON_LEASE,
    TAG_HEALTH,
    TAG_LAST_INTERVENTION,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    TAG_PARAMS_VERSION,
    TAG_SPEC_DIGEST,
    AuditRecord,
    Boundary,
    Command,
    Health,
    HealthState,
    Lease,
    Objective,
    RunSpec,
    Source,
)
from integrations.redact import RedactingFilter, redact
from integrations.settings import ClientSettings, env_names
from integrations.trackers import (
    RunInfo,
    RunNotFound,
    Tracker,
    TrackerError,
    TrackerUnavailable,
    default_tracking_uri,
    launch_env,
    open_tracker,
)
from manager_daemon.audit import AuditLog
from manager_daemon.policies import PolicyAnswer
from manager_daemon.policies.llm import LLMConsult, LLMFallback, LLMMode
from manager_daemon.policies.openai_chat import ResponseMode
from manager_daemon.settings import DaemonSettings, LogFormat, PolicyName
from manager_daemon.supervisor import RunSupervisor, human_proposal
from manager_daemon.validation import refused_by_hand

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
        help="The tracker's URI \\[env ATM_TRACKING_URI, else MLFLOW_TRACKING_URI].",
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
            code, text = 2, str(exc)
        except RunNotFound as exc:
            code, text = 1, str(exc)
        except TrackerUnavailable as exc:
            code, text = 3, str(exc)
        except TrackerError as exc:
            code, text = 3, f"tracker error: {exc}"
        err_console.print(f"[red]error:[/red] {redact(text)}")
        raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(verbose: bool, as_json: bool = False) -> None:
    if as_json:
        from manager_daemon.jsonlog import JsonFormatter

        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=True)
    handler.addFilter(RedactingFilter())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[handler],
        force=True,
    )
    for noisy in ("apscheduler", "urllib3", "mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _tracker(uri: str | None) -> Tracker:
    uri = uri or default_tracking_uri()
    if not uri:
        raise CliError(
            "no tracker: pass --tracking-uri or set ATM_TRACKING_URI (or MLFLOW_TRACKING_URI)"
        )
    tracker = open_tracker(uri, fail_fast=True)
    if not tracker.ping():
        raise TrackerUnavailable(f"tracker unreachable at {redact(uri)}")
    return tracker


def _find_run(tracker: Tracker, run_id: str) -> RunInfo:
    """The run ``run_id`` names: that run, or the one managed run whose id begins with it (the
    short ids ``atm status`` prints)."""
    if not run_id.strip():
        raise CliError("no run id given: name a run (`atm status` lists the managed ones)")
    try:
        return tracker.get_run(run_id)
    except RunNotFound:
        found = tracker.find_managed_runs(finished=True)
        matches = [r for r in found if r.run_id.startswith(run_id)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            named = ", ".join(m.run_id[:16] for m in matches[:5])
            more = " …" if len(matches) > 5 else ""
            raise CliError(
                f"run id {run_id!r} is ambiguous ({named}{more}); give more of it"
            ) from None
        raise


def _setting(name: str, *flags: str, settings: type[BaseSettings] = DaemonSettings) -> Any:
    """A flag for settings field ``name``: its description, default and environment variables
    as help. Left out, it is None and the environment or the default applies."""
    field = settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    shown = default.value if isinstance(default, Enum) else default
    where = f"env {', '.join(env_names(settings, name))}"
    if shown not in (None, []):
        where = f"default {shown}; {where}"
    return typer.Option(*flags, help=f"{field.description} \\[{where}]", show_default=False)


@app.command()
@_one_line_errors
def daemon(
    tracking_uri: TrackingUri = None,
    once: Annotated[
        bool, typer.Option("--once", help="One pass over the managed runs, then exit.")
    ] = False,
    interval: Annotated[float | None, _setting("interval")] = None,
    policy: Annotated[PolicyName | None, _setting("policy")] = None,
    llm_base_url: Annotated[str | None, _setting("llm_base_url")] = None,
    llm_model: Annotated[str | None, _setting("llm_model")] = None,
    llm_timeout: Annotated[float | None, _setting("llm_timeout")] = None,
    llm_fallback: Annotated[LLMFallback | None, _setting("llm_fallback")] = None,
    response_mode: Annotated[
        ResponseMode | None, _setting("llm_response_mode", "--response-mode")
    ] = None,
    llm_mode: Annotated[LLMMode | None, _setting("llm_mode")] = None,
    llm_consult: Annotated[LLMConsult | None, _setting("llm_consult")] = None,
    llm_threads: Annotated[int | None, _setting("llm_threads")] = None,
    llm_busy_wait: Annotated[bool | None, _setting("llm_busy_wait")] = None,
    nice: Annotated[int | None, _setting("nice")] = None,
    stale_evals: Annotated[int | None, _setting("stale_evals")] = None,
    rules_config: Annotated[Path | None, _setting("rules_config")] = None,
    cooldown_steps: Annotated[int | None, _setting("cooldown_steps")] = None,
    settle_evals: Annotated[int | None, _setting("settle_evals")] = None,
    budget: Annotated[int | None, _setting("budget")] = None,
    audit_no_action: Annotated[bool | None, _setting("audit_no_action")] = None,
    workers: Annotated[int | None, _setting("workers")] = None,
    experiment: Annotated[list[str] | None, _setting("experiments", "--experiment")] = None,
    ops_port: Annotated[int | None, _setting("ops_port")] = None,
    ops_host: Annotated[str | None, _setting("ops_host")] = None,
    log_format: Annotated[LogFormat | None, _setting("log_format")] = None,
    replica_name: Annotated[str | None, _setting("replica_name")] = None,
    replica: Annotated[int | None, _setting("replica")] = None,
    replicas: Annotated[int | None, _setting("replicas")] = None,
    lease_ttl: Annotated[float | None, _setting("lease_ttl")] = None,
    lease_settle: Annotated[float | None, _setting("lease_settle")] = None,
    drain_timeout: Annotated[float | None, _setting("drain_timeout")] = None,
    report_every: Annotated[int | None, _setting("report_every")] = None,
    report_at_end: Annotated[bool | None, _setting("report_at_end")] = None,
    verbose: Verbose = False,
) -> None:
    """Supervise every managed run on the tracker (or on the experiments named).

    Replicas share the runs: each supervises those whose lease it holds (see --replicas).
    """
    from manager_daemon.daemon import Daemon, lower_priority
    from manager_daemon.leases import Leases, Replica
    from manager_daemon.metrics import DaemonMetrics
    from manager_daemon.ops import OpsServer
    from manager_daemon.policies.factory import make_policy

    settings = _settings(
        tracking_uri=tracking_uri,
        interval=interval,
        policy=policy,
        llm_base_url=llm_base_url,
        llm_model=llm_model,
        llm_timeout=llm_timeout,
        llm_fallback=llm_fallback,
        llm_response_mode=response_mode,
        llm_mode=llm_mode,
        llm_consult=llm_consult,
        llm_threads=llm_threads,
        llm_busy_wait=llm_busy_wait,
        nice=nice,
        stale_evals=stale_evals,
        rules_config=rules_config,
        cooldown_steps=cooldown_steps,
        settle_evals=settle_evals,
        budget=budget,
        audit_no_action=audit_no_action,
        workers=workers,
        experiments=experiment or None,
        ops_port=ops_port,
        ops_host=ops_host,
        log_format=log_format,
        replica_name=replica_name,
        replica=replica,
        replicas=replicas,
        lease_ttl=lease_ttl,
        lease_settle=lease_settle,
        drain_timeout=drain_timeout,
        report_every=report_every,
        report_at_end=report_at_end,
    )
    _setup_logging(verbose, as_json=settings.log_format is LogFormat.JSON)
    metrics = DaemonMetrics()
    ops = None
    if settings.ops_port is not None and not once:
        # Bound first: a port in use is a one-line error before anything else starts.
        ops = OpsServer(
            settings.ops_host,
            settings.ops_port,
            metrics,
            lambda: runner.health(),
            lambda: runner.ready(),
        )
    tracker = _tracker(settings.tracking_uri)
    replica_id = Replica.from_name(settings.replica_name, settings.replica, settings.replicas)
    if replica_id.count > 1 and not tracker.leases:
        raise CliError(
            f"{replica_id.count} replicas cannot share {redact(tracker.uri)}: its run tags "
            "offer no safe lease, so two replicas could decide for the same run. Run one "
            "daemon replica per project (--replicas 1)"
        )
    chosen, why = make_policy(settings)
    logging.getLogger("manager_daemon").info(why)
    leases = Leases(
        tracker,
        replica_id,
        ttl_s=settings.lease_ttl_s(),
        settle_s=settings.lease_settle,
        interval_s=settings.interval,
        metrics=metrics,
    )
    reports = None
    if settings.report_every or settings.report_at_end:
        from manager_daemon.report.keeper import ReportKeeper

        reports = ReportKeeper(
            tracker,
            every=settings.report_every,
            at_end=settings.report_at_end,
            budget=settings.budget,
            initializer=functools.partial(lower_priority, settings.nice),
        )
    runner = Daemon(
        tracker,
        chosen,
        settings.supervisor_config(),
        workers=settings.workers,
        signing_key=settings.key(),
        experiments=settings.experiments,
        nice=settings.nice,
        leases=leases,
        metrics=metrics,
        interval_s=settings.interval,
        reports=reports,
    )
    metrics.info.info(
        {
            "replica": leases.owner,
            "ordinal": str(replica_id.ordinal),
            "replicas": str(replica_id.count),
            "policy": chosen.name,
        }
    )
    logging.getLogger("manager_daemon").info(
        "replica %s: ordinal %d of %d, lease TTL %g s",
        leases.owner,
        replica_id.ordinal,
        replica_id.count,
        leases.ttl_s,
    )
    if once:
        report = runner.run_once()
        leases.release()
        runner.close()
        for record in report.decisions:
            console.print(f"{record.run_id[:12]}  {record.summary()}")
        console.print(f"{report.runs} managed run(s), {len(report.decisions)} decision(s)")
        for run_id, health in sorted(runner.run_health.latest.items()):
            if not health.ok:
                console.print(f"{run_id[:12]}  [yellow]{health}[/]", highlight=False)
        console.print(runner.totals_line())
        if report.elsewhere:
            console.print(
                f"{report.elsewhere} managed run(s) left alone: another replica holds their "
                "lease, or this pass could not confirm it"
            )
        if "*" in report.errors:
            raise TrackerUnavailable(report.errors["*"])
        return
    if ops is not None:
        ops.start()
    try:
        runner.serve(settings.interval, settings.drain_timeout)
    finally:
        if ops is not None:
            ops.stop()


def _settings(**given: Any) -> DaemonSettings:
    """The daemon's settings from the flags given over the environment; a bad value is a
    one-line error naming the flag."""
    try:
        return DaemonSettings.from_options(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check across settings: its message names them
            raise CliError(str(first["msg"]).removeprefix("Value error, ")) from None
        name = str(first["loc"][0])
        got = "" if "key" in name else f" (got {first.get('input')!r})"
        raise CliError(f"{name}: {first['msg']}{got}") from None


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
        float | None, _setting("poll_interval", settings=ClientSettings)
    ] = None,
    apply_at: Annotated[
        Boundary | None, typer.Option(help="Where updates apply (default: each framework's own).")
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
    if poll_interval is not None and poll_interval <= 0:
        raise CliError(f"--poll-interval must be above 0 seconds, not {poll_interval:g}")
    overrides: dict[str, dict[str, Any]] = {}
    if bounds is not None:
        try:
            overrides = parse_bounds(yaml.safe_load(bounds.read_text()))
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise CliError(f"cannot use bounds file {bounds}: {exc}") from exc
    config = InjectConfig(
        objective=objective,
        poll_interval=poll_interval,
        apply_at=apply_at.value if apply_at else None,
        bounds=overrides,
    )
    env = dict(os.environ)
    autoinject = os.path.dirname(integrations.autoinject.__file__)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (autoinject, env.get("PYTHONPATH")) if p)
    env[ENV] = config.to_env()
    uri = tracking_uri or default_tracking_uri()
    if uri or run_id:
        if not uri:
            raise CliError("--run-id needs a tracker: pass --tracking-uri or set ATM_TRACKING_URI")
        env.update(launch_env(uri, run_id))
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
    run = _find_run(tracker, run_id)
    run_id = run.run_id
    has_spec = tracker.read_json(run_id, SPEC_PATH) is not None
    if not has_spec or values:
        values = values or knobs_from_params(run.params)
        if values:
            spec = RunSpec(
                framework="attached",
                knobs=[derive_knob(name, value) for name, value in values.items()],
            )
            tracker.write_json(run_id, SPEC_PATH, spec.model_dump(mode="json"))
            tracker.set_tags(run_id, {TAG_SPEC_DIGEST: spec.digest()})
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
    run_id = _find_run(tracker, run_id).run_id
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
    cooldown_steps: Annotated[int | None, _setting("cooldown_steps")] = None,
) -> None:
    """A human intervention, validated and audited like any other."""
    changes, commands = _parse_assignments(assignments)
    settings = _settings(tracking_uri=tracking_uri, cooldown_steps=cooldown_steps)
    tracker = _tracker(settings.tracking_uri)
    found = _find_run(tracker, run_id)
    run_id = found.run_id
    if not found.is_running:
        err_console.print(
            f"[yellow]warning:[/yellow] run {run_id[:12]} has ended ({found.status.lower()}): "
            "nothing applies this version until the script is restarted under "
            f"`atm run --run-id {run_id}`"
        )
    audit = AuditLog(tracker, settings.key())
    supervisor = RunSupervisor(run_id, tracker, audit, settings.supervisor_config())
    run = supervisor.refresh()
    if supervisor.spec is None:
        raise CliError(
            supervisor.spec_error
            or f"run {run_id} has no knob spec: no client has published one, so nothing can be set"
        )
    if refused := refused_by_hand(changes, supervisor.spec, commands):
        raise CliError(f"{refused}; nothing issued")
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
def status(
    all_runs: Annotated[
        bool, typer.Option("--all", help="Also the managed runs that have ended.")
    ] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Managed runs: objective, params version, what the client applied, heartbeat, health.

    Below the table, one line per run the manager cannot do its job for, saying why.
    """
    tracker = _tracker(tracking_uri)
    runs = tracker.find_managed_runs(finished=all_runs)
    table = Table(title=f"managed runs on {redact(tracker.uri)}")
    # The last intervention's line is long: a column on a wide terminal only.
    wide = console.width >= 140
    columns = ("run", "name", "objective", "version", "client beat", "health")
    for col in (*columns, "last intervention") if wide else columns:
        # The short id is what a user copies into the next command, and the objective and
        # health are words to read whole: never wrapped; a long name is.
        whole = col in ("run", "objective", "health")
        table.add_column(col, overflow="fold", no_wrap=whole, max_width=None if whole else 16)
    now = time.time()
    notes: list[str] = []
    for run in runs:
        tags = run.tags
        beat = tags.get(TAG_CLIENT_HEARTBEAT)
        health = _shown_health(run, now)
        state = health[0][0] if run.is_running else run.status.lower()
        # Everything but the state's colour comes from the tracker, which anyone with write
        # access may have filled: shown as text, never read as markup or terminal codes.
        table.add_row(
            shown(run.run_id[:12]),
            shown(run.name),
            shown(tags.get(TAG_OBJECTIVE, DEFAULT_OBJECTIVE)),
            shown(_version_text(tags)),
            shown(_beat_text(beat, run.is_running, now)),
            shown(state, _HEALTH_COLOUR.get(state, "yellow")),
            *([shown(tags.get(TAG_LAST_INTERVENTION, ""))] if wide else []),
        )
        notes += [
            shown(f"{run.run_id[:12]}  {name}: {reason}")
            for name, reason in health
            if reason and name != HealthState.DECIDING.value and run.is_running
        ]
        if rejected := tags.get(TAG_CLIENT_REJECTED):
            notes.append(shown(f"{run.run_id[:12]}  the client refused {rejected}", "red"))
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    if not runs:
        ended = "" if all_runs else " running"
        console.print(f"no{ended} managed runs (mark one with `atm attach RUN`)")


_HEALTH_COLOUR = {
    HealthState.DECIDING.value: "green",
    HealthState.ADVISORY.value: "red",
    HealthState.NO_KNOBS.value: "red",
    "unwatched": "red",
}


def _shown_health(run: RunInfo, now: float) -> list[tuple[str, str]]:
    """What `atm status` says of a run's health, the most pressing first: no daemon watching
    a running run (no lease, or one left to expire), then the daemon's own judgement (the run
    tag), or what the listing alone shows before any daemon has judged it."""
    said: list[tuple[str, str]] = []
    lease = Lease.parse(run.tags.get(TAG_DAEMON_LEASE))
    if run.is_running and (lease is None or now - lease.renewed_at > 2 * lease.ttl_s):
        since = f" since {_age(now - lease.renewed_at)}" if lease else ""
        said.append(
            ("unwatched", f"no daemon holds this run{since}: is `atm daemon` running on it?")
        )
    if (health := Health.parse(run.tags.get(TAG_HEALTH))) is not None:
        said.append((health.state.value, health.reason))
    elif TAG_CLIENT_HEARTBEAT not in run.tags:
        said.append((HealthState.ADVISORY.value, "no client heartbeat: nothing will be applied"))
    return said or [("-", "")]


def shown(text: str, style: str = "") -> Text:
    """Text from a run, to print as it is: no markup read in it, and control characters
    (terminal escape sequences among them) shown as � rather than sent to the terminal."""
    clean = "".join(
        c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf") else "\ufffd" for c in text
    )
    return Text(clean, style=style)


def _beat_text(beat: str | None, running: bool, now: float) -> str:
    """How long ago the client's heartbeat was, for a running run."""
    if beat is None:
        return "never"
    if not running:
        return "-"
    try:
        return _age(now - float(beat))
    except ValueError:
        return "unreadable"


def _version_text(tags: dict[str, str]) -> str:
    """The issued params version, and the one the client applied (at its step)."""
    text = f"v{tags.get(TAG_PARAMS_VERSION, '0')}"
    if applied := tags.get(TAG_CLIENT_APPLIED_VERSION):
        text += f"\napplied v{applied} @ {tags.get(TAG_CLIENT_APPLIED_STEP, '?')}"
    return text


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


@app.command("log")
@_one_line_errors
def log_(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """The audit trail of a run: every decision, with the telemetry it was based on."""
    tracker = _tracker(tracking_uri)
    run = _find_run(tracker, run_id)
    run_id = run.run_id
    records = AuditLog(tracker).records(run_id)
    if as_json:
        for record in records:
            sys.stdout.write(record.model_dump_json() + "\n")
        return
    # A table of nine columns needs a wide terminal; a narrow one gets a block per decision.
    if console.width >= 140:
        _log_table(run_id, records)
    else:
        _log_blocks(run_id, records)
    if not records:
        console.print("no decisions yet")
    if (health := Health.parse(run.tags.get(TAG_HEALTH))) is not None and not health.ok:
        console.print(f"[yellow]{health.state.value}[/]: {health.reason}", highlight=False)


def _log_table(run_id: str, records: list[AuditRecord]) -> None:
    table = Table(title=f"audit trail of {run_id}")
    for col in ("id", "time", "step", "by", "status", "changes", "telemetry", "reason", "outcome"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(
            f"d{r.decision_id:06d}",
            time.strftime("%H:%M:%S", time.localtime(r.created_at)),
            str(r.step),
            _by_text(r),
            _status_text(r),
            _changes_text(r),
            _telemetry_text(r.telemetry),
            _reason_text(r),
            _outcome_text(r),
        )
    console.print(table)


def _log_blocks(run_id: str, records: list[AuditRecord]) -> None:
    console.print(f"[bold]audit trail of {run_id}[/]")
    for r in records:
        when = time.strftime("%H:%M:%S", time.localtime(r.created_at))
        by = _by_text(r).replace("\n", ", ")
        console.print(
            f"\n[bold]d{r.decision_id:06d}[/]  {when}  step {r.step}  {_status_text(r)}  by {by}",
            highlight=False,
        )
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        for label, text in (
            ("changes", _changes_text(r)),
            ("reason", _reason_text(r)),
            ("telemetry", _telemetry_text(r.telemetry)),
            ("outcome", _outcome_text(r)),
        ):
            if text and text != "-":
                grid.add_row(f"  {label}", text)
        console.print(grid)


def _status_text(r: AuditRecord) -> str:
    return r.status + (f" v{r.params_version}" if r.params_version else "")


def _reason_text(r: AuditRecord) -> str:
    return (
        (r.proposal.reason if r.proposal else "")
        + (f"\n[dim]{r.note}[/]" if r.note else "")
        + (f" [red]{r.error}[/]" if r.error else "")
    )


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
def report(
    run_id: Annotated[str | None, typer.Argument(help="Run id.", show_default=False)] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            "--experiment",
            help="Compare the managed and unmanaged runs of this experiment instead of "
            "reporting one run (written under --out, default atm-report-NAME).",
            show_default=False,
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="The objective to read, e.g. minimize:val_loss (default: a run's own "
            "atm.objective; in an experiment, other runs take the one its managed runs share, "
            "else minimize:eval_loss).",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="The run to compare the run with (default: the unmanaged run of its "
            "experiment closest in start time that logs its objective).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Also write the page and the plots into this folder.", show_default=False
        ),
    ] = None,
    budget: Annotated[int | None, _setting("budget")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """What the manager did to a run: plots, every decision, a summary, beside its baseline.

    The page (self-contained HTML) and its plots are logged into the run under atm/report/;
    on W&B a W&B Report is saved to the project too, and its address printed.
    """
    from manager_daemon import report as reports
    from manager_daemon.report import wandb_report
    from manager_daemon.report.baseline import compared as compared_line

    if (run_id is None) == (experiment is None):
        raise CliError("name a run (atm report RUN) or an experiment (--experiment NAME)")
    if experiment is not None and baseline is not None:
        raise CliError("--baseline compares one run; it does not go with --experiment")
    parsed = Objective.parse(objective) if objective is not None else None
    settings = _settings(tracking_uri=tracking_uri, budget=budget)
    tracker = _tracker(settings.tracking_uri)
    target = wandb_report.target(tracker.uri)
    if experiment is not None:
        compared = reports.build_experiment_report(
            tracker, experiment, budget=settings.budget, objective=parsed
        )
        folder = out or Path(f"atm-report-{_slug(experiment)}")
        for name, content in compared.files().items():
            reports.write_local(folder, name, content)
        console.print(
            f"compared {len(compared.runs)} run(s) of {experiment}: {folder / 'index.html'}"
        )
        for data, _ in compared.runs:
            for note in data.notes:
                console.print(f"{data.name}: {note}", style="yellow", markup=False)
        if target is not None:
            saved = wandb_report.save(
                wandb_report.build(
                    [d for d, _ in compared.runs], *target, title=experiment, budget=settings.budget
                )
            )
            console.print(f"W&B report: {saved}")
        return
    assert run_id is not None
    run_id = _find_run(tracker, run_id).run_id
    if baseline is not None:
        baseline = _find_run(tracker, baseline).run_id
    made = reports.publish_run_report(
        tracker, run_id, budget=settings.budget, out=out, objective=parsed, baseline=baseline
    )
    s = made.summary
    console.print(
        f"report of {made.data.name}: {s.decisions} decision(s), {s.issued} issued; "
        f"logged to the run under {REPORT_DIR}/ ({len(made.files())} files)"
    )
    for note in made.data.notes:
        console.print(note, style="yellow", markup=False)
    if made.baseline is not None:
        console.print(compared_line(made.summary, made.baseline), markup=False)
    if out is not None:
        console.print(f"written to {out / 'index.html'}")
    if target is not None:
        saved = wandb_report.save(
            wandb_report.build(
                [made.data],
                *target,
                title=made.data.name,
                budget=settings.budget,
                baseline=made.baseline,
            )
        )
        console.print(f"W&B report: {saved}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "experiment"


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
