"""Which params versions of a run can be trusted, judged the same way by both sides.

A version is trusted when its file verifies (``ParamsVersion.problem``: it names itself, its
signature verifies, its values fit the spec) and it continues the chain: its parent is the
version just before it, or else the newest version below it that verifies, every version in
between having failed to verify or been refused by the client. A forged, corrupt or refused
version is skipped, never built on: the next legitimate version's parent is the last one that
verifies, and its number is above the skipped one's, so the client's ordering still holds.

The client judges what to apply this way; the writers (the daemon, ``atm set``) judge the
run's current values this way, so that a version the client refused can never become the base
that a later, legitimate change is measured against.
"""

from __future__ import annotations

from collections.abc import Collection

from pydantic import ValidationError

from integrations.protocol import PARAMS_DIR, ParamsVersion, RunSpec, params_path
from integrations.trackers import CorruptArtifact, Tracker


class ParamsRejected(ValueError):
    """A params version failed the checks; the message says why."""


class ParamsMissing(ParamsRejected):
    """The tag names a version whose file does not exist."""


def load(
    tracker: Tracker, run_id: str, version: int, spec: RunSpec | None, key: str | None
) -> ParamsVersion:
    """Params version ``version`` of the run, verified on its own; raises ParamsRejected."""
    try:
        raw = tracker.read_json(run_id, params_path(version))
    except CorruptArtifact as exc:
        raise ParamsRejected(f"malformed params file: {exc}") from exc
    if raw is None:
        raise ParamsMissing(f"tag names version {version} but {params_path(version)} is missing")
    try:
        params = ParamsVersion.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ParamsRejected(f"invalid params file ({where}: {first['msg']})") from exc
    try:
        problem = params.problem(version, spec, key)
    except (ValueError, RecursionError) as exc:  # a file no check could even read through
        raise ParamsRejected(f"unverifiable params file: {exc}") from exc
    if problem:
        raise ParamsRejected(problem)
    return params


def listed_versions(tracker: Tracker, run_id: str) -> list[int]:
    """The version numbers of the run's params files, in order."""
    out = []
    for path in tracker.list_artifacts(run_id, PARAMS_DIR):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
            out.append(int(name[1:-5]))
    return sorted(out)


def chain_problem(
    tracker: Tracker,
    run_id: str,
    params: ParamsVersion,
    spec: RunSpec | None,
    key: str | None,
    refused: Collection[int] = (),
) -> str | None:
    """Why ``params`` (verified on its own) does not continue the run's chain, or None.

    A parent just before the version is taken on trust (it was verified when it was issued
    and applied); a parent further back must verify, and nothing between them may.
    """
    parent, version = params.parent_version, params.version
    if parent == version - 1:
        return None
    if parent > 0:
        if parent in refused:
            return f"parent version {parent} was refused by the client"
        try:
            load(tracker, run_id, parent, spec, key)
        except ParamsRejected as exc:
            return f"parent version {parent} does not verify ({exc})"
    for between in listed_versions(tracker, run_id):
        if not parent < between < version or between in refused:
            continue
        try:
            load(tracker, run_id, between, spec, key)
        except ParamsRejected:
            continue
        return f"parent version {parent} skips v{between}, which verifies"
    return None


def trusted_head(
    tracker: Tracker,
    run_id: str,
    tag: int,
    spec: RunSpec | None,
    key: str | None,
    refused: Collection[int] = (),
) -> tuple[ParamsVersion | None, list[str]]:
    """The newest trusted version at or below ``tag`` (None: the spec's own values), and
    why each newer one was skipped."""
    skipped: list[str] = []
    if tag <= 0:
        return None, skipped
    candidates = [tag]
    for version in candidates:
        problem = None
        if version in refused:
            problem = "refused by the client"
        else:
            try:
                params = load(tracker, run_id, version, spec, key)
                problem = chain_problem(tracker, run_id, params, spec, key, refused)
            except ParamsRejected as exc:
                problem = str(exc)
        if problem is None:
            return params, skipped
        skipped.append(f"v{version}: {problem}")
        if version == tag:  # the common case costs one read; a walk back lists the files
            candidates += [v for v in reversed(listed_versions(tracker, run_id)) if v < tag]
    return None, skipped
