"""Tracker backends, chosen from the tracking URI.

Built in: MLflow (``http(s)://``, ``sqlite://``, ``databricks``, database URIs), Weights &
Biases (``wandb://ENTITY/PROJECT``) and an in-memory tracker (``memory://NAME``) for tests. A
third party adds a backend through the entry-point group ``ai_training_manager.trackers``: the
entry point's name is the URI scheme it serves (``neptune`` serves ``neptune://…``) and its
object is a ``TrackerBackend``. A backend's module, and the tracker SDK it imports, load only
when a URI or a running script needs it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from functools import cache

from integrations.trackers.base import (
    CorruptArtifact,
    Cursor,
    MetricPoint,
    PointsRead,
    RunBinding,
    RunInfo,
    RunNotFound,
    Tracker,
    TrackerBackend,
    TrackerError,
    TrackerUnavailable,
    Window,
)

__all__ = [
    "CorruptArtifact",
    "Cursor",
    "MetricPoint",
    "PointsRead",
    "RunBinding",
    "RunInfo",
    "RunNotFound",
    "Tracker",
    "TrackerBackend",
    "TrackerError",
    "TrackerUnavailable",
    "Window",
    "bind_run",
    "default_tracking_uri",
    "launch_env",
    "open_tracker",
    "run_sought",
]

ENTRY_POINT_GROUP = "ai_training_manager.trackers"


@dataclass(frozen=True)
class _Entry:
    """A registered backend, before its module is imported."""

    target: str  # "module:attribute"
    prefixes: tuple[str, ...]
    # A script logs to this kind of tracker only if it imported one of these modules or set
    # one of these variables: binding never imports a tracker SDK the script did not.
    sdk_modules: tuple[str, ...] = ()
    run_env: tuple[str, ...] = ()
    # Variables of the tracker's own that name a tracker (MLFLOW_TRACKING_URI).
    uri_env: tuple[str, ...] = ()
    # Where a process's run is looked for, in words ("" for a tracker no script logs to).
    looks_for: str = ""

    def backend(self) -> TrackerBackend:
        if self.target not in _loaded:
            module, _, attribute = self.target.partition(":")
            _loaded[self.target] = getattr(importlib.import_module(module), attribute)
        return _loaded[self.target]

    def maybe_in_use(self) -> bool:
        return any(m in sys.modules for m in self.sdk_modules) or any(
            os.environ.get(v) for v in self.run_env
        )


_loaded: dict[str, TrackerBackend] = {}

_BUILTIN = (
    _Entry(
        "integrations.trackers.mlflow_backend:BACKEND",
        ("http://", "https://", "sqlite://", "databricks", "postgresql", "mysql", "mssql"),
        sdk_modules=("mlflow",),
        run_env=("MLFLOW_RUN_ID",),
        uri_env=("MLFLOW_TRACKING_URI",),
        looks_for="an active MLflow run or MLFLOW_RUN_ID",
    ),
    _Entry(
        "integrations.trackers.wandb_backend:BACKEND",
        ("wandb://",),
        sdk_modules=("wandb",),
        run_env=("WANDB_RUN_ID",),
        uri_env=("WANDB_PROJECT",),
        looks_for="wandb.run or WANDB_RUN_ID",
    ),
    _Entry("integrations.trackers.memory:BACKEND", ("memory://",)),
)


@cache
def _entries() -> tuple[_Entry, ...]:
    plugins = tuple(
        _Entry(
            f"{ep.module}:{ep.attr}",
            (f"{ep.name}://",),
            sdk_modules=(ep.name,),
            looks_for=f"a {ep.name} run",
        )
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    )
    return _BUILTIN + plugins


def _entry_for(uri: str) -> _Entry:
    for entry in _entries():
        if uri.startswith(entry.prefixes):
            return entry
    known = ", ".join(p + "…" for e in _entries() for p in e.prefixes)
    raise ValueError(f"unsupported tracking URI {uri!r}: expected one of {known}")


def open_tracker(uri: str, *, fail_fast: bool = False) -> Tracker:
    """The tracker for ``uri``; ``fail_fast`` for processes that must answer quickly (the
    daemon, the command line) rather than wait out a tracker SDK's long retries."""
    return _entry_for(uri).backend().open(uri, fail_fast=fail_fast)


def default_tracking_uri() -> str | None:
    """The tracker named by the environment: ``ATM_TRACKING_URI``, else a tracker's own
    variables (``MLFLOW_TRACKING_URI``, then ``WANDB_PROJECT`` with ``WANDB_ENTITY``)."""
    if uri := os.environ.get("ATM_TRACKING_URI"):
        return uri
    for entry in _entries():
        if any(os.environ.get(v) for v in entry.uri_env):
            return entry.backend().default_uri()
    return None


def bind_run(
    run_id: str | None = None, tracking_uri: str | None = None, *, sdk: str | None = None
) -> RunBinding | None:
    """The run this training process logs to, and a tracker to reach it; None if none.

    With ``tracking_uri`` that tracker's backend answers; with ``sdk`` (a tracker SDK's module
    name, ``"wandb"``: a framework's logger says which SDK it writes through) that SDK's
    backend; otherwise the first backend whose SDK the script uses and that sees a run (a
    script logging to two trackers is managed once, through the first).
    """
    if tracking_uri:
        return _entry_for(tracking_uri).backend().current_run(run_id, tracking_uri)
    for entry in _entries():
        in_use = entry.maybe_in_use() if sdk is None else sdk in entry.sdk_modules
        if in_use and (found := entry.backend().current_run(run_id, None)):
            return found
    return None


def run_sought(tracking_uri: str | None = None) -> str:
    """Where ``bind_run`` looked for this process's run, in words, for a user told that it
    found none: each tracker's places, and which tracker SDKs the script does not use."""
    entries = [_entry_for(tracking_uri)] if tracking_uri else list(_entries())
    places = []
    for entry in entries:
        if not entry.looks_for:
            continue
        unused = "" if entry.maybe_in_use() else f": {', '.join(entry.sdk_modules)} not imported"
        places.append(entry.looks_for + unused)
    return "; ".join(places) or f"a run on {tracking_uri}"


def launch_env(uri: str, run_id: str | None = None) -> dict[str, str]:
    """Environment variables that make a launched script log to ``uri`` (and continue
    ``run_id``), as the tracker's own SDK reads them."""
    return _entry_for(uri).backend().launch_env(uri, run_id)
