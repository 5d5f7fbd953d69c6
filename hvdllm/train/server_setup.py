"""What a parameter server needs from the training layer (its initial model, the run's lr
schedule, its checkpoint shard), built here and passed in, so that hvdllm.parallel imports
nothing of train: the same initial weights, phase plan and checkpoint files as the Trainer's."""

from __future__ import annotations

from hvdllm.comm.mpi import abort_job
from hvdllm.config import Config, config_to_toml
from hvdllm.data.shards import read_manifest, read_tokenizer_json
from hvdllm.errors import UserError
from hvdllm.model import gpt_config_from
from hvdllm.parallel.grid import Grid
from hvdllm.parallel.param_server import servers_problem
from hvdllm.parallel.ps_protocol import SERVER_SHARD
from hvdllm.parallel.ps_shard import ServerSetup
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.phases import plan_phases
from hvdllm.train.status import RunStatus
from hvdllm.train.warm_start import initial_model


def server_setup(cfg: Config, layout: Grid, index: int) -> ServerSetup:
    """Server ``index``'s setup: as the Trainer does, the seeded (or warm-started) model, the
    one phase's lr and schedule; on resume its shard of the checkpoint (then no warm start:
    the checkpoint's weights win, and the source may be gone)."""
    manifest = read_manifest(cfg.data.path)
    gpt_cfg = gpt_config_from(cfg.model, vocab_size=manifest["vocab_size"])
    phase = plan_phases(cfg, layout.data, manifest["seq_len"], gpt_cfg.block_size)[0]
    tokenizer_json = read_tokenizer_json(cfg.data.path, manifest)
    path, state = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.train.run_dir)
    problem = "" if state is None else servers_problem(state.get("layout", {}), layout.servers)
    if problem:
        raise UserError(f"{path}: {problem}")
    model = initial_model(cfg, gpt_cfg, tokenizer_json, warm_start=path is None)
    shard = SERVER_SHARD + index
    resumed = None if path is None else ckpt.load_checkpoint(ckpt.shard_path(path, shard))
    described = {"config_toml": config_to_toml(cfg), "model_config": vars(gpt_cfg)}

    def save(step: int, state: dict) -> None:
        ckpt.save_checkpoint({**state, **described}, cfg.train.run_dir, step, cfg.checkpoint.keep_last, False, shard)

    def end_job(line: str) -> None:
        # The exit status of a job aborted under mpirun --enable-recovery says 0: the run
        # folder's status says the truth.
        RunStatus(cfg.train.run_dir).failed(line)
        abort_job(1)

    return ServerSetup(model, phase.lr, phase.steps, phase.schedule, phase.batch_size, resumed, save, end_job)
