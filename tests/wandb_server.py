"""A small stateful W&B-compatible server on loopback, for tests.

The real ``wandb`` SDK (a training run in online mode, ``wandb.Api()``, artifacts, and
``wandb_workspaces`` reports) talks to this server exactly as it would to W&B: point
``WANDB_BASE_URL`` at ``server.url``. It answers only what the SDK really sends; anything
else gets HTTP 400 naming the operation and the field it does not know, so a gap shows at
once instead of as a confusing client-side error.

GraphQL is answered by a schema-less executor: each resolver returns plain dicts (objects,
with ``__typename``), lists and scalars, and callables for fields that take arguments or
cost work; the executor walks the query's selection set over them, so every answer has
exactly the shape the query asked for (aliases, fragments and ``@include`` included).

State lives in memory and is guarded by one lock. Tests can inject faults (429 with
``Retry-After``, 500, delays, refused connections) and count requests by operation name.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import inspect
import itertools
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    parse,
)
from graphql.utilities import value_from_ast_untyped

log = logging.getLogger(__name__)

Json = dict[str, Any]


# ---------------------------------------------------------------------------------------
# GraphQL: a schema-less executor over dict trees
# ---------------------------------------------------------------------------------------


class UnhandledQuery(Exception):
    """The query asks for something this server does not answer (HTTP 400)."""


class GraphQLFailure(Exception):
    """A request the server understood and refuses, as W&B would (an ``errors`` entry)."""


@dataclass
class Operation:
    """One parsed GraphQL request, ready to execute against a root object."""

    name: str
    kind: str  # "query" or "mutation"
    selection: SelectionSetNode
    fragments: dict[str, FragmentDefinitionNode]
    variables: Json

    @classmethod
    def parse(cls, query: str, variables: Json | None, operation_name: str | None) -> Operation:
        document = parse(query)
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        # wandb-core sends operationName "" (and Python callers sometimes none): treat it
        # as absent and take the document's only operation.
        chosen = next(
            (o for o in operations if operation_name and o.name and o.name.value == operation_name),
            operations[0],
        )
        values = dict(variables or {})
        for definition in chosen.variable_definitions or ():
            name = definition.variable.name.value
            if name not in values:
                default = definition.default_value
                values[name] = None if default is None else value_from_ast_untyped(default)
        first_field = next(s for s in chosen.selection_set.selections if isinstance(s, FieldNode))
        return cls(
            name=chosen.name.value if chosen.name else first_field.name.value,
            kind=chosen.operation.value,
            selection=chosen.selection_set,
            fragments={
                d.name.value: d
                for d in document.definitions
                if isinstance(d, FragmentDefinitionNode)
            },
            variables=values,
        )

    def execute(self, root: Json) -> Json:
        """Resolve the operation's selection over ``root``; objects are dicts of fields."""
        return self._resolve_object(root, [self.selection])

    def _resolve(self, value: Any, selections: list[SelectionSetNode]) -> Any:
        if value is None or not selections:
            return value
        if isinstance(value, list):
            return [self._resolve(item, selections) for item in value]
        return self._resolve_object(value, selections)

    def _resolve_object(self, obj: Json, selections: list[SelectionSetNode]) -> Json:
        typename = obj.get("__typename", "?")
        out: Json = {}
        for key, nodes in self._collect(typename, selections).items():
            node = nodes[0]
            name = node.name.value
            if name == "__typename":
                if "__typename" not in obj:
                    raise UnhandledQuery(f"operation {self.name}: __typename of an untyped object")
                out[key] = typename
                continue
            if name not in obj:
                raise UnhandledQuery(f'operation {self.name}: field "{name}" on {typename}')
            value = obj[name]
            if callable(value):
                args = {
                    a.name.value: value_from_ast_untyped(a.value, self.variables)
                    for a in node.arguments
                }
                try:
                    inspect.signature(value).bind(**args)
                except TypeError as error:
                    raise UnhandledQuery(
                        f'operation {self.name}: arguments of "{name}" on {typename}: {error}'
                    ) from None
                value = value(**args)
            children = [n.selection_set for n in nodes if n.selection_set is not None]
            out[key] = self._resolve(value, children)
        return out

    def _collect(
        self, typename: str, selections: Iterable[SelectionSetNode]
    ) -> dict[str, list[FieldNode]]:
        """Group fields by response key, flattening fragments that apply to ``typename``."""
        fields: dict[str, list[FieldNode]] = {}
        for selection_set in selections:
            for node in selection_set.selections:
                if not self._included(node):
                    continue
                if isinstance(node, FieldNode):
                    key = node.alias.value if node.alias else node.name.value
                    fields.setdefault(key, []).append(node)
                    continue
                if isinstance(node, FragmentSpreadNode):
                    fragment: FragmentDefinitionNode | InlineFragmentNode = self.fragments[
                        node.name.value
                    ]
                else:
                    assert isinstance(node, InlineFragmentNode)
                    fragment = node
                condition = fragment.type_condition
                # Interfaces and unions are few here; a fragment on a type we did not tag
                # ("?") applies, so untyped objects need no __typename.
                if (
                    condition
                    and typename != "?"
                    and condition.name.value not in _supertypes(typename)
                ):
                    continue
                for key, nodes in self._collect(typename, [fragment.selection_set]).items():
                    fields.setdefault(key, []).extend(nodes)
        return fields

    def _included(self, node: Any) -> bool:
        for directive in node.directives or ():
            if directive.name.value in ("include", "skip"):
                argument = directive.arguments[0]
                flag = bool(value_from_ast_untyped(argument.value, self.variables))
                if flag != (directive.name.value == "include"):
                    return False
        return True


# The few GraphQL interfaces the SDK spreads fragments on.
_INTERFACES = {
    "ArtifactSequence": {"ArtifactCollection"},
    "ArtifactPortfolio": {"ArtifactCollection"},
}


def _supertypes(typename: str) -> set[str]:
    return {typename} | _INTERFACES.get(typename, set())


# ---------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------


def _gid(typename: str, key: object) -> str:
    """A W&B-style opaque ID: base64 of ``Type:key``."""
    return base64.b64encode(f"{typename}:{key}".encode()).decode()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


