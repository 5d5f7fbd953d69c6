"""The Trainer in-process on 2 ranks: agreement on NaN steps, stops, phases, checkpoints,
and every optimizer inside hvd.DistributedOptimizer."""

import math
from pathlib import Path

import pytest
import torch
from helpers.agreement import parameters_equal_on_every_rank
from helpers.corpus import NANO, read_metrics

from hvdllm.config import load_config
from hvdllm.parallel import Precision, build_strategy
from hvdllm.train.report import summarize
from hvdllm.train.trainer import Trainer


def trainer_for(cfg):
    strategy = build_strategy(cfg, world_size=2)
    strategy.setup(threads=1)
    return Trainer(cfg, strategy, torch.device("cpu"))


def make_trainer(data, run_dir, *overrides):
    return trainer_for(load_config(NANO, [f"--data.path={data}", f"--train.run_dir={run_dir}", "--data.prefetch=2",
                                          *overrides]))


def inject_nan(trainer, on_rank, steps):
    """Make this rank's loss NaN at the given (1-based) steps."""
    forward = trainer.model.forward

    def patched(*args, **kwargs):
        logits, loss = forward(*args, **kwargs)
        if trainer.rank == on_rank and trainer.step + 1 in steps:
            loss = loss * float("nan")
        return logits, loss

    trainer.model.forward = patched


def params_agree(horovod, model):
    return parameters_equal_on_every_rank(horovod, model)


def test_nan_on_one_rank_is_skipped_by_both(data, shared_dir, horovod, capsys):
    trainer = make_trainer(data, shared_dir / "nan", "--train.steps=6", "--train.eval_every=0")
    inject_nan(trainer, on_rank=1, steps={3, 4})
    before = {}

    step_fn = trainer.train_step

    def recording_step():
        if trainer.step + 1 == 3:
            before["w"] = trainer.model.wte.weight.detach().clone()
        result = step_fn()
        if trainer.step + 1 == 4:
            before["after"] = trainer.model.wte.weight.detach().clone()
        return result

    trainer.train_step = recording_step
    assert trainer.train() == 0
    assert torch.equal(before["w"], before["after"])  # steps 3 and 4 changed nothing
    assert params_agree(horovod, trainer.model)
    if horovod.rank() == 0:
        records = read_metrics(shared_dir / "nan")
        skipped = [r["step"] for r in records if r["skipped"]]
        assert skipped == [3, 4]
        # Logged as what they were: no loss (JSON null), not the finite rank's part of one.
        assert [r["loss"] for r in records if r["skipped"]] == [None, None]
        assert all(math.isfinite(r["loss"]) for r in records if not r["skipped"])
        assert f"train loss   {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}" in summarize(records)
        err = capsys.readouterr().err
        assert "warning: step 3: non-finite loss or gradient, update skipped (1 in a row)" in err


def test_too_many_bad_steps_stop_and_keep_last_good_checkpoint(data, shared_dir, horovod, capsys):
    trainer = make_trainer(data, shared_dir / "bad", "--train.steps=20", "--checkpoint.every=2",
                           "--train.max_bad_steps=3", "--train.eval_every=0")
    inject_nan(trainer, on_rank=0, steps=set(range(5, 21)))
    assert trainer.train() == 1  # on both ranks
    if horovod.rank() == 0:
        saved = sorted(p.name for p in (shared_dir / "bad" / "checkpoints").glob("step-*.pt"))
        assert saved[-1] == "step-00000004.pt"
        assert "non-finite steps in a row" in capsys.readouterr().err  # errors go to stderr


def test_early_stopping_on_val_loss(data, shared_dir, horovod, monkeypatch):
    trainer = make_trainer(data, shared_dir / "early", "--train.steps=50", "--train.eval_every=2",
                           "--train.early_stop_patience=2")
    vals = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr("hvdllm.train.trainer.evaluate",
                        lambda *args: {"val_loss": next(vals), "val_ppl": 0.0, "val_acc": 0.0})
    assert trainer.train() == 0
    assert trainer.step == 8  # evals at 2, 4 (best), 6, 8: two without improvement
    if horovod.rank() == 0:
        best = torch.load(shared_dir / "early" / "checkpoints" / "best.pt", weights_only=True)
        assert best["step"] == 4


def test_multi_phase_and_resume_across_phases(data, shared_dir, horovod):
    phases_file = shared_dir / "phases.toml"
    if horovod.rank() == 0:
        phases_file.write_text(Path(NANO).read_text() + "\n[[phases]]\nsteps = 4\nseq_len = 16\nbatch_size = 2\n"
                               "\n[[phases]]\nsteps = 4\nlr = 1e-3\nschedule = 'constant'\nwarmup_steps = 0\n")
    horovod.barrier()

    def build(run, *extra):
        from hvdllm.config import load_config as load

        cfg = load(phases_file, [f"--data.path={data}", f"--train.run_dir={run}", "--data.prefetch=0",
                                 "--checkpoint.every=3", *extra])
        return trainer_for(cfg)

    trainer = build(shared_dir / "phases")
    shapes = []
    forward = trainer.model.forward
    trainer.model.forward = lambda idx, *a, **k: (shapes.append(tuple(idx.shape)), forward(idx, *a, **k))[1]
    assert trainer.train() == 0
    assert shapes[:4] == [(2, 16)] * 4 and (4, 32) in shapes[4:]
    if horovod.rank() == 0:
        records = read_metrics(shared_dir / "phases")
        assert [r["phase"] for r in records if "loss" in r] == [0] * 4 + [1] * 4
        assert all(math.isclose(r["lr"], 1e-3) for r in records if r["phase"] == 1)
    horovod.barrier()
    # Resume from step 3 (phase 0) and run into phase 1: the same losses as straight through.
    resumed_dir = shared_dir / "phases-resumed"
    if horovod.rank() == 0:
        (resumed_dir / "checkpoints").mkdir(parents=True)
        (resumed_dir / "checkpoints" / "step-00000003.pt").write_bytes(
            (shared_dir / "phases" / "checkpoints" / "step-00000003.pt").read_bytes())
    horovod.barrier()
    again = build(resumed_dir, "--checkpoint.resume=auto")
    assert again.step == 3 and again.train() == 0
    if horovod.rank() == 0:
        straight = {r["step"]: r["loss"] for r in read_metrics(shared_dir / "phases")}
        assert all(straight[r["step"]] == r["loss"] for r in read_metrics(resumed_dir))


