"""Horovod elastic for any job: a state whose commits keep a snapshot in memory, and the loop
that re-forms the world when hosts come and go or a worker dies. Imports Horovod's elastic
modules, so it is imported only by a job that runs elastic."""

from __future__ import annotations

import copy
from typing import Callable

from horovod.common.elastic import State
from horovod.common.exceptions import HostsUpdatedInterrupt

from hvdllm.comm.runtime import horovod


class CommittedState(State):
    """Each commit keeps ``snapshot()`` in memory; after the world re-forms, rank 0's last
    commit reaches every rank (newcomers too) through :meth:`take_pending`. ``on_pause`` runs
    when Horovod starts waiting for the world (a failed collective, hosts updated)."""

    def __init__(self, snapshot: Callable[[], dict], on_pause: Callable[[], None]) -> None:
        hvd = horovod()
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self._snapshot, self._on_pause = snapshot, on_pause
        self.committed: dict = {}
        self.pending = True
        self.save()

    def save(self) -> None:
        self.committed = copy.deepcopy(self._snapshot())

    def restore(self) -> None:
        """After a failed collective: the committed state is taken once the world is re-formed."""
        self._on_pause()

    def commit(self) -> None:
        try:
            super().commit()
        except HostsUpdatedInterrupt:
            self._on_pause()  # Horovod now waits for the hosts to re-form
            raise

    def reset(self) -> None:
        self.pending = True

    def sync(self) -> None:
        self.committed = self._bcast_object(self.committed)
        self.pending = True

    def take_pending(self) -> dict | None:
        """The committed state to rebuild from, once per new world (None otherwise)."""
        if not self.pending:
            return None
        self.pending = False
        return copy.deepcopy(self.committed)


def run_elastic_loop(state: CommittedState, steps: Callable[[], int]) -> int:
    """``steps()`` under ``hvd.elastic.run``: re-run from the last commit in each new world."""

    @horovod().elastic.run
    def run(_state) -> int:
        return steps()

    return run(state)
