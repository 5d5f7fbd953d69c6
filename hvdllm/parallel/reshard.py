"""A checkpoint resumed on another cut of the model (pipeline stages, stage boundaries, tensor
ranks): its shards put together into one whole state, then each rank's part sliced out of it.

The model's state dicts already use the whole model's keys on every shard. The optimizer's
state is keyed by each parameter's position in its optimizer, which means nothing under
another cut, so every checkpoint shard also records the name of each of its optimizer's
parameters (:func:`optimizer_parameter_names`); by name, the stages' states merge as their
weights do. A tensor rank's optimizer state is cut as its parameter is, except along a
dimension the state has reduced away (Adafactor's row and column factors keep that dimension
as 1): there every tensor rank holds the same whole-tensor statistic, so it is kept, not cut.
"""

from __future__ import annotations

import torch
from torch import nn

from hvdllm.errors import UserError
from hvdllm.parallel.tensor import merge_slices, shard_of, tensor_split

# A tied embedding is one tensor under two names; a pipeline keeps a copy of it on its last stage.
_TIED_TWIN = {"wte.weight": "lm_head.weight", "lm_head.weight": "wte.weight"}


def optimizer_parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model state dict's key of each of ``optimizer``'s parameters, in the order of its
    state dict's indices (a tensor under two keys takes its first)."""
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first.setdefault(id(tensor), name)
    return [first[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(optimizer_state: dict, names: list[str]) -> dict[str, dict]:
    """``{name: {"state": its tensors, "group": its group's hyperparameters}}`` from a torch
    optimizer state dict whose parameters are named by ``names`` (index order)."""
    by_name, position = {}, 0
    for group in optimizer_state["param_groups"]:
        hyperparameters = {key: value for key, value in group.items() if key != "params"}
        for index in group["params"]:
            by_name[names[position]] = {"state": optimizer_state["state"].get(index, {}), "group": hyperparameters}
            position += 1
    return by_name


def _cut_like_parameter(value: torch.Tensor, name: str, parameter_shape: torch.Size) -> bool:
    """Whether the optimizer state ``value`` of parameter ``name`` is cut as the parameter is
    (see the module's docstring)."""
    split = tensor_split(name)
    return (split is not None and value.dim() == len(parameter_shape)
            and value.shape[split[0]] == parameter_shape[split[0]])


def merge_optimizer_slices(models: list[dict[str, torch.Tensor]], optimizers: list[dict[str, dict]]
                           ) -> dict[str, dict]:
    """One stage's optimizer state by name from its tensor ranks' (``models``: their state
    dicts, for the slices' shapes; ``optimizers``: their states by name), in rank order."""
    merged = {}
    for name, entry in optimizers[0].items():
        state = {}
        for key, value in entry["state"].items():
            if isinstance(value, torch.Tensor) and _cut_like_parameter(value, name, models[0][name].shape):
                state[key] = merge_slices(name, [optimizer[name]["state"][key] for optimizer in optimizers])
            else:
                state[key] = value
        merged[name] = {"state": state, "group": entry["group"]}
    return merged


def model_slice(model: nn.Module, whole: dict[str, torch.Tensor], rank: int, ranks: int) -> dict[str, torch.Tensor]:
    """``model``'s part of the whole model's state dict ``whole``: its keys, each cut for tensor
    rank ``rank`` of ``ranks`` where the parameter is split."""
    return {name: _slice(name, whole[name], whole[name].shape, rank, ranks) for name in model.state_dict()}


def optimizer_slice(optimizer: torch.optim.Optimizer, names: list[str], whole: dict[str, dict],
                    whole_model: dict[str, torch.Tensor], rank: int, ranks: int) -> dict:
    """A state dict for ``optimizer`` (its parameters named by ``names``) from the whole
    optimizer state by name, each tensor cut for tensor rank ``rank`` of ``ranks``; the groups
    take the checkpoint's hyperparameters, as torch's load_state_dict does."""
    current = optimizer.state_dict()
    state, groups, position = {}, [], 0
    for group in current["param_groups"]:
        saved_group = None
        for index in group["params"]:
            name = names[position]
            entry = whole.get(name) or whole.get(_TIED_TWIN.get(name, ""))
            if entry is None:
                raise UserError(f"the checkpoint holds no optimizer state for parameter {name}")
            shape = whole_model[name].shape
            state[index] = {key: _slice(name, value, shape, rank, ranks) if isinstance(value, torch.Tensor) else value
                            for key, value in entry["state"].items()}
            saved_group = saved_group or entry["group"]
            position += 1
        groups.append({**group, **(saved_group or {}), "params": group["params"]})
    return {"state": state, "param_groups": groups}


def _slice(name: str, value: torch.Tensor, parameter_shape: torch.Size, rank: int, ranks: int) -> torch.Tensor:
    if ranks == 1 or not _cut_like_parameter(value, name, parameter_shape):
        return value
    dim, parts = tensor_split(name)
    return shard_of(value, dim, parts, rank, ranks)
