import io
import threading

import pytest
import torch

from hvdllm.choices import OPTIMIZERS, SCALE_RULES, SCHEDULES
from hvdllm.config import OptimConfig, ScheduleConfig
from hvdllm.model import GPT, GPTConfig
from hvdllm.optim import Adafactor, Lamb, LRSchedule, build_optimizer, lr_factor, param_groups, scaled_lr


def reference_lamb(params, grads_per_step, lr, betas, eps, wd, trust_clip=None):
    """The LAMB update of You et al. 2019 in float64, one tensor at a time."""
    params = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            m_hat = m[i] / (1 - betas[0] ** t)
            v_hat = v[i] / (1 - betas[1] ** t)
            r = m_hat / (v_hat.sqrt() + eps) + wd[i] * p
            w_norm, r_norm = p.norm().item(), r.norm().item()
            ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            if trust_clip:
                ratio = min(ratio, trust_clip)
            params[i] = p - lr * ratio * r
    return params


@pytest.mark.parametrize("trust_clip", [None, 0.5])
def test_lamb_matches_float64_reference(trust_clip):
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (5,), (3, 4, 2), (6,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params[3].zero_()  # a zero-norm tensor: trust ratio must fall back to 1
    steps = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(20)]
    wd = [0.01, 0.0, 0.01, 0.0]
    expected = reference_lamb(params, steps, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=wd,
                              trust_clip=trust_clip)
    tensors = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Lamb([{"params": [tensors[0], tensors[2]], "weight_decay": 0.01},
                {"params": [tensors[1], tensors[3]], "weight_decay": 0.0}],
               lr=1e-2, betas=(0.9, 0.999), eps=1e-6, trust_clip=trust_clip)
    for grads in steps:
        for p, g in zip(tensors, grads):
            p.grad = g.clone()
        opt.step()
    for got, want in zip(tensors, expected):
        assert torch.allclose(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_lamb_state_dict_roundtrip():
    def make():
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(4, 3))
        return w, Lamb([w], lr=1e-2)

    w1, opt1 = make()
    for _ in range(3):
        w1.grad = torch.ones_like(w1)
        opt1.step()
    w2, opt2 = make()
    w2.data.copy_(w1.data)
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)  # through a checkpoint, as the trainer does
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for w, opt in ((w1, opt1), (w2, opt2)):
        w.grad = torch.full_like(w, 0.5)
        opt.step()
    assert torch.equal(w1, w2)


def test_adafactor_state_is_factored():
    w = torch.nn.Parameter(torch.randn(300, 200))
    opt = build_optimizer(torch.nn.Linear(1, 1), OptimConfig(name="adafactor"))
    assert isinstance(opt, Adafactor)
    opt = Adafactor([w], lr=1e-2)
    w.grad = torch.randn_like(w)
    opt.step()
    state_numel = sum(t.numel() for t in opt.state[w].values() if torch.is_tensor(t) and t.dim() > 0)
    assert state_numel == 300 + 200  # O(n + m), not n * m


def _pair_of_models():
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    second = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    second.load_state_dict(first.state_dict())
    return first, second


def _groups(model):
    return [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
            {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]


def test_adafactor_takes_torchs_steps_and_reads_its_state():
    """hvdllm's Adafactor is torch's update (written again so its statistics can span ranks)."""
    theirs, ours = _pair_of_models()
    reference = torch.optim.Adafactor(_groups(theirs), lr=1e-2, beta2_decay=-0.8, foreach=True)
    optimizer = Adafactor(_groups(ours), lr=1e-2, beta2_decay=-0.8)
    for _ in range(2):
        for _ in range(10):
            x = torch.randn(5, 8)
            for model, opt in ((theirs, reference), (ours, optimizer)):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        for mine, reference_param in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(mine, reference_param, rtol=1e-5, atol=1e-7)
        saved = io.BytesIO()  # a checkpoint of torch's Adafactor resumes
        torch.save(reference.state_dict(), saved)
        saved.seek(0)
        optimizer.load_state_dict(torch.load(saved, weights_only=True))


class _ThreadGroup:
    """t threads as the ranks of a tensor group: ``sum_`` adds every thread's values."""

    def __init__(self, ranks: int) -> None:
        self.ranks, self.parts = ranks, [None] * ranks
        self.barrier = threading.Barrier(ranks)

    def member(self, rank: int):
        group = self

        class Member:
            ranks = group.ranks

            @staticmethod
            def split_dim(param):
                return getattr(param, "cut", None)

            @staticmethod
            def sum_(values):
                group.parts[rank] = values.clone()
                group.barrier.wait()
                total = sum(group.parts[1:], group.parts[0].clone())
                group.barrier.wait()
                return total

        return Member()


@pytest.mark.parametrize("kind", [Lamb, Adafactor])
def test_split_parameters_take_the_whole_tensors_step(kind):
    """Slices of matrices cut along rows and along columns, of a vector, and a replicated vector,
    each stepped by its rank with the statistics summed over the ranks, are the slices of the
    whole tensors stepped by one optimizer (LAMB's trust ratios, Adafactor's factors and RMS)."""
    torch.manual_seed(0)
    ranks, steps = 2, 6
    cuts = [0, 1, 0, None]  # a column-parallel weight, a row-parallel weight, a split bias, a replicated one
    whole = [torch.nn.Parameter(torch.randn(shape)) for shape in ((8, 6), (6, 8), (8,), (6,))]
    grads = [[torch.randn_like(p) for p in whole] for _ in range(steps)]

    def slices(tensors, rank):
        return [t if cut is None else t.chunk(ranks, dim=cut)[rank] for t, cut in zip(tensors, cuts)]

    def build(params):
        return kind([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                    lr=1e-2)

    optimizer = build(whole)
    for step_grads in grads:
        for p, g in zip(whole, step_grads):
            p.grad = g.clone()
        optimizer.step()

    torch.manual_seed(0)
    start = [torch.randn(p.shape) for p in whole]
    group, results = _ThreadGroup(ranks), [None] * ranks

    def rank_steps(rank: int) -> None:
        params = [torch.nn.Parameter(t.clone()) for t in slices(start, rank)]
        for p, cut in zip(params, cuts):
            if cut is not None:
                p.cut = cut
        opt = build(params)
        opt.split = group.member(rank)
        for step_grads in grads:
            for p, g in zip(params, slices(step_grads, rank)):
                p.grad = g.clone()
            opt.step()
        results[rank] = params

    threads = [threading.Thread(target=rank_steps, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for rank in range(ranks):
        for mine, expected in zip(results[rank], slices([p.detach() for p in whole], rank)):
            torch.testing.assert_close(mine.detach(), expected, rtol=1e-5, atol=1e-6)


def test_param_groups_exclude_biases_norms_embeddings():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=8))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.wte.weight for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    decay_e, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert any(p is model.wte.weight for p in decay_e["params"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_build_optimizer_steps(name):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=8))
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2))
    idx = torch.randint(0, 50, (2, 8))
    first = model(idx, idx)[1].item()
    for _ in range(10):
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
    assert model(idx, idx)[1].item() < first


