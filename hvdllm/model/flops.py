"""Training FLOPs of a GPT, shared by the planner and the trainer's MFU."""

from __future__ import annotations


def flops_per_token(non_embedding_params: int, n_layer: int, n_head: int, d_head: int, seq_len: int) -> int:
    """Forward + backward matmul FLOPs per token: 6 N + 12 L H Q T (PaLM, Chowdhery et al.
    2022, appendix B), N the non-embedding parameters, the second term attention's score and
    value matmuls over a context of T."""
    return 6 * non_embedding_params + 12 * n_layer * n_head * d_head * seq_len
