"""Horovod elastic's State over a Trainer (hvdllm/train/elastic.py says how elastic runs go).
A module of its own because it imports Horovod, which elastic.py's checks must not."""

from __future__ import annotations

import copy

from horovod.common.elastic import State
from horovod.common.exceptions import HostsUpdatedInterrupt

from hvdllm import comm


class TrainerState(State):
    """Commits keep in memory what a checkpoint holds; a new world is rebuilt from the last one."""

    def __init__(self, trainer) -> None:
        hvd = comm.horovod()
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.trainer = trainer
        self.committed: dict = {}
        self.pending = True
        self.save()

    def save(self) -> None:
        # No RNG states: gathering them is a collective, and a new world's ranks would not match them.
        self.committed = copy.deepcopy(self.trainer.checkpointer.state(self.trainer.step))

    def restore(self) -> None:
        """After a failed collective: the committed state is loaded once the world is re-formed."""
        self.pause_watchdog()

    def pause_watchdog(self) -> None:
        if self.trainer.watchdog is not None:
            self.trainer.watchdog.pause()

    def commit(self) -> None:
        try:
            super().commit()
        except HostsUpdatedInterrupt:
            self.pause_watchdog()  # Horovod now waits for the hosts to re-form
            raise

    def reset(self) -> None:
        self.pending = True

    def sync(self) -> None:
        self.committed = self._bcast_object(self.committed)
        self.pending = True

    def load_if_pending(self) -> None:
        """Where every rank of the new world is, newcomers included (the start of the wrapped
        function), so collectives are safe: rebuild the run for this world from the committed
        state and start the log there."""
        if not self.pending:
            return
        self.pending = False
        trainer = self.trainer
        before = trainer.dp_size
        trainer.strategy.adopt_world(comm.rank(), comm.size())
        trainer.adopt_world()
        trainer.resume(copy.deepcopy(self.committed))
        trainer.optimizer.zero_grad()  # a failed step's local or half-reduced gradients
        trainer.start_log(resumed=True)
        if trainer.watchdog is not None:
            trainer.watchdog.beat(trainer.step)
        if trainer.dp_size != before:
            trainer.say(f"elastic: {trainer.dp_size} workers from step {trainer.step} (were {before}); "
                        f"{trainer.phases.current.batch_size} samples per rank, lr {trainer.phases.current.lr:.3g}")
