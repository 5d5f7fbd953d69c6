"""Optimizer state re-sliced for another tensor cut: cut as its parameter is, except along a
dimension it has reduced away (Adafactor's factors), and put back together by name."""

import pytest
import torch
from torch import nn

from hvdllm.parallel.reshard import (merge_optimizer_slices, model_slice, optimizer_parameter_names,
                                     optimizer_slice, optimizer_state_by_name)


@pytest.mark.parametrize("name, shape", [("blocks.0.mlp.fc.weight", (8, 4)), ("blocks.0.mlp.proj.weight", (4, 8)),
                                         ("blocks.0.attn.qkv.weight", (12, 4))])
def test_two_tensor_ranks_slices_merge_back_into_the_whole_state(name, shape):
    torch.manual_seed(0)
    whole_param = torch.randn(shape)
    whole_state = {"step": torch.tensor(3.0), "exp_avg": torch.randn(shape),
                   "row_var": torch.rand(shape[0], 1), "col_var": torch.rand(1, shape[1])}
    entry = {"state": whole_state, "group": {"lr": 0.1}}
    models, optimizers = [], []
    for rank in range(2):
        module = _Holder(name, whole_param)
        sliced_model = model_slice(module, {name: whole_param}, rank, 2)
        module.load(sliced_model)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        state = optimizer_slice(optimizer, [name], {name: entry}, {name: whole_param}, rank, 2)["state"][0]
        # The factor along the cut dimension stays whole; the other is cut with the parameter.
        reduced = "col_var" if name.endswith("proj.weight") else "row_var"
        kept = "row_var" if reduced == "col_var" else "col_var"
        assert torch.equal(state[kept], whole_state[kept])
        assert state[reduced].numel() == whole_state[reduced].numel() // 2
        models.append(sliced_model)
        optimizers.append({name: {"state": state, "group": {"lr": 0.1}}})
    merged = merge_optimizer_slices(models, optimizers)[name]["state"]
    assert all(torch.equal(merged[key], whole_state[key]) for key in whole_state)


def test_a_tied_parameter_is_named_once_and_state_by_name_follows_the_groups():
    model = nn.ModuleDict({"wte": nn.Embedding(5, 3), "head": nn.Linear(3, 5, bias=False)})
    model["head"].weight = model["wte"].weight
    optimizer = torch.optim.AdamW([{"params": [model["wte"].weight], "weight_decay": 0.0}])
    assert optimizer_parameter_names(model, optimizer) == ["wte.weight"]
    by_name = optimizer_state_by_name(optimizer.state_dict(), ["wte.weight"])
    assert by_name["wte.weight"]["group"]["weight_decay"] == 0.0


class _Holder(nn.Module):
    """A module with one parameter under ``name``'s key."""

    def __init__(self, name: str, whole: torch.Tensor) -> None:
        super().__init__()
        self.key = name
        self.weight = nn.Parameter(torch.zeros(0))

    def state_dict(self, *args, **kwargs):
        return {self.key: self.weight} if kwargs.get("keep_vars") else {self.key: self.weight.detach()}

    def load(self, state: dict) -> None:
        self.weight = nn.Parameter(state[self.key].clone())