def sched(**kw):
    return ScheduleConfig(**{"warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


def test_schedule_values():
    cos = sched(name="cosine")
    assert lr_factor(0, 110, cos) == pytest.approx(0.1)
    assert lr_factor(9, 110, cos) == pytest.approx(1.0)
    assert lr_factor(60, 110, cos) == pytest.approx(0.55)  # halfway: floor + (1 - floor) / 2
    assert lr_factor(110, 110, cos) == pytest.approx(0.1)
    assert lr_factor(60, 110, sched(name="linear")) == pytest.approx(0.55)
    step = sched(name="step", milestones=[50, 80], gamma=0.5)
    assert [lr_factor(s, 110, step) for s in (49, 50, 79, 80)] == [1.0, 0.5, 0.5, 0.25]
    wsd = sched(name="wsd", decay_fraction=0.2)
    assert lr_factor(80, 100, wsd) == 1.0 and lr_factor(90, 100, wsd) == pytest.approx(0.55)
    assert lr_factor(50, 110, sched(name="constant")) == 1.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_implemented(name):
    factors = [lr_factor(s, 110, sched(name=name, milestones=[50])) for s in range(110)]
    assert factors[9] == 1.0 and all(0 < f <= 1 for f in factors)


def test_scale_rules():
    expected = {"none": 1e-3, "linear": 4e-3, "sqrt": 2e-3}  # a new rule needs its entry
    assert {rule: scaled_lr(1e-3, 4, rule) for rule in SCALE_RULES} == pytest.approx(expected)


def test_unknown_names_refused_by_the_implementations():
    unknown = sched()
    unknown.name = "exponential"  # past config validation, as a hand-made config could be
    with pytest.raises(ValueError, match="schedule.name must be one of cosine"):
        lr_factor(50, 110, unknown)
    with pytest.raises(ValueError, match="schedule.scale_rule must be one of none"):
        scaled_lr(1e-3, 4, "cubic")
    unknown_optim = OptimConfig()
    unknown_optim.name = "sgd"
    with pytest.raises(ValueError, match="optim.name must be one of adamw"):
        build_optimizer(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=8)), unknown_optim)


def test_plateau_reduces_and_checkpoints():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    s = LRSchedule(opt, 1.0, 100, sched(name="constant", warmup_steps=0, plateau=True,
                                         plateau_patience=2, plateau_factor=0.5))
    assert [s.observe_val_loss(v) for v in (3.0, 2.0, 2.5, 2.4)] == [False, False, False, True]
    assert s.apply(5) == 0.5 and opt.param_groups[0]["lr"] == 0.5
    other = LRSchedule(opt, 1.0, 100, s.cfg)
    other.load_state_dict(s.state_dict())
    assert other.lr_at(5) == 0.5 and other.val_loss.best == 2.0


@pytest.mark.parametrize("fused, kernel", [("on", "fused"), ("off", "foreach"), ("auto", "foreach")])
def test_adamw_kernel_follows_optim_fused(fused, kernel):
    """auto is foreach on the CPU (fused on CUDA); on asks for the fused kernel everywhere."""
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16))
    optimizer = build_optimizer(model, OptimConfig(fused=fused))
    assert optimizer.defaults[kernel] is True and not optimizer.defaults["fused" if kernel == "foreach" else "foreach"]


def test_fused_adamw_takes_the_foreach_steps():
    def losses(fused: str) -> list[float]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16))
        optimizer = build_optimizer(model, OptimConfig(fused=fused, lr=1e-2))
        ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
        seen = []
        for _ in range(8):
            loss = model(ids, ids)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seen.append(loss.item())
        return seen

    fused, foreach = losses("on"), losses("off")
    assert fused[-1] < fused[0] - 0.1
    assert max(abs(a - b) for a, b in zip(fused, foreach)) < 1e-5


def test_fused_is_refused_for_other_optimizers():
    with pytest.raises(ValueError, match="optim.fused.*AdamW's kernel"):
        OptimConfig(name="lamb", fused="on")
