"""``hvdllm train``: check the layout, let the strategy start communication (Horovod when
there are ranks to talk to), pick the device, then hand over to the Trainer."""

from __future__ import annotations

import os
import signal
import sys

from hvdllm import comm
from hvdllm.comm.launch import launched_rank, launched_world_size
from hvdllm.config import Config
from hvdllm.errors import error_line
from hvdllm.parallel import build_strategy, resolve_batching
from hvdllm.paths import require_writable_folder
from hvdllm.train.elastic import check_elastic, run_elastic
from hvdllm.train.server_setup import server_setup
from hvdllm.train.status import RUNNING, RunStatus
from hvdllm.train.trainer import Trainer


def run_training(cfg: Config) -> int:
    """Train (or serve), with the run folder's status.json saying how it went: running from
    the start (a previous job's marker must not speak for this one), then what the rank that
    knows writes; here, an error that ends this rank."""
    status = RunStatus(cfg.train.run_dir)
    if launched_rank() == 0:
        status.write(RUNNING)
    try:
        return _run_training(cfg)
    except Exception as err:
        status.failed(error_line(err))
        raise


def _run_training(cfg: Config) -> int:
    ranks = launched_world_size()
    # A bad layout fails here, on every rank, before any init.
    cfg = resolve_batching(cfg, ranks)
    strategy = build_strategy(cfg, ranks, server_setup=server_setup)
    if cfg.parallel.elastic:
        check_elastic(cfg, strategy.layout)
    require_writable_folder(cfg.train.run_dir, "train.run_dir")  # so does a run folder it cannot write
    if ranks == 1 and cfg.parallel.timeline:
        print("note: one process, so Horovod is not started and parallel.timeline is not written",
              file=sys.stderr, flush=True)
    strategy.setup(cfg.train.threads)
    status = strategy.run(lambda: train_here(cfg, strategy))  # a parameter server serves instead
    if strategy.peers_died:
        # MPI_Finalize waits for every rank the launcher started, a dead one too: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def train_here(cfg: Config, strategy) -> int:
    device = comm.choose_device(strategy.layout.devices[0] if strategy.layout.devices else cfg.train.device,
                                strategy.local_rank)
    trainer = Trainer(cfg, strategy, device)
    # SLURM preemption sends SIGTERM: finish the step, checkpoint, exit 0. SIGUSR1 does the
    # same: it is what Open MPI's mpirun forwards to every rank (a SIGTERM to mpirun itself
    # ends the job with exit status 1 whatever the ranks return).
    signal.signal(signal.SIGTERM, trainer.request_stop)
    signal.signal(signal.SIGUSR1, trainer.request_stop)
    status = run_elastic(trainer) if cfg.parallel.elastic else trainer.train()
    strategy.close()  # e.g. tell the parameter servers this worker is done
    return status
