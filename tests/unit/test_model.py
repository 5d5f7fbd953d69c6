import dataclasses
import resource
import typing

import pytest
import torch

from hvdllm.choices import INIT_STRATEGIES, POSITIONS
from hvdllm.config import ModelConfig
from hvdllm.model import GPT, PRESETS, GPTConfig, gpt_config_from, masked_loss_sums, preset_config
from hvdllm.model.memory import parameter_count


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=32, n_layer=3, n_head=4, d_model=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


@pytest.mark.parametrize("position", POSITIONS)
def test_causal_masking(position):
    model = tiny(position=position).eval()
    idx = torch.randint(0, 97, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)  # nothing before t may move
    assert not torch.allclose(a[:, t:], b[:, t:])  # and t itself must


def test_activation_checkpointing_same_gradients():
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for every in (0, 1, 2):
        model = tiny(checkpoint_every=every).train()
        _, loss = model(idx, idx)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, grad in grads[0].items():
            assert torch.allclose(grad, other[name], atol=1e-6), name


def test_loss_mask_ignores_masked_tokens():
    model = tiny().eval()
    idx = torch.randint(0, 97, (1, 8))
    targets = torch.randint(0, 97, (1, 8))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    other = targets.clone()
    other[0, :3] = (other[0, :3] + 5) % 97
    with torch.no_grad():
        assert torch.allclose(model(idx, targets, mask)[1], model(idx, other, mask)[1])
        assert not torch.allclose(model(idx, targets)[1], model(idx, other)[1])


@pytest.mark.parametrize("position", POSITIONS)
def test_position_is_seen(position):
    # Without position information one causal attention layer cannot tell the order of the
    # earlier tokens apart, so swapping the first two would leave the last logits unchanged
    # (to 1e-7). Kaiming init: weights large enough for attention to depend on position.
    model = tiny(position=position, n_layer=1, init="kaiming").eval()
    idx = torch.randint(0, 97, (2, 16))
    swapped = idx[:, [1, 0, *range(2, 16)]]
    with torch.no_grad():
        change = (model(idx)[0][:, -1] - model(swapped)[0][:, -1]).abs().max().item()
    assert change > 1e-3


# Standard deviation of the first MLP weight (64 -> 256) under each strategy; a name added to
# INIT_STRATEGIES needs its entry here.
FC_STD = {"gpt2": 0.02, "small": (2 / (5 * 64)) ** 0.5, "xavier": (2 / (64 + 256)) ** 0.5, "kaiming": 64 ** -0.5}


@pytest.mark.parametrize("init", INIT_STRATEGIES)
def test_init_strategies(init):
    model = tiny(init=init, n_layer=8, d_model=64)
    fc = model.blocks[0].mlp.fc.weight
    proj = model.blocks[0].mlp.proj.weight
    assert fc.std().item() == pytest.approx(FC_STD[init], rel=0.1)
    if init == "gpt2":
        assert abs(proj.std().item() - 0.02 / 4) < 0.001  # 1 / sqrt(2 * 8)
    if init == "xavier":
        bound = (6 / (64 + 256)) ** 0.5
        assert fc.abs().max().item() <= bound
    assert torch.all(model.blocks[0].ln_1.weight == 1)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_unknown_position_or_init_refused():
    with pytest.raises(ValueError, match="model.position must be one of learned"):
        tiny(position="alibi")
    with pytest.raises(ValueError, match="model.init must be one of gpt2"):
        tiny(init="orthogonal")


def test_masked_loss_sums():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 3] = 5.0  # argmax 2, 1, 3
    targets = torch.tensor([[2, 0, 3]])  # right, wrong, right
    each = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    loss_sum, tokens, correct = masked_loss_sums(logits, targets)
    assert (loss_sum.item(), tokens.item(), correct.item()) == pytest.approx((each.sum().item(), 3, 2))
    loss_sum, tokens, correct = masked_loss_sums(logits, targets, torch.tensor([[0, 1, 1]]))
    assert (loss_sum.item(), tokens.item(), correct.item()) == pytest.approx((each[1:].sum().item(), 2, 1))


@pytest.mark.parametrize("shape", [{}, {"tie_weights": False}, {"bias": False}, {"position": "rope"}])
def test_parameter_count_from_the_config_is_the_models(shape):
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, d_model=8, **shape)
    assert parameter_count(cfg) == GPT(cfg).num_params()


def test_model_config_declares_every_gpt_config_field():
    # gpt_config_from copies GPTConfig's fields from ModelConfig by name: they must agree.
    gpt = {f.name: f for f in dataclasses.fields(GPTConfig)}
    model = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(model) == set(gpt) | {"preset"}
    gpt_types, model_types = typing.get_type_hints(GPTConfig), typing.get_type_hints(ModelConfig)
    for name, f in gpt.items():
        assert model_types[name] == gpt_types[name], name
        if f.default is not dataclasses.MISSING:
            assert model[name].default == f.default, name


def test_gpt_config_from_copies_fields_and_fills_shape_from_preset():
    cfg = gpt_config_from(ModelConfig(preset="gpt-nano", n_layer=3, dropout=0.1, bias=False,
                                      position="rope", init="small", checkpoint_every=2))
    nano = PRESETS["gpt-nano"]
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.block_size) == (3, nano.n_head, nano.d_model, nano.block_size)
    assert (cfg.dropout, cfg.bias, cfg.position, cfg.init, cfg.checkpoint_every) == (0.1, False, "rope", "small", 2)
    assert cfg.vocab_size == nano.vocab_size
    assert gpt_config_from(ModelConfig(preset="gpt-nano"), vocab_size=300).vocab_size == 300
    assert gpt_config_from(ModelConfig(preset="gpt-nano", vocab_size=200), vocab_size=300).vocab_size == 200


def test_tied_weights_and_blocks_indexable():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert not tiny(tie_weights=False).lm_head.weight is tiny(tie_weights=False).wte.weight
    stage = model.blocks[1:3]
    assert len(stage) == 2
    x = torch.randn(2, 5, 32)
    assert torch.allclose(model.run_blocks(x, 1, 3), stage[1](stage[0](x)))


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


GPT3 = [name for name in PRESETS if name.startswith("gpt3-")]


@pytest.mark.parametrize("name", GPT3)
def test_gpt3_presets_match_paper(name):
    with torch.device("meta"):
        model = GPT(preset_config(name))
    nominal = PRESETS[name].nominal_params
    assert abs(model.num_params() - nominal) / nominal < 0.02, (name, model.num_params())
    assert model.cfg.block_size == 2048 and model.cfg.vocab_size == 50257


def test_meta_175b_costs_no_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = GPT(preset_config("gpt3-175b"))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert model.num_params() > 170e9
    assert grown_mb < 200, grown_mb  # real storage would be 700 GB


def test_generate_extends_prompt():
    model = tiny().eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=5, temperature=0.8, top_k=5)
    assert out.shape == (1, 8)
    greedy = model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    assert torch.equal(greedy, model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