@dataclass
class FileRecord:
    """An uploaded file: where its bytes are kept, and when they arrived."""

    name: str
    key: str
    size: int
    md5: str
    updated_at: float = field(default_factory=time.time)


@dataclass
class RunRecord:
    """A run as the server holds it. ``config`` keeps the SDK's ``{key: {"value": v}}`` form."""

    entity: str
    project: str
    name: str
    display_name: str
    created_at: float = field(default_factory=time.time)
    heartbeat_at: float = field(default_factory=time.time)
    state: str = "running"
    exitcode: int | None = None
    config: Json = field(default_factory=dict)
    summary: Json = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    history: dict[int, Json] = field(default_factory=dict)
    history_lines: int = 0
    files: dict[str, FileRecord] = field(default_factory=dict)
    events_lines: int = 0
    log_lines: int = 0
    job_type: str | None = None
    group: str | None = None
    notes: str | None = None
    description: str | None = None
    host: str | None = None
    program: str | None = None

    @property
    def path(self) -> str:
        return f"{self.entity}/{self.project}/{self.name}"

    @property
    def storage_id(self) -> str:
        return _gid("Run", f"v1:{self.name}:{self.project}:{self.entity}")

    def history_rows(self, min_step: int | None = None, max_step: int | None = None) -> list[Json]:
        """History rows by step, ``min_step`` included and ``max_step`` excluded."""
        low = -1 if min_step is None else min_step
        high = max(self.history, default=0) + 1 if max_step is None else max_step
        return [self.history[s] for s in sorted(self.history) if low <= s < high]

    def sampled_history(self, spec: Json) -> list[Json]:
        """Rows holding every key of ``spec``, reduced to those keys, at most ``samples``."""
        keys = spec.get("keys") or []
        # Unlike `history`, a sampled-history spec's maxStep is inclusive.
        max_step = spec.get("maxStep")
        rows = [
            {k: row[k] for k in keys}
            for row in self.history_rows(
                spec.get("minStep"), None if max_step is None else max_step + 1
            )
            if all(k in row for k in keys)
        ]
        samples = int(spec.get("samples") or 500)
        if len(rows) <= samples:
            return rows
        # Evenly spaced, always keeping the last row, as W&B's sampling does.
        stride = len(rows) / samples
        return [rows[min(len(rows) - 1, round((i + 1) * stride) - 1)] for i in range(samples)]

    def history_keys(self) -> Json:
        """The ``historyKeys`` JSON: the last step and, per key, the value types seen."""
        counts: dict[str, Counter[str]] = {}
        for row in self.history.values():
            for key, value in row.items():
                counts.setdefault(key, Counter())[_history_type(value)] += 1
        return {
            "lastStep": max(self.history, default=-1),
            "keys": {
                key: {"typeCounts": [{"type": t, "count": n} for t, n in c.items()]}
                for key, c in counts.items()
            },
        }


def _run_field(run: RunRecord, key: str) -> Any:
    """The value a run filter's key names (MongoDB-style keys as the SDK sends them)."""
    head, _, rest = key.partition(".")
    if head == "config":
        name, _, inner = rest.partition(".")
        value = run.config.get(name, {}).get("value")
        path = inner.removeprefix("value").lstrip(".")
        return _dig(value, path)
    if head in ("summary_metrics", "summaryMetrics"):
        return _dig(run.summary, rest)
    fields = {
        "state": run.state,
        "tags": run.tags,
        "name": run.name,
        "display_name": run.display_name,
        "displayName": run.display_name,
        "jobType": run.job_type,
        "group": run.group,
        "createdAt": _iso(run.created_at),
    }
    if key not in fields:
        raise UnhandledQuery(f"run filter key {key!r}")
    return fields[key]


def _dig(value: Any, path: str) -> Any:
    for part in path.split(".") if path else ():
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _run_matches(run: RunRecord, conditions: Json) -> bool:
    for key, condition in conditions.items():
        if key == "$and":
            ok = all(_run_matches(run, c) for c in condition)
        elif key == "$or":
            ok = any(_run_matches(run, c) for c in condition)
        else:
            ok = _value_matches(_run_field(run, key), condition)
        if not ok:
            return False
    return True


def _value_matches(value: Any, condition: Any) -> bool:
    """One MongoDB-style condition; a list value (tags) matches if any element does."""
    if not (
        isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition)
    ):
        return condition in value if isinstance(value, list) else value == condition
    for operator, operand in condition.items():
        values = value if isinstance(value, list) else [value]
        if operator == "$in":
            ok = any(v in operand for v in values)
        elif operator == "$nin":
            ok = not any(v in operand for v in values)
        elif operator in ("$eq", "$ne"):
            ok = _value_matches(value, operand) == (operator == "$eq")
        elif operator == "$exists":
            ok = (value is not None) == bool(operand)
        elif operator == "$regex":
            ok = any(isinstance(v, str) and re.search(operand, v) for v in values)
        elif operator in _COMPARISONS:
            ok = any(v is not None and _COMPARISONS[operator](v, operand) for v in values)
        else:
            raise UnhandledQuery(f"run filter operator {operator!r}")
        if not ok:
            return False
    return True


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _connection(
    items: list[Any],
    node: Callable[[Any], Json],
    first: int | None = None,
    after: str | None = None,
) -> Json:
    """A Relay connection over ``items``; cursors are list positions."""
    start = int(after) + 1 if after else 0
    end = len(items) if first is None else start + first
    page = items[start:end]
    return {
        "totalCount": len(items),
        "edges": [{"node": node(item), "cursor": str(start + i)} for i, item in enumerate(page)],
        "pageInfo": {
            "__typename": "PageInfo",
            "endCursor": str(start + len(page) - 1) if page else after,
            "hasNextPage": end < len(items),
            "startCursor": str(start) if page else None,
            "hasPreviousPage": start > 0,
        },
    }


def _select_files(
    files: dict[str, FileRecord], names: Iterable[str] | None, pattern: str | None
) -> list[FileRecord]:
    """Files by exact names, else by a SQL ``LIKE`` pattern (as W&B takes it), else all."""
    if names:
        return [files[n] for n in names if n in files]
    if pattern:
        regex = re.compile(
            "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
        )
        return [f for n, f in sorted(files.items()) if regex.fullmatch(n)]
    return [files[n] for n in sorted(files)]


