"""Whether the ranks of a Horovod job hold exactly the same parameters."""

import torch


def parameters_equal_on_every_rank(horovod, model: torch.nn.Module, name: str = "params_agree") -> bool:
    """Collective: every parameter of ``model`` bit-for-bit equal to rank 0's (a sum could
    hide differences that cancel)."""
    mine = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    every = horovod.allgather_object(mine, name=name)
    return all(torch.equal(every[0], other) for other in every[1:])
