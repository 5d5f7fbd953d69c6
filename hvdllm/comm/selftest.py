"""A Horovod allreduce whose sum is checked on every rank: ``mpirun -np N python -m hvdllm.comm.selftest``."""

from __future__ import annotations

import sys

import torch

from hvdllm import comm


def main() -> int:
    comm.init(threads=1)
    hvd = comm.horovod()

    n = comm.size()
    # Rank r contributes r + 1 everywhere, so every element must sum to n (n + 1) / 2.
    total = hvd.allreduce(torch.full((1024,), float(comm.rank() + 1)), op=hvd.Sum, name="selftest")
    expected = n * (n + 1) / 2
    ok = bool(torch.all(total == expected))
    if not ok:
        print(f"rank {comm.rank()}: allreduce gave {total[0].item()}, expected {expected}", file=sys.stderr)
    oks = hvd.allgather_object(ok, name="selftest_ok")
    comm.print0(f"allreduce over {n} ranks: sum {total[0].item():g} (expected {expected:g}): "
                f"{'ok' if all(oks) else 'WRONG'}")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