def _maybe(node: Callable[[Any], Json], record: Any) -> Json | None:
    """``node(record)``, or null for a record that does not exist."""
    return None if record is None else node(record)


def _history_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "map" if isinstance(value, dict) else "unknown"


@dataclass
class ProjectRecord:
    """A project; W&B calls it ``model`` in older operations."""

    entity: str
    name: str
    internal_id: int
    created_at: float = field(default_factory=time.time)

    @property
    def gid(self) -> str:
        return _gid("Project", self.internal_id)


_VERSION_ALIAS = re.compile(r"^v\d+$")


@dataclass(eq=False)
class ArtifactVersion:
    """One artifact version. ``index`` (the N of ``vN``) is given when it is committed."""

    internal_id: int
    collection: ArtifactCollection
    digest: str
    metadata: str | None
    description: str | None
    created_by: RunRecord | None
    history_step: int | None
    requested_aliases: list[str]
    state: str = "PENDING"
    index: int | None = None
    manifest: Json = field(default_factory=dict)
    used_by: list[RunRecord] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def gid(self) -> str:
        return _gid("Artifact", self.internal_id)

    @property
    def entries(self) -> Json:
        """The manifest's ``contents``: path -> {digest (base64 md5), size, ...}."""
        contents: Json = self.manifest.get("contents") or {}
        return contents


@dataclass(eq=False)
class ArtifactCollection:
    """An artifact name in a project (W&B's ``ArtifactSequence``) and its versions."""

    internal_id: int
    project: ProjectRecord
    name: str
    type_name: str
    versions: list[ArtifactVersion] = field(default_factory=list)
    aliases: dict[str, ArtifactVersion] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    @property
    def gid(self) -> str:
        return _gid("ArtifactCollection", self.internal_id)

    def committed(self) -> list[ArtifactVersion]:
        return sorted((v for v in self.versions if v.index is not None), key=lambda v: v.index or 0)

    def resolve(self, reference: str) -> ArtifactVersion | None:
        """The version a ``vN`` or an alias names."""
        if _VERSION_ALIAS.match(reference):
            return next((v for v in self.committed() if v.index == int(reference[1:])), None)
        return self.aliases.get(reference)

    def aliases_of(self, version: ArtifactVersion) -> list[str]:
        """A version's aliases: its own ``vN`` first, as W&B lists them, then the others."""
        own = [f"v{version.index}"] if version.index is not None else []
        return own + sorted(a for a, v in self.aliases.items() if v is version)

    def set_alias(self, alias: str, version: ArtifactVersion) -> None:
        """Point ``alias`` at ``version``; it leaves whichever version held it."""
        check_alias(alias)
        self.aliases[alias] = version


def check_alias(alias: str) -> None:
    """Refuse an alias of the form ``vN``: W&B gives those itself, in commit order.

    Whether W&B refuses or accepts such an alias is not checked against it; refusing keeps
    clients from relying on ``vN`` meaning anything but the version's own number.
    """
    if _VERSION_ALIAS.match(alias):
        raise GraphQLFailure(
            f"alias {alias!r} is reserved: version aliases (v0, v1, ...) are assigned by the"
            " server in commit order; use another name"
        )


@dataclass
class ViewRecord:
    """A saved view: a report (type ``runs`` or ``runs/draft``) or a workspace."""

    internal_id: int
    project: ProjectRecord
    name: str
    display_name: str | None
    description: str | None
    type: str
    spec: str
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def gid(self) -> str:
        return _gid("View", self.internal_id)


