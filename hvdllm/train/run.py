"""``hvdllm train``: set up Horovod and the device, then hand over to the Trainer."""

from __future__ import annotations

import signal

from hvdllm import comm
from hvdllm.config import Config
from hvdllm.parallel import apply_horovod_environment, build_strategy
from hvdllm.train.trainer import Trainer


def run_training(cfg: Config) -> int:
    apply_horovod_environment(cfg.parallel)  # hvd.init() reads these once
    comm.init(threads=cfg.train.threads)
    strategy = build_strategy(cfg.parallel)
    device = comm.choose_device(cfg.train.device)
    trainer = Trainer(cfg, strategy, device)
    # SLURM preemption sends SIGTERM: finish the step, checkpoint, exit 0.
    signal.signal(signal.SIGTERM, trainer.request_stop)
    return trainer.train()
