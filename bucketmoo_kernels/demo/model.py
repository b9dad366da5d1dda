"""A small byte-level decoder language model in plain PyTorch.

Bytes are the tokens (vocabulary 256), so every language and script shares one embedding
table and no tokenizer files are needed. The architecture is a standard pre-LayerNorm GPT
block stack (causal self-attention + GELU MLP) with learned positions and a tied output
head; the defaults give about 0.6M parameters, enough to show per-language learning
curves on two CPU cores in minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "ByteLM"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`ByteLM`.

    Attributes:
        context: tokens (bytes) per sequence.
        d_model: width of the residual stream; must be divisible by ``n_head``.
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        vocab: vocabulary size (256 for bytes).
    """

    context: int = 64
    d_model: int = 128
    n_layer: int = 3
    n_head: int = 4
    vocab: int = 256

    def __post_init__(self):
        for name in ("context", "d_model", "n_layer", "n_head", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"ModelConfig.d_model ({self.d_model}) must be divisible by "
                             f"n_head ({self.n_head})")

    def as_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    """Decoder-only byte language model.

    ``forward(tokens [B, L] int64) -> logits [B, L, vocab] float32`` with ``L <= context``;
    :meth:`loss` gives the mean next-byte cross-entropy in nats.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.cfg.context:
            raise ValueError(f"tokens must be [batch, length <= {self.cfg.context}]; "
                             f"got shape {tuple(tokens.shape)}")
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.t()

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats) of ``targets [B, L]`` given ``inputs [B, L]``."""
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
