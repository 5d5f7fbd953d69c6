"""Adafactor (Shazeer & Stern 2018) whose whole-tensor statistics may span ranks.

The update is torch.optim.Adafactor's (same hyperparameters, same state, so checkpoints move
between the two): for an n x m matrix the second moment is kept as a row factor (n, 1) and a
column factor (1, m), the means of the squared gradient along each row and each column;
vectors keep a full second moment. The step is the learning rate relative to the weights'
RMS, and an update whose RMS exceeds ``d`` is scaled down to it.

Under tensor parallelism a rank holds a slice of a matrix cut along its rows or its columns.
The factor along the cut, the weights' and the update's RMS, and the mean of the row factor
are then statistics of the whole matrix: this rank's parts are summed over the ranks holding
the others (``split``, see :mod:`hvdllm.optim.split`), three small messages per step, so t
ranks take the step one rank would.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from hvdllm.optim.split import SplitParameters, sum_parts


class Adafactor(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"Adafactor: lr must be > 0, got {lr}")
        if beta2_decay > 0:
            raise ValueError(f"Adafactor: beta2_decay must be <= 0, got {beta2_decay}")
        if d < 1.0 or weight_decay < 0:
            raise ValueError(f"Adafactor: d must be >= 1 and weight_decay >= 0, got {d}, {weight_decay}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.split: SplitParameters | None = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if p.dim() > 1:
                state["row_var"] = p.new_zeros(p.shape[:-1] + (1,))
                state["col_var"] = p.new_zeros(p.shape[:-2] + (1,) + p.shape[-1:])
            else:
                state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _cut(self, p: torch.Tensor) -> int | None:
        """The dimension ``p`` is cut along, counted from the end (-1: columns, -2: rows)."""
        dim = self.split.split_dim(p) if self.split is not None else None
        return None if dim is None else dim - p.dim() if dim >= 0 else dim

    def _whole(self, parts: list[torch.Tensor], needed: list[bool]) -> list[torch.Tensor]:
        """``parts`` with those ``needed`` summed over the ranks (one message)."""
        summed = iter(sum_parts(self.split, [part for part, need in zip(parts, needed) if need]) if any(needed) else [])
        return [next(summed) if need else part for part, need in zip(parts, needed)]

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        lr = float(group["lr"])
        eps1_setting, eps2 = group["eps"]
        states = [self._state(p) for p in params]
        cuts = [self._cut(p) for p in params]
        split = [cut is not None for cut in cuts]
        ranks = self.split.ranks if self.split is not None else 1
        numels = [p.numel() * (ranks if s else 1) for p, s in zip(params, split)]
        factored = [p.dim() > 1 for p in params]

        # The weights' squared norms and the squared gradients summed along rows and columns.
        weight_sq = self._whole([p.norm(2).square() for p in params], split)
        grads = [p.grad for p in params]
        row_sq = [torch.norm(g, dim=-1, keepdim=True).square_() if f else None for g, f in zip(grads, factored)]
        col_sq = [torch.norm(g, dim=-2, keepdim=True).square_() if f else None for g, f in zip(grads, factored)]
        row_sq = self._whole(row_sq, [cut == -1 and f for cut, f in zip(cuts, factored)])
        col_sq = self._whole(col_sq, [cut == -2 and f for cut, f in zip(cuts, factored)])

        row_sums, updates = [], []
        for p, g, state, cut, f, rows_sq, cols_sq in zip(params, grads, states, cuts, factored, row_sq, col_sq):
            state["step"] += 1
            beta2_weight = state["step"].item() ** group["beta2_decay"]  # 1 - beta2 at this step
            if f:
                columns = g.size(-1) * (ranks if cut == -1 else 1)
                rows = g.size(-2) * (ranks if cut == -2 else 1)
                state["row_var"].lerp_(rows_sq.div_(columns).to(g.dtype), beta2_weight)
                state["col_var"].lerp_(cols_sq.div_(rows).to(g.dtype), beta2_weight)
                row_sums.append(state["row_var"].sum(dim=-2, keepdim=True))
            else:
                state["variance"].lerp_(g * g, beta2_weight)
                row_sums.append(None)
        row_sums = self._whole(row_sums, [cut == -2 and f for cut, f in zip(cuts, factored)])

        for p, g, state, cut, f, row_sum in zip(params, grads, states, cuts, factored, row_sums):
            eps1 = torch.finfo(p.dtype).eps if eps1_setting is None else eps1_setting
            if f:
                rows = g.size(-2) * (ranks if cut == -2 else 1)
                estimate = state["row_var"] @ state["col_var"]
                estimate.div_(row_sum.div(rows).to(g.dtype).clamp_(min=eps1))
            else:
                estimate = state["variance"].clone()
            updates.append(estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(g))
        update_sq = self._whole([u.norm(2).square() for u in updates], split)

        for p, state, update, w_sq, u_sq, numel in zip(params, states, updates, weight_sq, update_sq, numels):
            step = state["step"].item()
            rho = min(lr, 1 / step ** 0.5)
            alpha = max(eps2, w_sq.item() ** 0.5 / numel ** 0.5) * rho
            denom = max(1.0, u_sq.item() ** 0.5 / (numel ** 0.5 * group["d"]))
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-alpha / denom)
