"""Attention layers of the SD v1 UNet, in the layout of CompVis `ldm/modules/attention.py`.

Parameter names (`to_q`, `ff.net.0.proj`, `proj_in`, ...) are the checkpoint contract and must not change.
All softmax attention goes through `torch.nn.functional.scaled_dot_product_attention`, which computes
the same softmax(q k^T * scale) v as CompVis's einsum code, with less memory.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def run_checkpointed(function, *args, enabled, module):
    """Call `function(*args)`; with `enabled`, recompute its activations during backward to save memory.

    Checkpointing only pays off while training with gradients, so it is skipped in eval mode and under no_grad.
    """
    if enabled and module.training and torch.is_grad_enabled():
        return torch_checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def zero_module(module):
    """Zero the parameters of `module` and return it (CompVis starts residual branches at zero)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def Normalize(in_channels):
    """The GroupNorm of the transformer and the first-stage blocks: 32 groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def _split_heads(t, heads):
    """[b, n, heads * d] -> [b, heads, n, d]"""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv applied to tokens [b, n, c_in] -> [b, n, c_out] (the same numbers as the conv on the pixels)."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class GEGLU(nn.Module):
    """Gated GELU: one projection to 2*dim_out, split into value and gate, value * gelu(gate)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """MLP of the transformer block: `net.0` (GEGLU or Linear+GELU), `net.1` Dropout, `net.2` Linear."""

    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        project_in, dropout, project_out = self.net
        x = project_in(x)
        return project_out(dropout(x) if self.training and dropout.p else x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values from `context` (self-attention without it).

    `mask` (optional, bool [batch, context tokens], True = attend) hides context tokens, as in CompVis.
    The attention itself is computed by a replaceable *processor* (``self.processor``; None = the default
    :func:`fused_attention`): ``processor(attn, x, context, mask) -> output``, built from the pieces below
    (``heads_qkv``, ``score_bias``, ``probabilities``, ``output``). Recording maps, editing them (prompt-to-prompt)
    or adding adapters are processors installed through ``sdkit.nn.attention_processors``, never branches here.
    """

    processor = None

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        return (self.processor or fused_attention)(self, x, context, mask)

    # ---------------------------------------------------------------- the pieces processors are built from
    def heads_qkv(self, x, context=None):
        """Queries from ``x``, keys and values from ``context`` (``x`` itself for self-attention), each
        [batch, heads, tokens, dim_head]."""
        context = x if context is None else context
        expected = self.to_k.in_features
        if context.shape[-1] != expected:
            raise ValueError(
                f"CrossAttention expects context vectors of size {expected}, got a context of shape "
                f"{tuple(context.shape)}. Use a text encoder whose width matches the UNet's context_dim."
            )
        return tuple(_split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))

    @staticmethod
    def score_bias(mask, q):
        """The additive score mask for a bool token mask [batch, tokens] (None passes through). CompVis fills
        masked scores with -max (not -inf), so a fully masked row stays finite."""
        if mask is None:
            return None
        keep = mask.reshape(mask.shape[0], 1, 1, -1).bool()
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
        return bias.masked_fill(~keep, -torch.finfo(q.dtype).max)

    def probabilities(self, q, k, bias=None):
        """softmax(q kᵀ · scale + bias): [batch, heads, queries, keys], computed explicitly (what the fused
        kernel never materialises)."""
        scores = (q @ k.transpose(-1, -2)) * self.scale
        if bias is not None:
            scores = scores + bias
        return scores.softmax(dim=-1)

    def output(self, out, x):
        """[batch, heads, queries, dim_head] -> merged heads -> ``to_out``, shaped like ``x``."""
        linear, dropout = self.to_out
        out = linear(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return dropout(out) if self.training and dropout.p else out


def fused_attention(attn: CrossAttention, x, context=None, mask=None):
    """The default processor: one fused ``scaled_dot_product_attention`` call (never materialises the maps)."""
    q, k, v = attn.heads_qkv(x, context)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.score_bias(mask, q), scale=attn.scale)
    return attn.output(out, x)


def explicit_attention(attn: CrossAttention, x, context=None, mask=None):
    """The same attention with the softmax computed explicitly (the base of recorders and editors)."""
    q, k, v = attn.heads_qkv(x, context)
    return attn.output(attn.probabilities(q, k, attn.score_bias(mask, q)) @ v, x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on the context, gated feed-forward.

    `checkpoint=True` (the CompVis default) recomputes activations in backward while training.
    """

    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return run_checkpointed(self._forward, x, context, enabled=self.checkpoint, module=self)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, 1x1 conv in, `depth` blocks, zero-init 1x1 conv out.

    `context_dim` may be one size or a list with one size per block; `context` then is one tensor or a list.
    `checkpoint` is passed to the blocks (CompVis always checkpoints them; the result is the same either way).
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None, checkpoint=True):
        super().__init__()
        if not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        if len(context_dim) != depth:
            raise ValueError(
                f"SpatialTransformer got {len(context_dim)} context_dim entries for depth {depth}; "
                "give one size, or a list with one size per transformer block."
            )
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim, n_heads, d_head, dropout=dropout, context_dim=dim, checkpoint=checkpoint
                )
                for dim in context_dim
            ]
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x, context=None):
        if not isinstance(context, (list, tuple)):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        # The 1x1 convs act on each pixel's channels: applied to the tokens [b, h·w, c] as matrix products with
        # the conv weights (the checkpoint keeps the conv shapes). The tokens are contiguous for the blocks, and
        # the output comes back in x's own layout: a channels-last view of the tokens reaching the next 3x3 conv
        # would make every later conv re-lay its (up to 118 MB) weight out per call.
        x_in = x
        x = _pointwise(self.proj_in, self.norm(x).flatten(2).transpose(1, 2))  # b c h w -> b (h w) c
        for block, block_context in zip(self.transformer_blocks, context):
            x = block(x, context=block_context)
        return x_in + _pointwise(self.proj_out, x).transpose(1, 2).view(b, c, h, w)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H·W positions, with 1x1 convs for q, k, v and the output projection,
    and a residual connection. Scale C^-0.5 (the default of scaled_dot_product_attention). The autoencoder's
    ``AttnBlock`` is this layer under its CompVis name."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape
        # (B, C, H, W) -> (B, 1 head, H·W tokens, C), contiguous: with channels strided, CPU attention falls back
        # to the kernel that materialises the (H·W)² weight matrix
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3).contiguous()
                   for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


class LinearAttention(nn.Module):
    """Linear-complexity attention: softmax over pixels on the keys, then context = K V^T, out = context^T Q.

    Unscaled and without a softmax on the queries, exactly as CompVis writes it.
    """

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, self.heads, -1, h * w)  # b (qkv heads c) h w
        q, k, v = qkv.unbind(dim=1)  # each [b, heads, c, n]
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class LinAttnBlock(LinearAttention):
    """LinearAttention with one head as wide as the input, a drop-in for the autoencoder's AttnBlock."""

    def __init__(self, in_channels):
        super().__init__(dim=in_channels, heads=1, dim_head=in_channels)
