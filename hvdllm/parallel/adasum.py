"""Adasum (Maleki et al. 2020): each rank takes its own optimizer step and Horovod combines the
parameter updates with the Adasum operator, after backward rather than in Horovod's hooks.
Why after backward, and what is refused: docs/design/parallel.md (Adasum).
"""

from __future__ import annotations

import math

import torch

from hvdllm.errors import UserError
from hvdllm.parallel.update import UpdateRule


def check_adasum_layout(layout, precision: str) -> None:
    """Refuse, with one line, what Adasum cannot do: checked before Horovod starts."""
    if layout.pipeline > 1 or layout.tensor > 1:
        raise UserError("parallel.op=adasum works on Horovod's global process set only, not per model part: "
                        "use parallel.pipeline=1 and parallel.tensor=1")
    if layout.data & (layout.data - 1):
        raise UserError(f"parallel.op=adasum needs a power-of-two number of ranks (Horovod's Adasum); "
                        f"the layout has {layout.data}")
    if precision == "fp16":
        raise UserError("parallel.op=adasum with train.precision=fp16: per-rank loss scales would drift apart; "
                        "use bf16 or fp32")


class AdasumUpdate(UpdateRule):
    def check_runtime(self) -> None:
        if not self.hvd.mpi_enabled():  # every rank sees the same controller: all stop together
            raise UserError("parallel.op=adasum needs Horovod's MPI controller: launch with mpirun or "
                            "horovodrun --mpi, not --gloo")

    def agree_norm(self, norm: float) -> float:
        """This rank's own norm (it bounds this rank's update); infinite on every rank when
        any rank's is not finite, so all skip the step together: one rank stepping while
        another skips would leave the Adasum allreduces unmatched."""
        flag = torch.tensor([0.0 if math.isfinite(norm) else 1.0])
        any_bad = self.hvd.allreduce(flag, op=self.hvd.Sum, name="adasum_nonfinite").item() > 0
        return math.inf if any_bad else norm

    @torch.no_grad()
    def step(self, optimizer, scaler) -> None:
        hvd = self.hvd
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        starts = [p.detach().clone() for p in params]
        optimizer.step()
        handles = []
        for index, (param, start) in enumerate(zip(params, starts)):
            param.sub_(start)  # the delta, reduced in place
            handles.append(hvd.allreduce_async_(param, op=hvd.Adasum, name=f"adasum.{index}"))
        for param, start, handle in zip(params, starts, handles):
            hvd.synchronize(handle)
            param.add_(start)
