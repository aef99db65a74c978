"""The small transformer encoder of the latent-diffusion text models (LDM text2img BERTEmbedder).

CompVis/latent-diffusion trained its text encoder with a trimmed copy of lucidrains' x-transformers
(`ldm/modules/x_transformer.py`): `TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(dim, depth))`.
This file rebuilds only the configuration those checkpoints use (pre-norm LayerNorm, 8 heads of 64, GELU
feed-forward x4, learned absolute positions, final LayerNorm), with the same module names, so the state-dict
keys are the same:

    token_emb.weight, pos_emb.emb.weight,
    attn_layers.layers.{2i}.0.{weight,bias}        LayerNorm before attention
    attn_layers.layers.{2i}.1.to_{q,k,v}.weight    (no bias), .1.to_out.{weight,bias}
    attn_layers.layers.{2i+1}.0.{weight,bias}      LayerNorm before the feed-forward
    attn_layers.layers.{2i+1}.1.net.0.0.*          Linear dim -> 4 dim (net.0.1 is GELU, net.1 Dropout)
    attn_layers.layers.{2i+1}.1.net.2.*            Linear 4 dim -> dim
    norm.{weight,bias}, to_logits.{weight,bias}    (to_logits is unused with return_embeddings=True but is saved)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DIM_HEAD = 64


class AbsolutePositionalEmbedding(nn.Module):
    """A learned vector per position, added to the token embeddings."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None]


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear, nested as x-transformers nests it (net.0.0 and net.2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention with bias-free q/k/v projections (scaled_dot_product_attention inside)."""

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        inner = dim_head * heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, dim]; mask: optional bool [B, N], False for padding keys that must not be attended to."""
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Encoder(nn.Module):
    """`depth` pre-norm blocks, each an attention layer then a feed-forward layer, with residual connections.

    `layers` alternates [LayerNorm, Attention] and [LayerNorm, FeedForward] (x-transformers also appends a
    parameter-free residual module to each entry; it has no weights, so it is left out here).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        attn_dropout: float = 0.0,
        ff_mult: int = 4,
        ff_dropout: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), Attention(dim, attn_dim_head, heads, attn_dropout)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim, ff_mult, ff_dropout)]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for norm, block in self.layers:
            if isinstance(block, Attention):
                x = x + block(norm(x), mask=mask)
            else:
                x = x + block(norm(x))
        return x


class TransformerWrapper(nn.Module):
    """Token + position embeddings, an `Encoder`, a final LayerNorm; logits or (return_embeddings) hidden states."""

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: Encoder,
        emb_dropout: float = 0.0,
        use_pos_emb: bool = True,
    ):
        super().__init__()
        dim = attn_layers.dim
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(
        self, x: torch.Tensor, return_embeddings: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: LongTensor [B, N] of token ids -> [B, N, dim] (return_embeddings) or logits [B, N, num_tokens]."""
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"TransformerWrapper takes integer token ids, got a {x.dtype} tensor.")
        if x.shape[1] > self.max_seq_len:
            raise ValueError(
                f"Got {x.shape[1]} tokens but this text encoder has only {self.max_seq_len} positions; "
                "truncate the tokens (the tokenizer's max_length) or build it with a larger max_seq_len."
            )
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.num_tokens):
            raise ValueError(
                f"Token ids must lie in [0, {self.num_tokens - 1}] (vocab_size); got ids from {int(x.min())} "
                f"to {int(x.max())}. Was the text tokenized with a different vocabulary?"
            )
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(h)
        h = self.emb_dropout(h)
        h = self.norm(self.attn_layers(h, mask=mask))
        return h if return_embeddings else self.to_logits(h)
