"""Adasum (Maleki et al. 2020): each rank takes its own optimizer step, and Horovod combines
the parameter *updates* with the Adasum operator instead of averaging gradients.

Horovod's ``DistributedOptimizer(op=hvd.Adasum)`` steps the inner optimizer inside the
backward hooks, parameter by parameter, as each gradient is ready. That leaves nothing for
the loop to act on afterwards: clipping after backward clips gradients already used, a step
skipped for a non-finite loss leaves its allreduces pending (its ``zero_grad`` then
asserts), and an fp16 loss scaler's scaled gradients are stepped on before they are
unscaled. So this strategy does the same exchange after backward instead:

1. the step statistics are reduced first, so every rank knows whether any rank saw a
   non-finite loss and all skip together;
2. each rank clips its own gradients (Adasum combines per-rank updates, so the norm that
   bounds an update is the rank's own, and the logged norm is rank 0's) and steps its
   inner optimizer, remembering where each parameter started;
3. the deltas ``new - start`` are allreduced with ``op=hvd.Adasum`` (all enqueued, then
   waited on, so Horovod fuses them) and every rank sets ``start + combined delta``.

fp16 is refused: a dynamic loss scaler that skips on one rank and not another would let the
ranks' scales drift apart. Horovod's Adasum runs on its MPI controller only, over a
power-of-two number of ranks, and on the global process set.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hvdllm.errors import UserError
from hvdllm.parallel.sync import HorovodSync


def check_adasum_layout(layout, precision: str) -> None:
    """Refuse, with one line, what Adasum cannot do: checked before Horovod starts."""
    if layout.pipeline > 1:
        raise UserError("parallel.op=adasum works on Horovod's global process set only: use parallel.pipeline=1")
    if layout.data & (layout.data - 1):
        raise UserError(f"parallel.op=adasum needs a power-of-two number of ranks (Horovod's Adasum); "
                        f"the layout has {layout.data}")
    if precision == "fp16":
        raise UserError("parallel.op=adasum with train.precision=fp16: per-rank loss scales would drift apart; "
                        "use bf16 or fp32")


class HorovodAdasum(HorovodSync):
    def setup(self, threads: int) -> None:
        super().setup(threads)
        if not self.hvd.mpi_enabled():  # every rank sees the same controller: all stop together
            raise UserError("parallel.op=adasum needs Horovod's MPI controller: launch with mpirun or "
                            "horovodrun --mpi, not --gloo")

    def wrap_optimizer(self, optimizer, model: nn.Module):
        return optimizer  # the exchange happens in apply_update, not in hooks

    def finish_gradients(self, optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(step_stats, op=self.hvd.Sum, name="step_stats")

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """This rank's own norm (it bounds this rank's update); infinite on every rank when
        any rank's is not finite, so all skip the step together: one rank stepping while
        another skips would leave the Adasum allreduces unmatched."""
        norm = super().clip_grad_norm_(model, max_norm)
        flag = torch.tensor([0.0 if math.isfinite(norm) else 1.0])
        any_bad = self.hvd.allreduce(flag, op=self.hvd.Sum, name="adasum_nonfinite").item() > 0
        return math.inf if any_bad else norm

    @torch.no_grad()
    def apply_update(self, optimizer, scaler) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        starts = [p.detach().clone() for p in params]
        optimizer.step()
        handles = []
        for index, (param, start) in enumerate(zip(params, starts)):
            param.sub_(start)  # the delta, reduced in place
            handles.append(self.hvd.allreduce_async_(param, op=self.hvd.Adasum, name=f"adasum.{index}"))
        for param, start, handle in zip(params, starts, handles):
            self.hvd.synchronize(handle)
            param.add_(start)