class WandbState:
    """Everything the server knows, and the GraphQL resolvers over it. Callers hold ``lock``."""

    def __init__(
        self, base_url: Callable[[], str], default_entity: str, crash_after: float
    ) -> None:
        self.lock = threading.RLock()
        self.base_url = base_url
        self.default_entity = default_entity
        self.crash_after = crash_after
        self.projects: dict[tuple[str, str], ProjectRecord] = {}
        self.runs: dict[tuple[str, str, str], RunRecord] = {}
        self.blobs: dict[str, bytes] = {}
        self.collections: dict[tuple[str, str, str], ArtifactCollection] = {}
        self.artifacts: dict[str, ArtifactVersion] = {}
        self.views: dict[str, ViewRecord] = {}
        self._ids = itertools.count(1)

    # -- lookups ------------------------------------------------------------------------

    def project(
        self, entity: str | None, name: str | None, *, create: bool = False
    ) -> ProjectRecord | None:
        key = (entity or self.default_entity, name or "uncategorized")
        if key not in self.projects and create:
            self.projects[key] = ProjectRecord(key[0], key[1], next(self._ids))
        return self.projects.get(key)

    def run(self, entity: str | None, project: str | None, name: str) -> RunRecord | None:
        return self.runs.get((entity or self.default_entity, project or "uncategorized", name))

    def run_by_storage_id(self, storage_id: str) -> RunRecord | None:
        return next((r for r in self.runs.values() if r.storage_id == storage_id), None)

    def storage_url(self, key: str) -> str:
        return f"{self.base_url()}/storage/{quote(key)}"

    def put_blob(self, key: str, data: bytes) -> None:
        """Keep uploaded bytes; a run file's key (``run/e/p/id/name``) also files it."""
        self.blobs[key] = data
        if key.startswith("manifest/"):
            internal_id = int(key.removeprefix("manifest/"))
            artifact = next(a for a in self.artifacts.values() if a.internal_id == internal_id)
            artifact.manifest = json.loads(data)
        if key.startswith("run/"):
            entity, project, name, path = key.removeprefix("run/").split("/", 3)
            run = self.run(entity, project, name)
            if run is not None:
                md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
                run.files[path] = FileRecord(path, key, len(data), md5)

    def mark_crashed(self) -> None:
        """Runs silent for ``crash_after`` seconds are crashed, as W&B marks them."""
        deadline = time.time() - self.crash_after
        for run in self.runs.values():
            if run.state == "running" and run.heartbeat_at < deadline:
                run.state = "crashed"

    # -- roots --------------------------------------------------------------------------

    def query_root(self) -> Json:
        return {
            "__typename": "Query",
            "viewer": self._viewer(),
            # No optional features: the SDK takes its plainest paths. (Enabling the artifact,
            # file and file_stream features changes none of the requests the tests make.)
            "serverInfo": {"__typename": "ServerInfo", "features": []},
            "entity": lambda name: self._entity_node(name),
            "project": lambda name, entityName=None: _maybe(
                self._project_node, self.project(entityName, name)
            ),
            "model": lambda name=None, entityName=None: _maybe(
                self._project_node, self.project(entityName, name)
            ),
            "artifact": lambda id: _maybe(self._artifact_node, self.artifacts.get(id)),
            "models": lambda entityName=None, first=None, after=None: _connection(
                [
                    p
                    for p in self.projects.values()
                    if p.entity == (entityName or self.default_entity)
                ],
                self._project_node,
                first,
                after,
            ),
            "view": lambda id: _maybe(self._view_node, self.views.get(id)),
        }

    def mutation_root(self) -> Json:
        return {
            "__typename": "Mutation",
            "upsertBucket": lambda input: self.upsert_bucket(input),
            "createRunFiles": lambda input: self.create_run_files(input),
            "createArtifact": lambda input: self.create_artifact(input),
            # Sent twice per version: for the manifest's ID, then for its upload URL.
            "createArtifactManifest": lambda input: self._manifest_payload(input["artifactID"]),
            "createArtifactFiles": lambda input: self.create_artifact_files(input),
            "commitArtifact": lambda input: self.commit_artifact(input["artifactID"]),
            "useArtifact": lambda input: self.use_artifact(input),
            "upsertModel": lambda input: self.upsert_model(input),
            "upsertView": lambda input: self.upsert_view(input),
            "updateArtifact": lambda input: self.update_artifact(input),
            "addAliases": lambda input: self.change_aliases(input, add=True),
            "deleteAliases": lambda input: self.change_aliases(input, add=False),
        }

    # -- users, entities, projects ---------------------------------------------------------

    def _viewer(self) -> Json:
        return {
            "__typename": "User",
            "id": _gid("User", 1),
            "entity": self.default_entity,
            "username": self.default_entity,
            "name": self.default_entity,
            "email": f"{self.default_entity}@localhost",
            "admin": False,
            "flags": "{}",
            "teams": {"edges": []},
            "apiKeys": {"edges": []},
            "deletedAt": None,
        }

    def _entity_node(self, name: str) -> Json:
        return {
            "__typename": "Entity",
            "id": _gid("Entity", name),
            "name": name,
            # No organisation: artifacts stay plain project artifacts, no registry.
            "organization": None,
        }

    def _project_node(self, project: ProjectRecord) -> Json:
        def run(name: str, missingOk: bool = False) -> Json | None:
            return _maybe(self._run_node, self.run(project.entity, project.name, name))

        return {
            "__typename": "Project",
            "id": project.gid,
            "internalId": str(project.internal_id),
            "name": project.name,
            "readOnly": False,
            "createdAt": _iso(project.created_at),
            "isBenchmark": False,
            "description": None,
            "access": "PRIVATE",
            "views": "{}",
            "user": self._viewer(),
            "entity": self._entity_node(project.entity),
            "entityName": project.entity,
            "run": run,
            "bucket": run,
            "artifact": lambda name: _maybe(
                self._artifact_node, self._find_artifact(project, name)
            ),
            "artifactCollection": lambda name: _maybe(
                self._collection_node, self._find_collection(project, name)
            ),
            "artifactCollectionMembership": lambda name: _maybe(
                self._membership_node, self._find_artifact(project, name)
            ),
            "artifactType": lambda name: (
                self._artifact_type_node(project, name)
                if any(
                    c.project is project and c.type_name == name for c in self.collections.values()
                )
                else None
            ),
            "runCount": lambda filters=None: len(self._find_runs(project, filters)),
            "runs": lambda filters=None, order=None, first=50, after=None: _connection(
                self._find_runs(project, filters, order), self._run_node, first, after
            ),
        }

    def _find_runs(
        self, project: ProjectRecord, filters: str | None, order: str | None = None
    ) -> list[RunRecord]:
        conditions = json.loads(filters) if filters else {}
        runs = [
            r
            for r in self.runs.values()
            if (r.entity, r.project) == (project.entity, project.name)
            and _run_matches(r, conditions)
        ]
        # Runs are kept in creation order; "-created_at" (W&B's default) reverses it.
        return runs[::-1] if (order or "").startswith("-") else runs

    # -- runs -----------------------------------------------------------------------------

    def _run_node(self, run: RunRecord) -> Json:
        project = self.projects[(run.entity, run.project)]
        wandb_config = run.config.get("_wandb", {}).get("value", {})
        return {
            "__typename": "Run",
            "id": run.storage_id,
            "name": run.name,
            "displayName": run.display_name,
            "description": run.description,
            "notes": run.notes,
            "group": run.group,
            "jobType": run.job_type,
            "sweepName": None,
            "commit": None,
            "host": run.host,
            "readOnly": False,
            "state": run.state,
            "createdAt": _iso(run.created_at),
            "heartbeatAt": _iso(run.heartbeat_at),
            "tags": list(run.tags),
            "config": json.dumps(run.config),
            "summaryMetrics": json.dumps(run.summary),
            "systemMetrics": "{}",
            "historyLineCount": run.history_lines,
            "eventsLineCount": run.events_lines,
            "logLineCount": run.log_lines,
            "historyKeys": run.history_keys(),
            "history": lambda samples=500, minStep=None, maxStep=None: [
                json.dumps(row) for row in run.history_rows(minStep, maxStep)[:samples]
            ],
            "sampledHistory": lambda specs: [run.sampled_history(json.loads(s)) for s in specs],
            # Nothing is exported to parquet here: every row is live data.
            "parquetHistory": lambda liveKeys: {
                "parquetUrls": [],
                "liveData": [
                    {k: row[k] for k in liveKeys if k in row} for row in run.history_rows()
                ],
            },
            "historyTail": json.dumps(
                [json.dumps(run.history[max(run.history)])] if run.history else []
            ),
            "eventsTail": "[]",
            "wandbConfig": lambda keys: json.dumps(
                {k: wandb_config[k] for k in keys if k in wandb_config}
            ),
            "projectId": str(project.internal_id),
            "fileCount": len(run.files),
            "outputArtifacts": lambda first=None, after=None: _connection(
                [a for a in self.artifacts.values() if a.created_by is run and a.index is not None],
                self._artifact_node,
                first,
                after,
            ),
            "inputArtifacts": lambda first=None, after=None: _connection(
                [a for a in self.artifacts.values() if run in a.used_by],
                self._artifact_node,
                first,
                after,
            ),
            "files": lambda names=(), pattern=None, first=50, after=None: _connection(
                _select_files(run.files, names, pattern), self._file_node, first, after
            ),
            "project": self._project_node(project),
            "user": {
                "__typename": "User",
                **{k: self.default_entity for k in ("name", "username")},
            },
        }

    def _file_node(self, file: FileRecord) -> Json:
        url = self.storage_url(file.key)
        return {
            "__typename": "File",
            "id": _gid("File", file.key),
            "name": file.name,
            "url": lambda upload=False: url,
            "directUrl": url,
            "sizeBytes": file.size,
            "mimetype": "application/octet-stream",
            "updatedAt": _iso(file.updated_at),
            "md5": file.md5,
        }

    def upsert_bucket(self, data: Json) -> Json:
        """Create or update a run; only the fields given change (tags alone stay tags alone)."""
        run = self.run_by_storage_id(data["id"]) if data.get("id") else None
        inserted = False
        if run is None:
            if not data.get("name"):
                raise GraphQLFailure(f"run {data.get('id')!r} not found")
            project = self.project(data.get("entityName"), data.get("modelName"), create=True)
            assert project is not None
            run = self.run(project.entity, project.name, data["name"])
            if run is None:
                run = RunRecord(
                    project.entity,
                    project.name,
                    data["name"],
                    display_name=f"run-{len(self.runs) + 1}",
                )
                self.runs[(project.entity, project.name, run.name)] = run
                inserted = True
        simple = {
            "displayName": "display_name",
            "description": "description",
            "notes": "notes",
            "groupName": "group",
            "jobType": "job_type",
            "host": "host",
            "jobProgram": "program",
            "state": "state",
        }
        for key, attribute in simple.items():
            if data.get(key) is not None:
                setattr(run, attribute, data[key])
        if data.get("tags") is not None:
            run.tags = list(data["tags"])
        if data.get("config") is not None:
            run.config = json.loads(data["config"])
        if data.get("summaryMetrics") is not None:
            run.summary = json.loads(data["summaryMetrics"])
        run.heartbeat_at = time.time()
        return {
            "__typename": "UpsertBucketPayload",
            "bucket": self._run_node(run),
            "inserted": inserted,
        }

    def create_run_files(self, data: Json) -> Json:
        run = self.run(data["entityName"], data["projectName"], data["runName"])
        if run is None:
            raise GraphQLFailure(f"run {data['runName']!r} not found")
        return {
            "runID": run.storage_id,
            "uploadHeaders": [],
            "files": [
                {"name": name, "uploadUrl": self.storage_url(f"run/{run.path}/{name}")}
                for name in data["files"]
            ],
        }

    # -- artifacts: reads -------------------------------------------------------------------

    def _find_collection(self, project: ProjectRecord, name: str) -> ArtifactCollection | None:
        return self.collections.get((project.entity, project.name, name))

    def _find_artifact(self, project: ProjectRecord, name: str) -> ArtifactVersion | None:
        """``collection:vN`` or ``collection:alias`` (``latest`` when only a name is given)."""
        collection_name, _, reference = name.partition(":")
        collection = self._find_collection(project, collection_name)
        return collection.resolve(reference or "latest") if collection else None

    def _artifact_type_node(self, project: ProjectRecord, name: str) -> Json:
        def collections() -> list[ArtifactCollection]:
            return [
                c for c in self.collections.values() if c.project is project and c.type_name == name
            ]

        return {
            "__typename": "ArtifactType",
            "name": name,
            "artifactCollection": lambda name: next(
                (self._collection_node(c) for c in collections() if c.name == name), None
            ),
        }

    def _collection_node(self, collection: ArtifactCollection) -> Json:
        def artifacts(
            first: int | None = None,
            after: str | None = None,
            order: str | None = None,
            filters: str | None = None,
        ) -> Json:
            if order or (filters and json.loads(filters) != {"state": "COMMITTED"}):
                raise UnhandledQuery(f"artifact versions ordered {order!r}, filtered {filters!r}")
            # Newest first, as W&B lists versions.
            versions = collection.committed()[::-1]
            page = _connection(versions, self._artifact_node, first, after)
            for edge, version in zip(page["edges"], versions[int(after or -1) + 1 :], strict=False):
                edge["version"] = f"v{version.index}"
            return page

        latest = collection.aliases.get("latest")
        return {
            "__typename": "ArtifactSequence",
            "id": collection.gid,
            "name": collection.name,
            "description": None,
            "createdAt": _iso(collection.created_at),
            "updatedAt": None,
            "project": self._project_node(collection.project),
            "defaultArtifactType": {"__typename": "ArtifactType", "name": collection.type_name},
            "tags": {"edges": []},
            "latestArtifact": lambda: _maybe(self._artifact_node, latest),
            "artifacts": artifacts,
            "artifactMembership": lambda aliasName: _maybe(
                self._membership_node, collection.resolve(aliasName)
            ),
        }

    def _alias_node(self, collection: ArtifactCollection, alias: str) -> Json:
        return {
            "__typename": "ArtifactAlias",
            "id": _gid("ArtifactAlias", f"{collection.internal_id}:{alias}"),
            "alias": alias,
            "artifactCollection": lambda: self._collection_node(collection),
        }

    def _artifact_node(self, artifact: ArtifactVersion) -> Json:
        collection = artifact.collection
        entries = artifact.entries
        return {
            "__typename": "Artifact",
            "id": artifact.gid,
            "artifactSequence": lambda: self._collection_node(collection),
            "artifactType": {"__typename": "ArtifactType", "name": collection.type_name},
            "versionIndex": artifact.index,
            "description": artifact.description,
            "metadata": artifact.metadata,
            # A non-positive TTL means none.
            "ttlDurationSeconds": -2,
            "ttlIsInherited": True,
            "tags": [],
            "historyStep": artifact.history_step,
            "state": artifact.state,
            "size": sum(int(e.get("size") or 0) for e in entries.values()),
            "fileCount": len(entries),
            "digest": artifact.digest,
            "digestAlgorithm": "MANIFEST_MD5",
            "commitHash": hashlib.sha1(artifact.gid.encode()).hexdigest()[:20],
            "createdAt": _iso(artifact.created_at),
            "updatedAt": _iso(artifact.updated_at),
            "aliases": lambda: [
                self._alias_node(collection, a) for a in collection.aliases_of(artifact)
            ],
            "createdBy": lambda: _maybe(self._run_node, artifact.created_by),
            "usedBy": lambda first=None, after=None: _connection(
                artifact.used_by, self._run_node, first, after
            ),
            "currentManifest": {
                "__typename": "ArtifactManifest",
                "id": _gid("ArtifactManifest", artifact.internal_id),
                "file": {"directUrl": self.storage_url(f"manifest/{artifact.internal_id}")},
            },
        }

    def _membership_node(self, artifact: ArtifactVersion) -> Json:
        collection = artifact.collection
        node = self._artifact_node(artifact)

        def files(
            names: list[str] | None = None, first: int | None = None, after: str | None = None
        ) -> Json:
            return _connection(
                [n for n in artifact.entries if not names or n in names],
                lambda name: self._artifact_file_node(artifact, name),
                first,
                after,
            )

        return {
            "__typename": "ArtifactCollectionMembership",
            "id": _gid("ArtifactCollectionMembership", artifact.internal_id),
            "versionIndex": artifact.index,
            "createdAt": _iso(artifact.created_at),
            "aliases": node["aliases"],
            "artifactCollection": lambda: self._collection_node(collection),
            "artifact": node,
            "files": files,
        }

    def _artifact_file_node(self, artifact: ArtifactVersion, name: str) -> Json:
        entry = artifact.entries[name]
        md5_hex = base64.b64decode(entry["digest"]).hex()
        key = f"artifact/{artifact.collection.project.entity}/{md5_hex}"
        url = self.storage_url(key)
        return {
            "__typename": "File",
            "id": _gid("File", f"{artifact.internal_id}:{name}"),
            "name": name,
            "displayName": name.rsplit("/", 1)[-1],
            "url": url,
            "directUrl": url,
            "storagePath": key,
            "sizeBytes": int(entry.get("size") or 0),
            "mimetype": None,
            "updatedAt": _iso(artifact.updated_at),
            "digest": entry["digest"],
            "md5": entry["digest"],
        }

    # -- artifacts: writes -----------------------------------------------------------------

    def create_artifact(self, data: Json) -> Json:
        """A new PENDING version, or the committed one with the same digest (deduplication)."""
        project = self.project(data["entityName"], data["projectName"], create=True)
        assert project is not None
        key = (project.entity, project.name, data["artifactCollectionName"])
        collection = self.collections.get(key)
        if collection is None:
            collection = ArtifactCollection(
                next(self._ids), project, key[2], data["artifactTypeName"]
            )
            self.collections[key] = collection
        elif collection.type_name != data["artifactTypeName"]:
            raise GraphQLFailure(
                f"artifact {key[2]!r} has type {collection.type_name!r},"
                f" not {data['artifactTypeName']!r}"
            )
        aliases = [a["alias"] for a in data.get("aliases") or ()]
        for alias in aliases:
            check_alias(alias)
        existing = next((v for v in collection.committed() if v.digest == data["digest"]), None)
        if existing is not None and data.get("enableDigestDeduplication"):
            # W&B's answer to logging the same content again: no new version, the
            # existing one takes the aliases (and keeps its metadata).
            for alias in aliases:
                collection.set_alias(alias, existing)
            artifact = existing
        else:
            run = (
                self.run(project.entity, project.name, data["runName"])
                if data.get("runName")
                else None
            )
            artifact = ArtifactVersion(
                next(self._ids),
                collection,
                digest=data["digest"],
                metadata=data.get("metadata"),
                description=data.get("description"),
                created_by=run,
                history_step=data.get("historyStep"),
                requested_aliases=aliases,
            )
            collection.versions.append(artifact)
            self.artifacts[artifact.gid] = artifact
        return {"artifact": self._artifact_node(artifact)}

    def _artifact(self, artifact_id: str) -> ArtifactVersion:
        if artifact_id not in self.artifacts:
            raise GraphQLFailure(f"artifact {artifact_id!r} not found")
        return self.artifacts[artifact_id]

    def _manifest_payload(self, artifact_id: str) -> Json:
        artifact = self._artifact(artifact_id)
        return {
            "artifactManifest": {
                "id": _gid("ArtifactManifest", artifact.internal_id),
                "file": {
                    "id": _gid("File", f"manifest:{artifact.internal_id}"),
                    "uploadUrl": self.storage_url(f"manifest/{artifact.internal_id}"),
                    "uploadHeaders": [],
                },
            }
        }

    def create_artifact_files(self, data: Json) -> Json:
        """Upload URLs for an artifact's files, stored by content; known content needs none."""
        edges = []
        for spec in data["artifactFiles"]:
            artifact = self._artifact(spec["artifactID"])
            md5_hex = base64.b64decode(spec["md5"]).hex()
            key = f"artifact/{artifact.collection.project.entity}/{md5_hex}"
            node = {
                "storagePath": key,
                "uploadUrl": None if key in self.blobs else self.storage_url(key),
                "uploadHeaders": [],
                "uploadMultipartUrls": None,
                "artifact": {"id": artifact.gid},
            }
            edges.append({"node": node})
        return {"files": {"edges": edges}}

    def commit_artifact(self, artifact_id: str) -> Json:
        """Number the version (``vN`` in commit order) and give it its aliases and ``latest``."""
        artifact = self._artifact(artifact_id)
        collection = artifact.collection
        if artifact.state != "COMMITTED":
            artifact.index = len(collection.committed())
            artifact.state = "COMMITTED"
            artifact.updated_at = time.time()
            for alias in [*artifact.requested_aliases, "latest"]:
                collection.set_alias(alias, artifact)
        return {"artifact": {"id": artifact.gid, "digest": artifact.digest}}

    def use_artifact(self, data: Json) -> Json:
        artifact = self._artifact(data["artifactID"])
        run = self.run(data["entityName"], data["projectName"], data["runName"])
        if run is None:
            raise GraphQLFailure(f"run {data['runName']!r} not found")
        if run not in artifact.used_by:
            artifact.used_by.append(run)
        return {"artifact": self._artifact_node(artifact)}

    def update_artifact(self, data: Json) -> Json:
        artifact = self._artifact(data["artifactID"])
        if data.get("metadata") is not None:
            artifact.metadata = data["metadata"]
        if data.get("description") is not None:
            artifact.description = data["description"]
        for alias in data.get("aliases") or ():
            artifact.collection.set_alias(alias["alias"], artifact)
        artifact.updated_at = time.time()
        return {"artifact": self._artifact_node(artifact)}

    def change_aliases(self, data: Json, *, add: bool) -> Json:
        artifact = self._artifact(data["artifactID"])
        for alias in data["aliases"]:
            collection = self.collections[
                (alias["entityName"], alias["projectName"], alias["artifactCollectionName"])
            ]
            if add:
                collection.set_alias(alias["alias"], artifact)
            elif collection.aliases.get(alias["alias"]) is artifact:
                del collection.aliases[alias["alias"]]
        return {"success": True}

    # -- projects and views (reports) ------------------------------------------------------

    def upsert_model(self, data: Json) -> Json:
        key = (data.get("entityName") or self.default_entity, data["name"])
        inserted = key not in self.projects
        project = self.project(*key, create=True)
        assert project is not None
        node = self._project_node(project)
        return {"project": node, "model": node, "inserted": inserted}

    def upsert_view(self, data: Json) -> Json:
        """Save a view; the spec is kept as the JSON string the client sent."""
        view = self.views.get(data.get("id") or "")
        inserted = view is None
        if view is None:
            project = self.project(data.get("entityName"), data.get("projectName"), create=True)
            assert project is not None
            view = ViewRecord(
                next(self._ids),
                project,
                name=data.get("name") or f"view-{len(self.views) + 1}",
                display_name=data.get("displayName"),
                description=data.get("description"),
                type=data.get("type") or "runs",
                spec=data.get("spec") or "{}",
            )
            self.views[view.gid] = view
        else:
            for key, attribute in (
                ("displayName", "display_name"),
                ("description", "description"),
                ("type", "type"),
                ("spec", "spec"),
            ):
                if data.get(key) is not None:
                    setattr(view, attribute, data[key])
            view.updated_at = time.time()
        return {"view": self._view_node(view), "inserted": inserted}

    def _view_node(self, view: ViewRecord) -> Json:
        return {
            "__typename": "View",
            "id": view.gid,
            "name": view.name,
            "displayName": view.display_name,
            "description": view.description,
            "type": view.type,
            "spec": view.spec,
            "createdAt": _iso(view.created_at),
            "updatedAt": _iso(view.updated_at),
            "entityName": view.project.entity,
            "projectName": view.project.name,
            "project": self._project_node(view.project),
            "user": self._viewer(),
        }

    # -- file_stream ---------------------------------------------------------------------

    def file_stream(self, run: RunRecord, body: Json) -> None:
        """Apply one file_stream post: history rows, the whole summary, the run's end."""
        run.heartbeat_at = time.time()
        if run.state == "crashed":
            run.state = "running"
        for name, chunk in (body.get("files") or {}).items():
            lines = chunk.get("content") or []
            if name == "wandb-history.jsonl":
                for line in lines:
                    row = json.loads(line)
                    run.history[int(row.get("_step", run.history_lines))] = row
                run.history_lines = chunk.get("offset", 0) + len(lines)
            elif name == "wandb-summary.json" and lines:
                # The SDK sends its whole summary each time; the last line wins.
                run.summary = json.loads(lines[-1])
            elif name == "wandb-events.jsonl":
                run.events_lines = chunk.get("offset", 0) + len(lines)
            elif name == "output.log":
                run.log_lines = chunk.get("offset", 0) + len(lines)
        if body.get("complete"):
            run.exitcode = int(body.get("exitcode") or 0)
            run.state = "finished" if run.exitcode == 0 else "failed"


