"""Asynchronous updates on 2 ranks. Local SGD / DiLoCo: with H = 1, outer SGD at lr 1 and no
momentum it is `sync`; with H > 1 the replicas drift apart between averagings and agree
right after one; a Trainer run with AdamW trains and communicates 1/H of sync's bytes."""

import json
import math

import torch
from helpers.agreement import parameters_equal_on_every_rank
from helpers.corpus import NANO, read_metrics

from hvdllm.config import load_config
from hvdllm.parallel import Precision, build_strategy
from hvdllm.parallel.local_sgd import STATS_BYTES
from hvdllm.train.trainer import Trainer

FP32 = Precision("fp32", torch.device("cpu"))


def strategy_for(*overrides):
    strategy = build_strategy(load_config(NANO, list(overrides)), world_size=2)
    strategy.setup(threads=1)
    return strategy


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def train_tiny(strategy, rank: int, steps: int, lr: float = 0.1, after_step=None) -> torch.nn.Module:
    """``steps`` plain-SGD steps on this rank's own data through ``strategy``'s seams."""
    model = tiny_model()
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    strategy.broadcast_state(model, optimizer)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data slice
    for step in range(steps):
        x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)
        torch.nn.functional.mse_loss(model(x), y).backward()
        strategy.finish_gradients(optimizer, torch.zeros(3, dtype=torch.float64))
        strategy.update(optimizer, model, FP32, max_norm=0.0, nonfinite=False)
        optimizer.zero_grad()
        if after_step is not None:
            after_step(step + 1, model)
    return model


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_local_sgd_with_one_local_step_and_plain_outer_sgd_is_sync(horovod):
    local = train_tiny(strategy_for("--parallel.strategy=local-sgd", "--parallel.local_steps=1",
                                    "--parallel.outer_lr=1", "--parallel.outer_momentum=0"), horovod.rank(), 5)
    synced = train_tiny(strategy_for(), horovod.rank(), 5)
    assert not torch.equal(flat(local), flat(tiny_model()))  # it trained
    torch.testing.assert_close(flat(local), flat(synced), rtol=0, atol=1e-6)


def test_local_steps_are_taken_without_communication_then_averaged(horovod):
    strategy = strategy_for("--parallel.strategy=local-sgd", "--parallel.local_steps=3",
                            "--parallel.outer_lr=1", "--parallel.outer_momentum=0")
    agree = {}

    def record(step, model):
        values = horovod.allgather_object(flat(model).tolist(), name=f"params.{step}")
        agree[step] = values[0] == values[1]

    train_tiny(strategy, horovod.rank(), 6, after_step=record)
    assert agree == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True}
    assert strategy.update_rule.rounds == 2


def test_outer_nesterov_momentum_acts_on_the_averaged_delta(horovod):
    """Two rounds of H = 2: the outer step is Nesterov SGD on (anchor - mean replica)."""
    strategy = strategy_for("--parallel.strategy=local-sgd", "--parallel.local_steps=2",
                            "--parallel.outer_lr=0.5", "--parallel.outer_momentum=0.9")
    before, after = [], {}
    rule = strategy.update_rule
    average = rule.average

    def recording_average():
        before.append(torch.cat([p.detach().flatten() for p in rule.params]).clone())
        average()

    rule.average = recording_average
    train_tiny(strategy, horovod.rank(), 4, after_step=lambda step, model: after.setdefault(step, flat(model)))
    anchor, buffer = flat(tiny_model()), None
    for index, round_end in enumerate((2, 4)):
        mean_delta = horovod.allreduce(anchor - before[index], op=horovod.Average, name=f"mean.{round_end}")
        buffer = mean_delta if buffer is None else 0.9 * buffer + mean_delta
        anchor = anchor - 0.5 * (mean_delta + 0.9 * buffer)
        torch.testing.assert_close(after[round_end], anchor, rtol=0, atol=1e-6)


def test_local_sgd_trainer_trains_with_adamw_on_a_quarter_of_the_bytes(data, shared_dir, horovod):
    cfg = load_config(NANO, [f"--data.path={data}", f"--train.run_dir={shared_dir / 'local'}", "--train.steps=16",
                             "--train.eval_every=8", "--parallel.strategy=local-sgd", "--parallel.local_steps=4",
                             "--checkpoint.every=0"])
    strategy = build_strategy(cfg, world_size=2)
    strategy.setup(threads=1)
    trainer = Trainer(cfg, strategy, torch.device("cpu"))
    assert trainer.train() == 0
    assert parameters_equal_on_every_rank(horovod, trainer.model)  # step 16 ended a round
    if horovod.rank() == 0:
        records = read_metrics(shared_dir / "local")
        losses = [r["loss"] for r in records]
        assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])
        param_bytes = sum(p.numel() * 4 for p in trainer.model.parameters())
        last = records[-1]
        assert last["local_sgd_rounds"] == 4
        assert last["comm_bytes"] == 4 * param_bytes + 16 * STATS_BYTES  # sync: 16 x param_bytes


