"""``hvdllm train``: set up the process (Horovod when there are ranks to talk to) and the
device, then hand over to the Trainer."""

from __future__ import annotations

import signal
import sys

from hvdllm import comm
from hvdllm.comm.launch import launched_world_size
from hvdllm.config import Config
from hvdllm.parallel import apply_horovod_environment, build_strategy
from hvdllm.train.trainer import Trainer


def run_training(cfg: Config) -> int:
    ranks = launched_world_size()
    if ranks > 1:
        apply_horovod_environment(cfg.parallel)  # hvd.init() reads these once
        comm.init(threads=cfg.train.threads)
    else:
        comm.set_threads(cfg.train.threads, ranks_on_node=1)
        if cfg.parallel.timeline:
            print("note: one process, so Horovod is not started and parallel.timeline is not written",
                  file=sys.stderr, flush=True)
    strategy = build_strategy(cfg.parallel, ranks)
    device = comm.choose_device(cfg.train.device)
    trainer = Trainer(cfg, strategy, device)
    # SLURM preemption sends SIGTERM: finish the step, checkpoint, exit 0.
    signal.signal(signal.SIGTERM, trainer.request_stop)
    return trainer.train()
