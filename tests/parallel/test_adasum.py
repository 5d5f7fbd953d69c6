"""Adasum on 2 ranks: each rank clips and steps on its own gradients, the updates are
combined with the Adasum operator, and a non-finite step is skipped by both ranks."""

import pytest
import torch
from helpers.agreement import parameters_equal_on_every_rank
from helpers.corpus import NANO, read_metrics

from hvdllm.config import load_config
from hvdllm.parallel import Precision, build_strategy
from hvdllm.train.trainer import Trainer


def adasum_strategy(*overrides):
    strategy = build_strategy(load_config(NANO, ["--parallel.op=adasum", *overrides]), world_size=2)
    strategy.setup(threads=1)
    return strategy


def adasum_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Maleki et al. 2020, two vectors: each keeps what is orthogonal to the other, and their
    common part counts once."""
    dot = a @ b
    return (1 - dot / (2 * (a @ a))) * a + (1 - dot / (2 * (b @ b))) * b


def test_updates_of_clipped_gradients_are_combined_by_adasum(horovod):
    strategy = adasum_strategy()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    start = model.weight.detach().flatten().clone()
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model)
    x = torch.tensor([[1.0, 2.0, 3.0]]) if horovod.rank() == 0 else torch.tensor([[3.0, -1.0, 0.5]])
    model(x).sum().backward()  # the gradient is x
    strategy.finish_gradients(optimizer, torch.zeros(3, dtype=torch.float64))
    norm, skipped = strategy.update(optimizer, model, Precision("fp32", torch.device("cpu")), max_norm=0.5,
                                    nonfinite=False)
    assert not skipped and norm == pytest.approx(x.norm().item())  # this rank's own norm
    grads = [torch.tensor(g) for g in horovod.allgather_object(x.flatten().tolist(), name="grads")]
    updates = [-0.5 * g / g.norm() for g in grads]  # SGD at lr 1 on gradients clipped to norm 0.5
    expected = start + adasum_of(*updates)
    assert not torch.allclose(expected, start + sum(updates) / 2)  # Adasum is not the average here
    assert torch.allclose(model.weight.detach().flatten(), expected, atol=1e-6)


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_both(horovod):
    strategy = adasum_strategy()
    model = torch.nn.Linear(3, 1, bias=False)
    start = model.weight.detach().clone()
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model)
    model(torch.ones(1, 3)).sum().backward()
    if horovod.rank() == 1:
        model.weight.grad[0, 0] = float("inf")  # a finite loss, an overflowing gradient
    strategy.finish_gradients(optimizer, torch.zeros(3, dtype=torch.float64))
    norm, skipped = strategy.update(optimizer, model, Precision("fp32", torch.device("cpu")), max_norm=0.5,
                                    nonfinite=False)
    assert skipped and norm == float("inf") and torch.equal(model.weight.detach(), start)
    assert horovod.allreduce(torch.ones(1), op=horovod.Sum, name="still_in_step").item() == 2  # none left waiting


def test_a_non_finite_step_on_one_rank_is_skipped_by_both(data, shared_dir, horovod):
    cfg = load_config(NANO, [f"--data.path={data}", f"--train.run_dir={shared_dir / 'nan'}", "--train.steps=5",
                             "--train.eval_every=0", "--parallel.op=adasum", "--parallel.accum_steps=2"])
    strategy = build_strategy(cfg, world_size=2)
    strategy.setup(threads=1)
    trainer = Trainer(cfg, strategy, torch.device("cpu"))
    forward = trainer.model.forward
    weights = {}

    def poisoned(*args, **kwargs):
        logits, loss = forward(*args, **kwargs)
        if trainer.step + 1 == 3:
            weights.setdefault("before", trainer.model.wte.weight.detach().clone())
            if horovod.rank() == 1:
                loss = loss * float("nan")
        if trainer.step + 1 == 4:
            weights.setdefault("after", trainer.model.wte.weight.detach().clone())
        return logits, loss

    trainer.model.forward = poisoned
    assert trainer.train() == 0
    assert torch.equal(weights["before"], weights["after"])  # step 3 changed nothing on either rank
    assert parameters_equal_on_every_rank(horovod, trainer.model)
    if horovod.rank() == 0:
        assert [r["step"] for r in read_metrics(shared_dir / "nan") if r["skipped"]] == [3]
