"""Token merging for self-attention: attend over fewer, merged keys and values (after Bolya & Hoffman 2023,
"Token Merging for Fast Stable Diffusion", with the merge applied to the keys and values only).

Self-attention at the UNet's finest level compares every latent pixel with every other one: 4,096² scores for a
512² SD v1 image. Neighbouring pixels are often nearly the same, so many keys and values are redundant. Bipartite
soft matching merges them: one token of each 2×2 window is a destination; every other token (a source) finds its
most similar destination (cosine similarity); the ``ratio · N`` sources with the best matches are averaged into
their destinations. The queries stay one per pixel, so the output keeps its full resolution, and each merged key
carries its size s as a score bias log s ("proportional attention"): a key that stands for s identical tokens gets
exactly the attention those s tokens would have had. So merging tokens that are truly equal changes nothing, and
merging similar ones approximates.

    with token_merging(model, ratio=0.5):            # half the keys/values at layers with ≥ 1024 tokens
        txt2img(model, "a red circle")

Installed through the attention-processor hook on the self-attention layers (attn1) with at least
``min_tokens`` query tokens; cross-attention (77 text tokens) is left alone. The layer's grid is read from the
latent each UNet call sees (a forward pre-hook), so any aspect ratio works. At the small model's 16×16 latents
there are only 256 tokens per image: the matching costs about what it saves (benchmarks/speed_switches.py).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..nn.attention import fused_attention
from ..nn.attention_processors import (
    attention_layers,
    restore_attention_processors,
    set_attention_processor,
)


def merge_tokens(x: torch.Tensor, grid: tuple[int, int], ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``ratio`` of the tokens of ``x`` [batch, H·W, C] (a row-major H × W grid) into their most similar
    2×2-window destination. Returns the merged tokens [batch, M, C] and how many tokens each one stands for
    [batch, M] (M = H·W − round(ratio · H·W), at most the number of sources merged)."""
    batch, n, channels = x.shape
    h, w = grid
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    is_dst[::2, ::2] = True
    dst_index, src_index = is_dst.flatten().nonzero().squeeze(1), (~is_dst).flatten().nonzero().squeeze(1)
    r = min(round(ratio * n), src_index.numel())
    ones = x.new_ones(batch, n)
    if r <= 0:
        return x, ones
    unit = F.normalize(x.float(), dim=-1)
    similarity = unit[:, src_index] @ unit[:, dst_index].transpose(1, 2)       # [batch, sources, destinations]
    best, best_dst = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    src, dst = x[:, src_index], x[:, dst_index]

    def rows(t, index):
        return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    target = best_dst.gather(1, merged)                                          # [batch, r]
    sums = dst.scatter_add(1, target.unsqueeze(-1).expand(-1, -1, channels), rows(src, merged))
    sizes = ones[:, : dst_index.numel()].scatter_add(1, target, ones[:, :r])
    tokens = torch.cat([rows(src, kept), sums / sizes.unsqueeze(-1).to(sums.dtype)], dim=1)
    return tokens, torch.cat([ones[:, : kept.shape[1]], sizes], dim=1)


class TokenMerging:
    """The processor for the self-attention layers; ``latent_size`` is set before each UNet call."""

    def __init__(self, ratio: float, min_tokens: int):
        self.ratio, self.min_tokens = ratio, min_tokens
        self.latent_size: tuple[int, int] | None = None

    def grid(self, tokens: int) -> tuple[int, int]:
        lat_h, lat_w = self.latent_size
        factor = round(math.sqrt(lat_h * lat_w / tokens))
        return -(-lat_h // factor), -(-lat_w // factor)   # the UNet's stride-2 convs round up

    def __call__(self, attn, x, context=None, mask=None):
        n = x.shape[1]
        grid = self.grid(n) if self.latent_size else None
        if context is not None or grid is None or n < self.min_tokens or grid[0] * grid[1] != n:
            return fused_attention(attn, x, context, mask)
        tokens, sizes = merge_tokens(x, grid, self.ratio)
        q, k, v = _split(attn, x, tokens)
        bias = sizes.log().to(q.dtype)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        return attn.output(out, x)


def _split(attn, x, tokens):
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(tokens), attn.to_v(tokens)
    return tuple(t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))


@contextlib.contextmanager
def token_merging(model, ratio: float = 0.5, min_tokens: int = 1024):
    """Merge ``ratio`` of the keys/values of every self-attention layer with at least ``min_tokens`` query tokens
    per image, inside the block; yields the processor."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio is the fraction of tokens merged away, in [0, 1) (at most 0.75 take effect: "
                         f"one token of every 2×2 window stays), got {ratio!r}")
    unet = getattr(model, "unet", model)
    if not attention_layers(unet, "self"):
        raise ValueError(f"{type(unet).__name__} has no self-attention layers to merge tokens in")
    merging = TokenMerging(ratio, min_tokens)
    def remember_latent_size(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        merging.latent_size = tuple(x.shape[-2:])

    hook = unet.register_forward_pre_hook(remember_latent_size, with_kwargs=True)
    previous = set_attention_processor(unet, merging, kind="self")
    try:
        yield merging
    finally:
        restore_attention_processors(unet, previous)
        hook.remove()
