"""The audit trail and params versions of a run, in the contract's write order.

Write order: params file → audit record → version tag. A reader that sees tag N can always
read file N; a writer killed in between leaves a file the next writer finds and completes
(``recover``), so no decision is lost and no version is issued twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import ValidationError

from integrations.chain import ParamsMissing, ParamsRejected, chain_problem, load, trusted_head
from integrations.protocol import (
    AUDIT_DIR,
    TAG_CLIENT_REJECTED,
    TAG_LAST_INTERVENTION,
    TAG_PARAMS_VERSION,
    AuditRecord,
    Command,
    ParamsVersion,
    RunSpec,
    Source,
    audit_path,
    params_path,
    parse_audit_path,
    rejected_version,
)
from integrations.trackers import Tracker, TrackerError
from manager_daemon.crashpoints import crash_point

log = logging.getLogger(__name__)


class VersionConflict(RuntimeError):
    """Another writer issued a version since this decision started."""


def current_version(tags: dict[str, str]) -> int:
    """The version tag: the number the next version goes above, trusted or not."""
    try:
        return max(0, int(tags.get(TAG_PARAMS_VERSION, "0") or 0))
    except ValueError:
        return 0


def refused_versions(tags: dict[str, str]) -> set[int]:
    """The version the client last refused, as a set for ``integrations.chain``."""
    refused = rejected_version(tags.get(TAG_CLIENT_REJECTED))
    return set() if refused is None else {refused}


class AuditLog:
    """Reads and writes one tracker's audit records and params versions."""

    def __init__(self, tracker: Tracker, signing_key: str | None = None) -> None:
        self.tracker = tracker
        self.signing_key = signing_key or None

    def decision_ids(self, run_id: str) -> list[int]:
        ids = (parse_audit_path(p) for p in self.tracker.list_artifacts(run_id, AUDIT_DIR))
        return sorted(i for i in ids if i is not None)

    def records(self, run_id: str, ids: list[int] | None = None) -> list[AuditRecord]:
        """Every readable audit record of a run (of ``ids``, when listed already), oldest
        first; unreadable ones are skipped."""
        ids = self.decision_ids(run_id) if ids is None else ids
        return [r for i in ids if (r := self.record(run_id, i)) is not None]

    def record(self, run_id: str, decision_id: int) -> AuditRecord | None:
        """One audit record; None (with a warning) when it is missing or unreadable."""
        try:
            raw = self.tracker.read_json(run_id, audit_path(decision_id))
            return None if raw is None else AuditRecord.model_validate(raw)
        except (TrackerError, ValidationError) as exc:
            log.warning(
                "skipping unreadable audit record d%06d of %s: %s", decision_id, run_id, exc
            )
            return None

    def records_at_start(self, run_id: str, tags: dict[str, str]) -> tuple[list[AuditRecord], int]:
        """What a supervisor starting on a run needs of its audit trail, without reading every
        record: the records of the issued versions (each params version names its decision;
        their number is bounded by the budget), and the newest records down to the newest
        automatic one (its snapshot and step). Every record when a params version cannot be
        read. Also the highest decision id listed. Oldest first."""
        ids = self.decision_ids(run_id)
        wanted: set[int] = set()
        for version in range(1, current_version(tags) + 1):
            try:
                params = self.read_params(run_id, version)
            except (TrackerError, ValidationError):
                params = None
            if params is None:
                return self.records(run_id, ids), max(ids, default=0)
            wanted.add(params.decision_id)
        found = {i: r for i in sorted(wanted & set(ids)) if (r := self.record(run_id, i))}
        for decision_id in reversed(ids):
            record = found.get(decision_id) or self.record(run_id, decision_id)
            if record is None:
                continue
            found[decision_id] = record
            if record.source != Source.HUMAN:
                break
        return sorted(found.values(), key=lambda r: r.decision_id), max(ids, default=0)

    def read_params(self, run_id: str, version: int) -> ParamsVersion | None:
        raw = self.tracker.read_json(run_id, params_path(version))
        return None if raw is None else ParamsVersion.model_validate(raw)

    def trusted(
        self, run_id: str, tags: dict[str, str], spec: RunSpec | None
    ) -> ParamsVersion | None:
        """The run's newest trusted params version (None: the spec's values are in force).

        Only a version that verifies, continues the chain and was not refused by the client
        counts: a forged one must never be the base a later change is measured against.
        """
        head, skipped = trusted_head(
            self.tracker,
            run_id,
            current_version(tags),
            spec,
            self.signing_key,
            refused_versions(tags),
        )
        for why in skipped:
            log.warning("run %s: params %s; not built on", run_id, why)
        return head

    def commit(
        self,
        record: AuditRecord,
        *,
        expected_version: int,
        parent: int,
        values: dict[str, float],
        commands: list[Command],
        issue: bool,
        guard: Callable[[], None] | None = None,
    ) -> tuple[AuditRecord, ParamsVersion | None]:
        """Write a decision: params version (when ``issue``), then audit record, then the tag.

        The new version is numbered above the tag (``expected_version``) and continues from
        ``parent``, the run's trusted version (``trusted``): versions between them are skipped.
        Returns the record as written and the version issued, if any.
        Raises VersionConflict when the run's version tag moved past ``expected_version``.
        ``guard``, called before the first write, raises when this writer may not write
        (a daemon replica that lost the run's lease); nothing is written then.
        """
        run_id = record.run_id
        latest = current_version(self.tracker.get_run(run_id).tags)
        if latest != expected_version:
            raise VersionConflict(
                f"params version moved from {expected_version} to {latest} during the decision"
            )
        if guard is not None:
            guard()
        params = None
        if issue:
            params = ParamsVersion(
                version=latest + 1,
                parent_version=parent,
                issued_at=time.time(),
                source=record.source,
                decision_id=record.decision_id,
                step=record.step,
                values=values,
                commands=commands,
                reason=record.proposal.reason if record.proposal else "",
            ).signed(self.signing_key)
            self.tracker.write_json(
                run_id, params_path(params.version), params.model_dump(mode="json")
            )
            crash_point("after_params")
            record = record.model_copy(update={"params_version": params.version, "values": values})
        self.write_record(record)
        crash_point("after_audit")
        if params is not None:
            crash_point("before_tag")
            self.tracker.set_tags(
                run_id,
                {
                    TAG_PARAMS_VERSION: str(params.version),
                    TAG_LAST_INTERVENTION: record.summary()[:500],
                },
            )
            crash_point("after_tag")
        return record, params

    def write_record(self, record: AuditRecord) -> None:
        """Write (or rewrite, to add its measured outcome) one audit record."""
        payload = record.model_dump(mode="json")
        self.tracker.write_json(record.run_id, audit_path(record.decision_id), payload)

    def recover(self, run_id: str, tags: dict[str, str], spec: RunSpec | None = None) -> int | None:
        """Complete a decision whose params file was written but whose tag was not.

        Only a file that verifies and continues the chain is completed: a file an attacker
        left above the tag stays unissued, and the next version written replaces it.
        Returns the version it completed, or None when there was nothing to do.
        """
        latest = current_version(tags)
        try:
            orphan = load(self.tracker, run_id, latest + 1, spec, self.signing_key)
        except ParamsMissing:
            return None
        except ParamsRejected as exc:
            log.warning("run %s: not completing params v%d: %s", run_id, latest + 1, exc)
            return None
        refused = refused_versions(tags)
        if chain_problem(self.tracker, run_id, orphan, spec, self.signing_key, refused):
            return None
        if self.tracker.read_json(run_id, audit_path(orphan.decision_id)) is None:
            record = AuditRecord(
                decision_id=orphan.decision_id,
                run_id=run_id,
                created_at=time.time(),
                source=orphan.source,
                policy="recovered",
                status="issued",
                step=orphan.step,
                params_version=orphan.version,
                values=orphan.values,
                error="the writer stopped after the params file; recovered on restart",
            )
            self.write_record(record)
        self.tracker.set_tags(run_id, {TAG_PARAMS_VERSION: str(orphan.version)})
        log.warning(
            "run %s: completed interrupted decision d%06d (v%d)",
            run_id,
            orphan.decision_id,
            orphan.version,
        )
        return orphan.version
