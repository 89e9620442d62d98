"""Multi-rank training (torchrun, DDP): every rank applies the same version at the same step.

Only rank 0 talks to the tracker: it publishes the spec, polls, and acknowledges. The other
ranks follow it. Every rank calls its integration at the same boundaries with the same step
numbers (the ranks of a data-parallel job step together), so the exchange is a collective at
agreed points only:

- at a step boundary whose step is a multiple of ``every`` (``ATM_RANK_SYNC_EVERY``, 10 by
  default), or at every evaluation boundary when updates apply at evaluations, rank 0 takes
  its staged version (if any) and broadcasts it; every rank, rank 0 included, applies what it
  received right there, at that step;
- otherwise nothing happens: no rank applies anything between exchange points.

A quiet exchange is one broadcast of one integer; a version adds one broadcast of its JSON.
The exchange runs on a process group of its own (gloo, on the CPU, whatever the training's
backend), whose timeout (``ATM_RANK_TIMEOUT``) bounds how long a rank can wait for the others
there: a rank that died breaks the exchange at once (its connections close), a rank that hangs
breaks it after the timeout. A broken exchange turns the manager off on that rank; training
carries on (or fails in its own collectives, which are the training's, not ours).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from integrations.protocol import Boundary, ParamsVersion

log = logging.getLogger(__name__)


class RanksUnreachable(RuntimeError):
    """The exchange between ranks failed: a rank died, hung, or left."""


def distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) in an initialised ``torch.distributed`` world of two ranks or more;
    None for a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


@dataclass
class RankSync:
    """The exchange of rank 0's staged version at agreed step boundaries."""

    rank: int
    world_size: int
    apply_at: Boundary
    every: int = 10
    timeout_s: float = 300.0
    _group: Any = field(default=None, repr=False)

    @property
    def leads(self) -> bool:
        """Whether this rank decides (rank 0) rather than follows."""
        return self.rank == 0

    def due(self, boundary: Boundary, step: int) -> bool:
        """Whether ``boundary`` at ``step`` is an exchange point (the same on every rank)."""
        if boundary is not self.apply_at:
            return False
        return boundary is not Boundary.STEP or step % self.every == 0

    def exchange(self, staged: ParamsVersion | None) -> ParamsVersion | None:
        """Rank 0 passes the version it took (or None); every rank gets it back.

        Raises ``RanksUnreachable`` when a rank does not take part within the timeout.
        """
        try:
            group = self._process_group()
            payload = b""
            if self.leads and staged is not None:
                payload = staged.model_dump_json().encode()
            size = torch.tensor([len(payload)], dtype=torch.int64)
            dist.broadcast(size, src=0, group=group)
            if size.item() == 0:
                return None
            data = torch.empty(int(size.item()), dtype=torch.uint8)
            if self.leads:
                data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            dist.broadcast(data, src=0, group=group)
        except Exception as exc:
            raise RanksUnreachable(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc
        return staged if self.leads else ParamsVersion.model_validate_json(data.numpy().tobytes())

    def _process_group(self) -> Any:
        # Created at the first exchange point, which every rank reaches at the same step.
        if self._group is None:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        return self._group
