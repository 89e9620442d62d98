"""What a run's tags, params files, audit trail and marker metric say happened, checked
against the write-order promise: no decision lost, none issued twice, none applied twice."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    PARAMS_DIR,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_PARAMS_VERSION,
    AuditRecord,
    ParamsVersion,
    Source,
    params_path,
)
from integrations.trackers import Tracker
from manager_daemon.audit import AuditLog


@dataclass
class Ledger:
    versions: list[ParamsVersion]
    records: list[AuditRecord]
    tag: int
    applied: list[int]  # versions in the marker metric, in step order

    @classmethod
    def read(cls, tracker: Tracker, run_id: str) -> Ledger:
        paths = tracker.list_artifacts(run_id, PARAMS_DIR)
        versions = [ParamsVersion.model_validate(tracker.read_json(run_id, p)) for p in paths]
        versions.sort(key=lambda v: v.version)
        records = AuditLog(tracker).records(run_id)
        tag = int(tracker.get_run(run_id).tags.get(TAG_PARAMS_VERSION, "0"))
        markers, _ = tracker.read_new_points(run_id, [METRIC_PARAMS_VERSION], None)
        applied = [int(p.value) for p in sorted(markers, key=lambda p: p.step)]
        return cls(versions, records, tag, applied)

    def problems(self, tracker: Tracker, run_id: str) -> list[str]:
        """Every broken promise, in words; empty when the run's history is consistent."""
        out: list[str] = []
        numbers = [v.version for v in self.versions]
        if numbers != list(range(1, len(numbers) + 1)):
            out.append(f"params versions not contiguous from 1: {numbers}")
        if self.tag != len(numbers):
            out.append(f"the version tag says {self.tag}, {len(numbers)} params files exist")
        if self.tag and tracker.read_json(run_id, params_path(self.tag)) is None:
            out.append(f"the version tag points at a missing file v{self.tag}")
        for v in self.versions:
            if v.parent_version != v.version - 1:
                out.append(f"v{v.version} has parent {v.parent_version}")
        by_decision = Counter(v.decision_id for v in self.versions)
        out += [f"decision d{d} issued {n} versions" for d, n in by_decision.items() if n > 1]
        automatic = Counter(v.step for v in self.versions if v.source is not Source.HUMAN)
        out += [f"step {s} got {n} versions" for s, n in automatic.items() if n > 1]
        records = {r.decision_id: r for r in self.records}
        if len(records) != len(self.records):
            out.append("two audit records share a decision id")
        for v in self.versions:
            record = records.get(v.decision_id)
            if record is None:
                out.append(f"v{v.version} (d{v.decision_id}) has no audit record")
            elif record.params_version != v.version or record.status != "issued":
                out.append(
                    f"d{v.decision_id}: audit says {record.status} v{record.params_version}, "
                    f"file says v{v.version}"
                )
        issued = [r.params_version for r in self.records if r.params_version]
        if sorted(issued) != numbers:
            out.append(f"audit records name versions {sorted(issued)}, files are {numbers}")
        twice = [v for v, n in Counter(self.applied).items() if n > 1]
        if twice:
            out.append(f"versions applied more than once: {twice}")
        if self.applied != sorted(self.applied):
            out.append(f"versions applied out of order: {self.applied}")
        if any(v > self.tag for v in self.applied):
            out.append(f"applied {self.applied}, but only {self.tag} issued")
        acked = int(tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION, "0"))
        if self.applied and acked != self.applied[-1]:
            out.append(f"ack tag v{acked}, last marker v{self.applied[-1]}")
        return out
