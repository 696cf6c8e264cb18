"""Small sequence models with a choice of token mixer: a pre-LN encoder and a byte-level LM.

References: arXiv 2310.13807 (MTTT in a ViT, raw-pixel sequences); arXiv 2407.04620 (TTT LM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfmod.arch.choice import Choice
from selfmod.ttt.layers import (
    MTTTMLP,
    TTTMLP,
    ConvMixer,
    LinearAttention,
    MTTTLinear,
    SoftmaxAttention,
    TTTLinear,
)

__all__ = ["MIXERS", "Block", "CausalLM", "SequenceClassifier", "make_mixer", "mixer_choice"]

# name -> (constructor, causal?)
MIXERS: dict[str, tuple[type[nn.Module], bool]] = {
    "mttt_linear": (MTTTLinear, False),
    "mttt_mlp": (MTTTMLP, False),
    "linear_attention": (LinearAttention, False),
    "softmax_attention": (SoftmaxAttention, False),
    "ttt_linear": (TTTLinear, True),
    "ttt_mlp": (TTTMLP, True),
    "conv": (ConvMixer, False),
}


def make_mixer(name: str, dim: int, heads: int, causal: bool = False, **kwargs: Any) -> nn.Module:
    """A token mixer ``(B, N, dim) -> (B, N, dim)`` by name (see :data:`MIXERS`).

    Attention and convolution mixers take ``causal``; MTTT mixers are bidirectional only and
    TTT mixers causal only, so asking for the other raises.
    """
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    cls, is_causal = MIXERS[name]
    if cls in (LinearAttention, SoftmaxAttention, ConvMixer):
        return cls(dim, heads, causal=causal, **kwargs)
    if causal != is_causal:
        kind = "causal" if is_causal else "bidirectional"
        raise ValueError(f"mixer {name!r} is {kind} only (got causal={causal})")
    return cls(dim, heads, **kwargs)


def mixer_choice(
    names: Sequence[str], dim: int, heads: int, causal: bool = False, **ttt: Any
) -> Choice:
    """A :class:`~selfmod.arch.Choice` among the token mixers ``names`` (:data:`MIXERS`), which
    a run makes by its guard loss; ``ttt``: keyword arguments of the TTT mixers only (e.g.
    ``mini_batch``, ``tune_lr=True``: their inner rate a hyperparameter the run tunes)."""
    return Choice(
        {
            n: make_mixer(n, dim, heads, causal, **(ttt if n.startswith("ttt") else {}))
            for n in names
        }
    )


class Block(nn.Module):
    """Pre-LN block: ``x + mixer(LN(x))`` then ``x + MLP(LN(x))`` with a 4x GELU MLP."""

    def __init__(self, dim: int, mixer: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.ln1(x))  # (B, N, dim)
        return x + self.mlp(self.ln2(x))


class SequenceClassifier(nn.Module):
    """Classify a flat signal ``(B, D)`` read as ``N = D / patch`` tokens of ``patch`` values.

    Tokens are embedded linearly with a learned position embedding, pass ``depth`` pre-LN
    blocks with the chosen mixer, are mean-pooled and classified.

    References: arXiv 2310.13807, section 6 (raw-pixel sequences).
    """

    def __init__(
        self,
        seq_len: int,
        num_classes: int,
        mixer: str = "mttt_linear",
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        patch: int = 1,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        if seq_len % patch:
            raise ValueError(f"seq_len ({seq_len}) must be divisible by patch ({patch})")
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len // patch, dim))
        self.blocks = nn.ModuleList(
            Block(dim, make_mixer(mixer, dim, heads, **mixer_kwargs)) for _ in range(depth)
        )
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.unflatten(-1, (-1, self.patch))) + self.pos  # (B, N, dim)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).mean(1))  # (B, num_classes)

    def inner_losses(self) -> list[Tensor]:
        """Last tracked inner-loss curves ``(steps + 1,)`` of the MTTT mixers, one per block."""
        return [
            b.mixer.inner_losses
            for b in self.blocks
            if getattr(b.mixer, "inner_losses", None) is not None
        ]


class CausalLM(nn.Module):
    """Byte-level causal language model: ``bytes (B, T) -> logits (B, T, 256)``.

    References: arXiv 2407.04620, section 3 (TTT layers in a Transformer backbone).
    """

    def __init__(
        self,
        mixer: str = "ttt_linear",
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 1024,
        vocab: int = 256,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, dim))
        self.blocks = nn.ModuleList(
            Block(dim, make_mixer(mixer, dim, heads, causal=True, **mixer_kwargs))
            for _ in range(depth)
        )
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        T, max_len = idx.shape[1], self.pos.shape[0]
        if max_len < T:
            raise ValueError(f"sequence length {T} exceeds max_len {max_len}; build a larger model")
        h = self.embed(idx) + self.pos[:T]  # (B, T, dim)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))  # (B, T, vocab)

    def loss(self, idx: Tensor) -> Tensor:
        """Next-byte cross-entropy (nats per byte) of ``idx (B, T)``."""
        logits = self(idx[:, :-1])  # (B, T-1, vocab)
        return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
