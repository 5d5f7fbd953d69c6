"""Local SGD / DiLoCo (Douillard et al. 2023) on Horovod: H local steps, then one averaging of the
parameter deltas with an outer Nesterov SGD step.
What still travels every step, evaluation and checkpoints: docs/design/parallel.md (Local SGD).
"""

from __future__ import annotations

import torch
from torch import nn

from hvdllm.errors import UserError
from hvdllm.parallel.update import UpdateRule

STATS_BYTES = 3 * 8  # the float64 step statistics, allreduced every step


def check_local_sgd_layout(cfg, layout) -> None:
    """Refuse, with one line, what local SGD does not do: checked before Horovod starts."""
    parallel = cfg.parallel
    if layout.servers:
        raise UserError("parallel.strategy=local-sgd averages the workers' own replicas: use parallel.servers=0")
    if parallel.op != "average" or parallel.compression != "none":
        raise UserError("parallel.strategy=local-sgd averages parameter deltas at full precision: "
                        "use parallel.op=average and parallel.compression=none")
    if cfg.train.precision == "fp16":
        raise UserError("parallel.strategy=local-sgd with train.precision=fp16: per-worker loss scales would "
                        "drift apart; use bf16 or fp32")


class LocalSGDUpdate(UpdateRule):
    """Each replica steps on its own; every H steps its data group averages the deltas from the
    anchor and takes the outer step (per pipeline stage under a pipeline)."""

    replicas_differ = True  # between averagings each replica's parameters and inner moments are its own

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
    def needs_broadcast(self) -> bool:
        return not self.restored  # each rank loaded its own shard; the anchors and outer state are alike

    @torch.no_grad()
    def after_broadcast(self) -> None:
        for anchor, param in zip(self.anchors, self.params):
            anchor.copy_(param)

    def reduce_gradients(self, optimizer) -> None:
        self.comm_bytes += STATS_BYTES  # only the step statistics travel

    def after_update(self) -> None:
        self.inner_steps += 1
        if self.inner_steps % self.cfg.local_steps == 0:
            self.average()

    @torch.no_grad()
    def average(self) -> None:
        """Collective in the data group: the outer step on the replicas' mean delta; every
        replica takes its result. A data group of one replica (a single pipeline) is its mean."""
        hvd, process_set = self.hvd, self.data_group.process_set
        deltas = [anchor - param for anchor, param in zip(self.anchors, self.params)]
        if process_set is not None:
            handles = [hvd.allreduce_async_(delta, op=hvd.Average, name=f"local_sgd.delta.{i}", process_set=process_set)
                       for i, delta in enumerate(deltas)]  # all enqueued first: Horovod fuses them
            for handle in handles:
                hvd.synchronize(handle)
            self.comm_bytes += sum(d.numel() * d.element_size() for d in deltas)
        for anchor, delta in zip(self.anchors, deltas):
            anchor.grad = delta  # the pseudo-gradient: descending it moves towards the mean replica
        self.outer.step()
        for anchor, param in zip(self.anchors, self.params):
            param.copy_(anchor)
        self.rounds += 1

    def step_metrics(self) -> dict:
        return {"comm_bytes": self.comm_bytes, "local_sgd_rounds": self.rounds}

    def state_dict(self) -> dict:
        return {"anchors": [a.detach().clone() for a in self.anchors], "outer": self.outer.state_dict(),
                "inner_steps": self.inner_steps, "rounds": self.rounds, "comm_bytes": self.comm_bytes}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise UserError("the checkpoint was not written by parallel.strategy=local-sgd (no outer optimizer "
                            "state): resume it with its own strategy")
        with torch.no_grad():
            for anchor, value in zip(self.anchors, state["anchors"]):
                anchor.copy_(value)
        self.outer.load_state_dict(state["outer"])
        self.inner_steps, self.rounds = int(state["inner_steps"]), int(state["rounds"])
        self.comm_bytes = int(state["comm_bytes"])
        self.restored = True