@pytest.mark.parametrize("name", ["adamw", "lamb", "adafactor"])
def test_each_optimizer_inside_distributed_optimizer(data, shared_dir, horovod, name):
    trainer = make_trainer(data, shared_dir / f"opt-{name}", "--train.steps=5", f"--optim.name={name}",
                           "--train.eval_every=0", "--checkpoint.every=0")
    first = trainer.model.wte.weight.detach().clone()
    assert trainer.train() == 0
    assert not torch.equal(first, trainer.model.wte.weight)
    assert params_agree(horovod, trainer.model)  # ranks saw different data, same averaged update


def test_checkpoint_pruning_and_best(data, shared_dir, horovod):
    trainer = make_trainer(data, shared_dir / "keep", "--train.steps=10", "--checkpoint.every=2",
                           "--checkpoint.keep_last=2", "--train.eval_every=5")
    assert trainer.train() == 0
    if horovod.rank() == 0:
        folder = shared_dir / "keep" / "checkpoints"
        assert sorted(p.name for p in folder.glob("step-*.pt")) == ["step-00000008.pt", "step-00000010.pt"]
        best = torch.load(folder / "best.pt", weights_only=True)
        vals = {r["step"]: r["val_loss"] for r in read_metrics(shared_dir / "keep") if "val_loss" in r}
        assert best["step"] == min(vals, key=vals.get)
        assert len(best["rng"]["ranks"]) == 2  # every rank's RNG state


@pytest.mark.parametrize("overrides", [
    ["--parallel.op=adasum"],
    ["--parallel.compression=fp16"],
    ["--train.precision=bf16", "--optim.name=lamb", "--parallel.accum_steps=2"],
])
def test_update_variants_keep_ranks_in_step(data, shared_dir, horovod, overrides):
    name = "-".join(o.split("=")[1] for o in overrides)
    trainer = make_trainer(data, shared_dir / f"variant-{name}", "--train.steps=4", "--train.eval_every=0",
                           "--checkpoint.every=0", *overrides)
    first = trainer.model.wte.weight.detach().clone()
    assert trainer.train() == 0
    assert not torch.equal(first, trainer.model.wte.weight)
    assert params_agree(horovod, trainer.model)
    if horovod.rank() == 0:
        assert all(math.isfinite(r["loss"]) for r in read_metrics(shared_dir / f"variant-{name}"))


def test_lr_scales_with_ranks(data, shared_dir, horovod):
    trainer = make_trainer(data, shared_dir / "scaled", "--train.steps=1", "--train.eval_every=0",
                           "--schedule.scale_rule=linear", "--schedule.warmup_steps=0", "--optim.lr=1e-3")
    assert trainer.phases.plan[0].lr == pytest.approx(2e-3)  # 2 ranks, linear rule
    assert trainer.train() == 0
    if horovod.rank() == 0:
        assert read_metrics(shared_dir / "scaled")[0]["lr"] == pytest.approx(2e-3)


def _scaled_step(horovod, scale: float, poison: bool = False):
    """One step of the fp16 pattern with a CPU GradScaler through the strategy: scale,
    backward, exchange, then unscale, clip and step. ``poison`` makes rank 1's loss infinite."""
    strategy = build_strategy(load_config(NANO), world_size=2)
    strategy.setup(threads=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    precision = Precision("fp32", torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    loss = model(torch.full((2, 4), float(horovod.rank() + 1))).square().mean()
    if poison and horovod.rank() == 1:
        loss = loss * math.inf
    precision.backward(loss)
    strategy.finish_gradients(optimizer, torch.zeros(1))
    # The inf reaches both ranks through the allreduce, so no loss flag is needed here.
    strategy.update(optimizer, model, precision, max_norm=0.0, nonfinite=False)
    return model, precision.scaler


def test_loss_scaling_unscales_after_the_allreduce(horovod):
    plain, _ = _scaled_step(horovod, scale=0)
    scaled, scaler = _scaled_step(horovod, scale=2.0 ** 12)
    assert torch.allclose(plain.weight, scaled.weight, rtol=1e-6) and scaler.get_scale() == 2.0 ** 12
    assert params_agree(horovod, scaled)
    torch.manual_seed(0)
    initial = torch.nn.Linear(4, 3).weight
    skipped, scaler = _scaled_step(horovod, scale=2.0 ** 12, poison=True)
    # The inf reached both ranks through the allreduce: both skip the step and halve the scale.
    assert torch.equal(skipped.weight, initial) and scaler.get_scale() == 2.0 ** 11
