"""Horovod elastic training (``parallel.elastic``): workers come and go, training goes on.

Launched by ``horovodrun --gloo --min-np A --max-np B --host-discovery-script S``; ranks commit
every ``parallel.elastic_commit_every`` steps and a new world is rebuilt from the last commit
(:class:`~hvdllm.comm.elastic.CommittedState`). docs/design/training-loop.md says how.
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
    if (cfg.parallel.strategy != "sync" or cfg.parallel.op != "average" or layout.pipeline > 1 or layout.tensor > 1
            or layout.servers):
        raise UserError("parallel.elastic works with parallel.strategy=sync (op average), one pipeline stage, "
                        "no tensor parallelism and no servers")
    if cfg.parallel.data:
        raise UserError(f"parallel.elastic: the data-parallel degree follows the workers there are; "
                        f"leave parallel.data at 0 (it is {cfg.parallel.data})")
    if not cfg.data.global_batch_size or cfg.phases:
        raise UserError("parallel.elastic needs data.global_batch_size (the batch stays the same as workers come "
                        "and go; it must divide by every worker count) and no [[phases]]")


def run_elastic(trainer) -> int:
    """The Trainer's steps under Horovod elastic: committing every
    ``parallel.elastic_commit_every`` steps, rebuilt for each new world."""
    if trainer.step >= trainer.total_steps:
        return trainer.train()  # a finished run resumed: nothing to commit
    trainer.phases.advance_to(trainer.step)  # a commit holds a data position
    from hvdllm.comm.elastic import CommittedState, run_elastic_loop  # imports Horovod: only here

    def pause_watchdog() -> None:
        if trainer.watchdog is not None:
            trainer.watchdog.pause()

    # No RNG states in a commit: gathering them is a collective, and a new world's ranks would not match them.
    state = CommittedState(snapshot=lambda: trainer.checkpointer.state(trainer.step), on_pause=pause_watchdog)
    every = trainer.cfg.parallel.elastic_commit_every
    trainer.step_callbacks.append(lambda: state.commit() if trainer.step % every == 0 else None)

    def steps() -> int:
        committed = state.take_pending()
        if committed is not None:
            rebuild_for_new_world(trainer, committed)
        return trainer.run_steps()

    return trainer.train(loop=lambda: run_elastic_loop(state, steps))


def rebuild_for_new_world(trainer, committed: dict) -> None:
    """Where every rank of the new world is, newcomers included (the start of the elastic
    loop), so collectives are safe: the grid and this rank's place in it, the run rebuilt from
    the committed state, and the log started there."""
    before = trainer.dp_size
    trainer.strategy.adopt_world(comm.rank(), comm.size())
    trainer.adopt_world()
    trainer.resume(committed)
    trainer.optimizer.zero_grad()  # a failed step's local or half-reduced gradients
    trainer.start_log(resumed=True)
    if trainer.watchdog is not None:
        trainer.watchdog.beat(trainer.step)
    if trainer.dp_size != before:
        trainer.say(f"elastic: {trainer.dp_size} workers from step {trainer.step} (were {before}); "
                    f"{trainer.phases.current.batch_size} samples per rank, lr {trainer.phases.current.lr:.3g}")
