"""Horovod elastic training (``parallel.elastic``): workers come and go, training goes on.

Launched by ``horovodrun --gloo --min-np A --max-np B --host-discovery-script S``; ranks commit
every ``parallel.elastic_commit_every`` steps and a new world is rebuilt from the last commit
(:class:`~hvdllm.train.elastic_state.TrainerState`). docs/design/training-loop.md says how.
"""

from __future__ import annotations

import os

from hvdllm import comm
from hvdllm.errors import UserError


def check_elastic(cfg, layout, environ: dict[str, str] | None = None) -> None:
    """Refuse, with one line, what elastic training does not do: before any init."""
    env = os.environ if environ is None else environ
    if env.get("HOROVOD_ELASTIC") != "1":
        raise UserError("parallel.elastic needs horovodrun's elastic mode: horovodrun --gloo --min-np N --max-np M "
                        "--host-discovery-script SCRIPT")
    if cfg.parallel.strategy != "sync" or cfg.parallel.op != "average" or layout.pipeline > 1 or layout.servers:
        raise UserError("parallel.elastic works with parallel.strategy=sync (op average), one pipeline stage "
                        "and no servers")
    if cfg.parallel.data:
        raise UserError(f"parallel.elastic: the data-parallel degree follows the workers there are; "
                        f"leave parallel.data at 0 (it is {cfg.parallel.data})")
    if not cfg.data.global_batch_size or cfg.phases:
        raise UserError("parallel.elastic needs data.global_batch_size (the batch stays the same as workers come "
                        "and go; it must divide by every worker count) and no [[phases]]")


def run_elastic(trainer) -> int:
    """The Trainer's steps under ``hvd.elastic.run``: committing every
    ``parallel.elastic_commit_every`` steps, rebuilt for each new world."""
    hvd = comm.horovod()
    if trainer.step >= trainer.total_steps:
        return trainer.train()  # a finished run resumed: nothing to commit
    trainer.phases.advance_to(trainer.step)  # a commit holds a data position
    from hvdllm.train.elastic_state import TrainerState  # imports Horovod: only here

    state = TrainerState(trainer)
    every = trainer.cfg.parallel.elastic_commit_every
    trainer.step_callbacks.append(lambda: state.commit() if trainer.step % every == 0 else None)

    @hvd.elastic.run
    def steps(_state) -> int:
        state.load_if_pending()
        return trainer.run_steps()

    return trainer.train(loop=lambda: steps(state))
