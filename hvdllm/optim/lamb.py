"""LAMB: layer-wise adaptive moments for large-batch training.

Follows Algorithm 2 of You et al. 2019, "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes" (arXiv:1904.00962, v5), with the trust ratio taken per
parameter tensor and phi the identity (optionally clamped), as NVIDIA's FusedLAMB does:

    m = b1 m + (1 - b1) g           v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)          v_hat = v / (1 - b2^t)       (if bias_correction)
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
    ratio = ||w|| / ||r||, or 1 when either norm is 0; clamped to trust_clip if set
    w = w - lr * ratio * r

A parameter split over ranks (tensor parallelism) takes its trust ratio from the norms of the
whole tensor: with ``split`` set (see :mod:`hvdllm.optim.split`), this rank's squared norms of
the split parameters are summed over the ranks holding the other slices.

The math runs on whole lists of tensors with ``torch._foreach_*`` ops, one kernel per op for
all parameters of a group, rather than a Python loop of small kernels. The update is built
in a per-parameter workspace kept between steps (one more parameter-sized buffer, 4 bytes
per fp32 parameter, not saved in the state dict).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from hvdllm.optim.split import SplitParameters, sum_parts


class Lamb(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 trust_clip: float | None = None) -> None:
        if lr <= 0:
            raise ValueError(f"Lamb: lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"Lamb: eps must be > 0 and weight_decay >= 0, got {eps}, {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_clip=trust_clip)
        super().__init__(params, defaults)
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}
        self.split: SplitParameters | None = None

    def _workspace(self, p: torch.Tensor) -> torch.Tensor:
        """A scratch tensor shaped like p, reused every step (not part of the state dict)."""
        buffer = self._buffers.get(p)
        if buffer is None or buffer.shape != p.shape or buffer.device != p.device:
            buffer = self._buffers[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buffer

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

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lamb does not support sparse gradients")
        exp_avgs, exp_avg_sqs, bias1, bias2 = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"].item()
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            bias1.append(1.0 - beta1 ** t if group["bias_correction"] else 1.0)
            bias2.append((1.0 - beta2 ** t) ** 0.5 if group["bias_correction"] else 1.0)

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        # r = m_hat / (sqrt(v_hat) + eps) + wd w, with the bias corrections folded into two
        # per-tensor scalars (as torch's Adam does), so no pass materializes m_hat or v_hat:
        #   m_hat / (sqrt(v_hat) + eps) = (sqrt(c2) / c1) * m / (sqrt(v) + eps sqrt(c2))
        # It is built in a workspace kept between steps: on the CPU a fresh parameter-sized
        # allocation per step costs more than the arithmetic (page faults on new memory).
        update = [self._workspace(p) for p in params]
        torch._foreach_copy_(update, exp_avg_sqs)
        torch._foreach_sqrt_(update)
        torch._foreach_add_(update, [group["eps"] * b2 for b2 in bias2])  # denominator
        torch._foreach_reciprocal_(update)
        torch._foreach_mul_(update, exp_avgs)
        torch._foreach_mul_(update, [b2 / b1 for b1, b2 in zip(bias1, bias2)])
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        # Norms in at least fp32 (fp64 parameters keep fp64), one element per tensor.
        w_norm = torch.stack(torch._foreach_norm(params))
        w_norm = w_norm.to(torch.promote_types(w_norm.dtype, torch.float32))
        r_norm = torch.stack(torch._foreach_norm(update)).to(w_norm.dtype)
        if self.split is not None:
            w_norm, r_norm = self._whole_tensor_norms(params, torch.stack([w_norm, r_norm]))
        ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm.clamp(min=1e-30),
                            torch.ones_like(w_norm))
        if group["trust_clip"]:
            ratio = ratio.clamp(max=group["trust_clip"])
        ratio = ratio.mul_(-group["lr"])
        # One scale per tensor: the 0-d tensors broadcast, so this stays on the device.
        torch._foreach_mul_(update, [r.to(u.dtype) for r, u in zip(ratio.unbind(), update)])
        torch._foreach_add_(params, update)

    def _whole_tensor_norms(self, params: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        """Norms (2, n) of the weights and updates of ``params``, those of split parameters taken
        over the whole tensors (a collective over the split's ranks)."""
        split = torch.tensor([self.split.split_dim(p) is not None for p in params])
        if split.any():
            squares, = sum_parts(self.split, [norms[:, split].square()])
            norms[:, split] = squares.sqrt().to(norms.dtype)
        return norms