# ---------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------


@dataclass
class Fault:
    """How to answer requests that match, instead of answering them normally.

    ``operation`` is a GraphQL operation name or one of ``file_stream``, ``storage``,
    ``otel``; ``None`` matches every request. ``times`` bounds the number of requests it
    hits; ``until`` (a ``time.monotonic()`` deadline) bounds its duration. ``delay`` waits
    before answering; with ``status`` unset the request is then answered normally.
    """

    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    operation: str | None = None
    times: int | None = None
    until: float | None = None
    hits: int = 0

    @property
    def spent(self) -> bool:
        if self.until is not None and time.monotonic() >= self.until:
            return True
        return self.times is not None and self.hits >= self.times

    def matches(self, operation: str) -> bool:
        return self.operation in (None, operation) and not self.spent


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request; the routing and answers live on :class:`WandbServer`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's clients expect
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        status, payload, headers = self.server.owner.handle(self.command, self.path, body)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            # The client gave up (or a fault closed the socket); nothing left to answer.
            self.close_connection = True

    do_GET = do_POST = do_PUT = _handle


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: WandbServer) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        super().__init__(address, _Handler)


Answer = tuple[int, Json | bytes, dict[str, str]]

_JSON = {"Content-Type": "application/json"}
_FILE_STREAM = re.compile(r"^/files/([^/]+)/([^/]+)/([^/]+)/file_stream$")
_ARTIFACT_FILE = re.compile(
    r"^/artifacts(?:V2/[^/]+)?/(?P<entity>[^/]+)/(?:[^/]+/)*(?P<md5>[0-9a-f]{32})(?:/[^/]+)?$"
)


