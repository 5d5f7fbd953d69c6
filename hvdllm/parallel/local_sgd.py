"""Local SGD / DiLoCo (Douillard et al. 2023) on Horovod: H local steps, then one averaging of the
parameter deltas with an outer Nesterov SGD step.
What still travels every step, evaluation and checkpoints: docs/design/parallel.md (Local SGD).
"""

from __future__ import annotations

import torch
from torch import nn

from hvdllm.errors import UserError
from hvdllm.parallel.base import step_optimizer
from hvdllm.parallel.sync import HorovodSync

STATS_BYTES = 3 * 8  # the float64 step statistics, allreduced every step


def check_local_sgd_layout(cfg, layout) -> None:
    """Refuse, with one line, what local SGD does not do: checked before Horovod starts."""
    parallel = cfg.parallel
    if layout.pipeline > 1 or layout.servers:
        raise UserError("parallel.strategy=local-sgd averages whole replicas: use parallel.pipeline=1 and "
                        "parallel.servers=0")
    if parallel.op != "average" or parallel.compression != "none":
        raise UserError("parallel.strategy=local-sgd averages parameter deltas at full precision: "
                        "use parallel.op=average and parallel.compression=none")
    if cfg.train.precision == "fp16":
        raise UserError("parallel.strategy=local-sgd with train.precision=fp16: per-worker loss scales would "
                        "drift apart; use bf16 or fp32")


class LocalSGD(HorovodSync):
    def wrap_optimizer(self, optimizer, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The anchor is the outer optimizer's parameter: the global model at the last averaging.
        self.anchors = [p.detach().clone() for p in self.params]
        momentum = self.cfg.outer_momentum
        self.outer = torch.optim.SGD(self.anchors, lr=self.cfg.outer_lr, momentum=momentum, nesterov=momentum > 0)
        self.inner_steps = 0  # steps since the run began, skipped ones included: equal on every rank
        self.rounds = 0
        self.comm_bytes = 0  # payload this rank has allreduced (statistics + deltas)
        self.restored = False
        return optimizer  # the inner optimizer: nothing is exchanged in backward hooks

    @property
    def writes_checkpoint(self) -> bool:
        return True  # between averagings each replica's parameters and inner moments are its own

    @property
    def checkpoint_shard(self) -> int:
        return self.coords.rank

    def broadcast_state(self, model: nn.Module, optimizer) -> None:
        if self.restored:
            return  # each rank loaded its own shard; the anchors and outer state are alike
        super().broadcast_state(model, optimizer)
        with torch.no_grad():
            for anchor, param in zip(self.anchors, self.params):
                anchor.copy_(param)

    def finish_gradients(self, optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        self.comm_bytes += STATS_BYTES
        return self.hvd.allreduce(step_stats, op=self.hvd.Sum, name="step_stats")

    def apply_update(self, optimizer, scaler) -> None:
        step_optimizer(optimizer, scaler)

    def update(self, optimizer, model: nn.Module, precision, max_norm: float, nonfinite: bool) -> tuple[float, bool]:
        grad_norm, skipped = super().update(optimizer, model, precision, max_norm, nonfinite)
        self.inner_steps += 1
        if self.inner_steps % self.cfg.local_steps == 0:
            self.average()
        return grad_norm, skipped

    @torch.no_grad()
    def average(self) -> None:
        """Collective: the outer step on the workers' mean delta; every replica takes its result."""
        deltas = [anchor - param for anchor, param in zip(self.anchors, self.params)]
        handles = [self.hvd.allreduce_async_(delta, op=self.hvd.Average, name=f"local_sgd.delta.{i}")
                   for i, delta in enumerate(deltas)]  # all enqueued first: Horovod fuses them
        for anchor, delta, handle in zip(self.anchors, deltas, handles):
            self.hvd.synchronize(handle)
            anchor.grad = delta  # the pseudo-gradient: descending it moves towards the mean replica
        self.outer.step()
        for anchor, param in zip(self.anchors, self.params):
            param.copy_(anchor)
        self.comm_bytes += sum(d.numel() * d.element_size() for d in deltas)
        self.rounds += 1

    def step_metrics(self) -> dict:
        return {"comm_bytes": self.comm_bytes, "local_sgd_rounds": self.rounds}

    def state_dict(self, model: nn.Module, optimizer) -> dict:
        state = super().state_dict(model, optimizer)
        state["local_sgd"] = {"anchors": [a.detach().clone() for a in self.anchors],
                              "outer": self.outer.state_dict(), "inner_steps": self.inner_steps,
                              "rounds": self.rounds, "comm_bytes": self.comm_bytes}
        return state

    def load_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        super().load_state_dict(model, optimizer, state)
        saved = state.get("local_sgd")
        if saved is None:
            raise UserError("the checkpoint was not written by parallel.strategy=local-sgd (no outer optimizer "
                            "state): resume it with its own strategy")
        with torch.no_grad():
            for anchor, value in zip(self.anchors, saved["anchors"]):
                anchor.copy_(value)
        self.outer.load_state_dict(saved["outer"])
        self.inner_steps, self.rounds = int(saved["inner_steps"]), int(saved["rounds"])
        self.comm_bytes = int(saved["comm_bytes"])
        self.restored = True