def test_a_server_drops_and_counts_non_finite_pushes_and_applies_the_rest(data, shared_dir, horovod):
    """Rank 1 serves one shard; rank 0 speaks the protocol by hand: a pull, then pushes of a
    finite gradient, a NaN gradient, a finite gradient flagged with a non-finite loss, and a
    finite one. Only the two clean pushes move the weights."""
    import numpy as np
    from mpi4py import MPI

    from hvdllm.comm.messages import Messages
    from hvdllm.parallel.grid import Grid
    from hvdllm.parallel.ps_protocol import (PUSH_HEADER, STEP_HEADER, Kind, body_view, encode, header_view,
                                             reply_header)
    from hvdllm.parallel.server_loop import ParameterServer
    from hvdllm.train.server_setup import server_setup

    cfg = load_config(NANO, [f"--data.path={data}", f"--train.run_dir={shared_dir / 'served'}",
                             "--parallel.strategy=async", "--parallel.servers=1", "--parallel.max_staleness=1"])
    layout = Grid(data=1, servers=1)
    p2p = MPI.COMM_WORLD.Dup()
    own = MPI.COMM_WORLD.Split(color=horovod.rank(), key=0)
    if horovod.rank() == 1:
        server = ParameterServer(cfg, server_setup(cfg, layout, 0), index=0, workers=1, servers=1,
                                 p2p=Messages(p2p), servers_comm=Messages(own))
        assert server.serve() == 0
    else:
        n = sum(p.numel() for p in tiny_gpt_params(cfg))
        dtype = reply_header(1)
        reply = torch.empty(dtype.itemsize + 4 * n, dtype=torch.uint8)
        weights = []

        def exchange(clock, stats, gradient):
            header = np.zeros(1, dtype=PUSH_HEADER)[0]
            header["clock"] = clock
            header["loss"], header["nonfinite"], header["stop"], header["samples"], header["seconds"] = stats
            kind = Kind.PULL if gradient is None else Kind.PUSH
            receive = p2p.Irecv([reply.numpy(), MPI.BYTE], source=1, tag=Kind.PARAMS)
            p2p.Send([encode(header, gradient), MPI.BYTE], dest=1, tag=kind)
            receive.Wait()
            weights.append(body_view(reply, dtype).clone())
            return header_view(reply[:dtype.itemsize].clone(), dtype)

        exchange(0, [0.0] * 5, None)
        ones = torch.ones(n)
        timing = [4.0, 0.01]  # samples, seconds
        exchange(0, [1.0, 0.0, 0.0, *timing], ones)
        exchange(1, [1.0, 0.0, 0.0, *timing], torch.full((n,), float("nan")))
        exchange(2, [math.nan, 1.0, 0.0, *timing], ones)
        header = exchange(3, [1.0, 0.0, 0.0, *timing], ones)
        done = np.zeros(1, dtype=STEP_HEADER)[0]
        done["step"] = 4
        p2p.Send([encode(done), MPI.BYTE], dest=1, tag=Kind.DONE)
        assert (header["updates"], header["applied"], header["dropped"]) == (2, 2, 2)
        assert header["version"] == 4 and list(header["hist"]) == [2, 0]
        assert all(torch.isfinite(w).all() for w in weights)
        assert not torch.equal(weights[0], weights[1])  # a clean push moved them
        assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])  # two dropped ones did not
        assert not torch.equal(weights[3], weights[4])
    horovod.barrier()
    summary = json.loads((shared_dir / "served" / "servers" / "server-0.json").read_text())
    assert summary["updates"] == summary["applied_pushes"] == 2 and summary["dropped_pushes"] == 2


def tiny_gpt_params(cfg):
    from hvdllm.data.shards import read_manifest
    from hvdllm.model import GPT, gpt_config_from

    gpt = GPT(gpt_config_from(cfg.model, vocab_size=read_manifest(cfg.data.path)["vocab_size"]))
    return [p for p in gpt.parameters() if p.requires_grad]


def test_local_sgd_resumes_exactly_mid_round_from_each_rank_s_own_shard(data, shared_dir, horovod):
    def trainer(name, *extra):
        cfg = load_config(NANO, [f"--data.path={data}", f"--train.run_dir={shared_dir / name}", "--train.steps=8",
                                 "--train.eval_every=0", "--parallel.strategy=local-sgd", "--parallel.local_steps=3",
                                 "--checkpoint.every=4", *extra])
        strategy = build_strategy(cfg, world_size=2)
        strategy.setup(threads=1)
        return Trainer(cfg, strategy, torch.device("cpu"))

    straight = trainer("ls-straight")
    assert straight.train() == 0
    final = flat(straight.model)
    if horovod.rank() == 0:  # step 4 is mid-round (H = 3): the replicas differ there
        (shared_dir / "ls-resumed" / "checkpoints").mkdir(parents=True)
        for path in (shared_dir / "ls-straight" / "checkpoints").glob("step-00000004*"):
            (shared_dir / "ls-resumed" / "checkpoints" / path.name).write_bytes(path.read_bytes())
    horovod.barrier()
    resumed = trainer("ls-resumed", "--checkpoint.resume=auto")
    assert resumed.train() == 0
    assert torch.equal(flat(resumed.model), final)  # on each rank
    if horovod.rank() == 0:
        assert (shared_dir / "ls-straight" / "checkpoints" / "step-00000004.stage-1.pt").is_file()
        expected = {r["step"]: r["loss"] for r in read_metrics(shared_dir / "ls-straight")}
        assert [(r["step"], r["loss"]) for r in read_metrics(shared_dir / "ls-resumed")] == \
            [(s, expected[s]) for s in range(5, 9)]
