"""Mixed precision for one training step: the autocast region and the fp16 loss scaler.

Kept apart from the strategies so that every one of them (a replica, a pipeline stage)
runs forward and backward the same way; the loss scale is one number agreed by all ranks
because the non-finite check that drives it is reduced with the step statistics.
"""

from __future__ import annotations

import contextlib

import torch

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``train.precision`` on one device: fp32, bf16 autocast, or fp16 autocast with a
    dynamic loss scaler (fp16 gradients underflow without one)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.dtype = _AMP_DTYPES.get(name)
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self):
        """The region in which forward runs (and nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss``, scaled first when there is a loss scaler."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
