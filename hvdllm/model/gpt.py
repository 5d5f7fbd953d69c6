"""A GPT decoder in plain PyTorch (no distributed code here; see hvdllm.parallel).

Pre-LayerNorm blocks with causal self-attention through ``F.scaled_dot_product_attention``,
a GELU MLP and residual connections, as in GPT-2/GPT-3. The blocks live in an
``nn.ModuleList`` so a contiguous range of them can be cut out as a pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hvdllm.choices import INIT_STRATEGIES, POSITIONS


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # maximum context length
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    position: str = "learned"  # learned | rope
    init: str = "gpt2"  # gpt2 | xavier | kaiming | small
    checkpoint_every: int = 0  # activation checkpointing of every k-th block; 0 = off

    def __post_init__(self) -> None:
        for name, choices in (("position", POSITIONS), ("init", INIT_STRATEGIES)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"model.{name} must be one of {', '.join(choices)}; got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model {self.d_model} is not divisible by model.n_head {self.n_head}")
        if self.position == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("model.position=rope needs an even head dimension (d_model / n_head)")


def rope_tables(seq_len: int, head_dim: int, device: torch.device, base: float = 10000.0):
    """cos and sin of rotary position embeddings (Su et al. 2021), each (T, head_dim / 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x (B, H, T, D) by position-dependent angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.rope = cfg.position == "rope"
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            cos, sin = rope_tables(T, C // self.n_head, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)): pre-LayerNorm residual block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        from hvdllm.model.init import init_weights

        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.loss_function = WholeVocabularyLoss()  # tensor parallelism puts a vocabulary-parallel one here
        # Parts the residual stream between blocks is cut into along time (sequence parallelism sets it).
        self.sequence_shards = 1
        init_weights(self, cfg)

    def compile_blocks(self) -> None:
        """torch.compile every block in place, as torchtitan does: the blocks are nearly all of
        the work and all alike, and parameter names, hooks and pipeline cuts stay as they are
        (a compiled wrapper of the whole model would rename every key of the state dict)."""
        for block in self.blocks:
            block.compile(fullgraph=True)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); without token/position tables if asked."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
            if not self.cfg.tie_weights:
                total -= self.lm_head.weight.numel()
        return total

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embeddings: (B, T) ids -> (B, T, C)."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.cfg.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        return self.drop(x)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks [start, stop) on x (B, T, C), checkpointing every k-th one while training."""
        k = self.cfg.checkpoint_every
        for i in range(start, len(self.blocks) if stop is None else stop):
            block = self.blocks[i]
            if k and self.training and torch.is_grad_enabled() and i % k == 0:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and output projection: (B, T, C) -> logits (B, T, V)."""
        return self.lm_head(self.ln_f(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None):
        """Returns (logits (B, T, V), loss or None). ``loss_mask`` (B, T) keeps tokens where 1."""
        logits = self.head(self.run_blocks(self.embed(idx)))
        if targets is None:
            return logits, None
        return logits, self.loss_function(logits, targets, loss_mask)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations of idx (B, T); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def _weighted_token_losses(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy in fp32 (B*T,) and the mask's weights (B*T,), ones when None."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    weights = torch.ones_like(losses) if loss_mask is None else loss_mask.flatten().to(losses.dtype)
    return losses, weights


def masked_loss_sums(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluation's sums over the tokens the mask keeps (all when None): sums rather than a
    mean so that they add up over batches and ranks before dividing.

    Args:
        logits: (B, T, V); cross entropy is taken in fp32 whatever their dtype.
        targets: (B, T) next-token ids.
        loss_mask: (B, T), 1 where a token counts.

    Returns:
        (loss_sum, tokens, correct), 0-dim fp32 tensors: the summed cross entropy, the number
        of tokens kept, and how many of them the argmax predicts.
    """
    losses, weights = _weighted_token_losses(logits, targets, loss_mask)
    correct = (logits.detach().argmax(-1).flatten() == targets.flatten()).to(losses.dtype)
    return (losses * weights).sum(), weights.sum(), (correct * weights).sum()


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor,
                        loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy, over the tokens the mask keeps (all when None)."""
    losses, weights = _weighted_token_losses(logits, targets, loss_mask)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


class WholeVocabularyLoss:
    """The model's loss over whole logits: :func:`language_model_loss` for training,
    :func:`masked_loss_sums` (``sums``) for evaluation."""

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        return language_model_loss(logits, targets, loss_mask)

    def sums(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return masked_loss_sums(logits, targets, loss_mask)