class WandbServer:
    """A W&B-compatible server on 127.0.0.1 for tests: ``WandbServer().start()``.

    ``entity`` is the signed-in user's (default) entity; a running run that posts nothing
    for ``crash_after`` seconds is reported as crashed. ``requests`` counts requests by
    operation name (GraphQL operations by name; ``file_stream``, ``storage`` for uploads
    and downloads, ``otel``); ``unhandled`` lists what the server could not answer.
    """

    def __init__(self, entity: str = "atm-tests", crash_after: float = 300.0) -> None:
        self.state = WandbState(lambda: self.url, entity, crash_after)
        self.requests: Counter[str] = Counter()
        self.unhandled: list[str] = []
        self.port = 0
        self._faults: list[Fault] = []
        self._httpd: _HTTPServer | None = None
        self._reopen: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WandbServer:
        """Listen on a free loopback port; returns ``self``."""
        self._listen()
        return self

    def stop(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
        self._stop_listening()

    def __enter__(self) -> WandbServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults and counters --------------------------------------------------------------

    def inject(
        self,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
        operation: str | None = None,
        times: int | None = None,
        seconds: float | None = None,
    ) -> Fault:
        """Answer matching requests with ``status`` (and ``Retry-After``) or after ``delay``.

        Hits the next ``times`` matching requests, every matching request for ``seconds``,
        or (given both) whichever ends first; given neither, the next matching request.
        ``operation`` names a GraphQL operation, or ``file_stream``, ``storage``, ``otel``.
        """
        if times is None and seconds is None:
            times = 1
        until = time.monotonic() + seconds if seconds is not None else None
        fault = Fault(status, retry_after, delay, operation, times, until)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def refuse_connections(self, seconds: float) -> None:
        """Stop listening and drop open connections now; listen on the same port again later."""
        self._stop_listening()
        self._reopen = threading.Timer(seconds, self._listen)
        self._reopen.daemon = True
        self._reopen.start()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def _take_fault(self, operation: str) -> Fault | None:
        with self._lock:
            self._faults = [f for f in self._faults if not f.spent]
            for fault in self._faults:
                if fault.matches(operation):
                    fault.hits += 1
                    return fault
        return None

    # -- listening ------------------------------------------------------------------------

    def _listen(self) -> None:
        self._httpd = _HTTPServer(("127.0.0.1", self.port), self)
        self.port = self._httpd.server_address[1]
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def _stop_listening(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        # Keep-alive connections would otherwise keep serving after the listener closed.
        for connection in list(httpd.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    # -- routing --------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> Answer:
        """Answer one HTTP request (called on the request's thread)."""
        path = path.split("?", 1)[0]
        try:
            operation, answer = self._route(method, path, body)
        except UnhandledQuery as error:
            return self._unhandled(str(error))
        with self._lock:
            self.requests[operation] += 1
        fault = self._take_fault(operation)
        if fault is not None:
            time.sleep(fault.delay)
            if fault.status is not None:
                headers = dict(_JSON)
                if fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
                message = f"injected HTTP {fault.status} for {operation}"
                return fault.status, {"errors": [{"message": message}]}, headers
        try:
            with self.state.lock:
                return answer()
        except UnhandledQuery as error:
            return self._unhandled(str(error))
        except Exception as error:
            # A bug here must fail the test, not hang the SDK in retries.
            log.exception("error answering %s", operation)
            with self._lock:
                self.unhandled.append(f"{operation}: {error!r}")
            return 500, {"errors": [{"message": f"test server error: {error!r}"}]}, _JSON

    def _unhandled(self, what: str) -> Answer:
        log.warning("unhandled: %s", what)
        with self._lock:
            self.unhandled.append(what)
        return 400, {"errors": [{"message": f"not handled by the test server: {what}"}]}, _JSON

    def _route(self, method: str, path: str, body: bytes) -> tuple[str, Callable[[], Answer]]:
        """Name the request's operation, and return how to answer it."""
        if method == "POST" and path == "/graphql":
            request = json.loads(body)
            operation = Operation.parse(
                request["query"], request.get("variables"), request.get("operationName")
            )
            return operation.name, lambda: self._graphql(operation)
        if method == "POST" and (match := _FILE_STREAM.match(path)):
            return "file_stream", lambda: self._file_stream(*match.groups(), json.loads(body))
        if path.startswith("/storage/") and method in ("PUT", "GET"):
            key = unquote(path.removeprefix("/storage/"))
            return "storage", lambda: self._storage(method, key, body)
        if method == "GET" and (match := _ARTIFACT_FILE.match(path)):
            # The SDK's fallback download URL for an artifact file; content is kept by md5.
            key = f"artifact/{unquote(match['entity'])}/{match['md5']}"
            return "storage", lambda: self._storage("GET", key, b"")
        if path.startswith("/sdk/otel/"):
            # The SDK probes this telemetry proxy once and sends nothing more after a 404.
            return "otel", lambda: (404, {}, _JSON)
        raise UnhandledQuery(f"{method} {path}")

    def _graphql(self, operation: Operation) -> Answer:
        state = self.state
        state.mark_crashed()
        root = state.mutation_root() if operation.kind == "mutation" else state.query_root()
        try:
            return 200, {"data": operation.execute(root)}, _JSON
        except GraphQLFailure as error:
            return 200, {"data": None, "errors": [{"message": str(error)}]}, _JSON

    def _file_stream(self, entity: str, project: str, name: str, body: Json) -> Answer:
        run = self.state.run(entity, project, name)
        if run is None:
            return 404, {"error": f"run {entity}/{project}/{name} not found"}, _JSON
        self.state.file_stream(run, body)
        return 200, {"exitcode": None, "limits": {}}, _JSON

    def _storage(self, method: str, key: str, body: bytes) -> Answer:
        if method == "PUT":
            self.state.put_blob(key, body)
            return 200, b"", {}
        if key not in self.state.blobs:
            return 404, {"error": f"no object {key}"}, _JSON
        return 200, self.state.blobs[key], {"Content-Type": "application/octet-stream"}
