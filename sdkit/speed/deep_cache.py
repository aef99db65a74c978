"""DeepCache: reuse the UNet's deep features across sampling steps (Ma et al. 2023, "DeepCache: Accelerating
Diffusion Models for Free").

Between neighbouring sampling steps the UNet's high-level features (everything below its first levels) change
little; the shallow levels, which carry the fine detail, change more. DeepCache runs the whole UNet on every
``interval``-th call, keeps the feature map that enters the last ``branch + 1`` output blocks, and on the calls in
between runs only the first ``branch + 1`` input blocks and those last output blocks, taking the deep part from the
cache. With the CompVis layout (``input_blocks[i]`` pairs with ``output_blocks[n - 1 - i]`` through the skip
connection) the shallow path is exact: a cached call equals a full call whenever the deep features would be
unchanged. ``interval=1`` is the plain UNet.

    with deep_cache(model, interval=3):              # a full UNet call, then two cheap ones, and again
        txt2img(model, "a red circle", steps=20)

The cache is refreshed by counting UNet calls (one per step for single-step samplers, two for Heun), and keyed by
the batch shape: a call with another shape (e.g. no guidance batch) runs the full UNet. The UNet's ``forward`` is
replaced on the instance for the duration of the block, so the module, its weights and its keys are unchanged.
"""
from __future__ import annotations

import contextlib
import types

import torch

from ..nn.unet import timestep_embedding


class DeepCacheState:
    """The call counter and the cached deep features of one UNet."""

    def __init__(self, interval: int, branch: int):
        self.interval, self.branch = interval, branch
        self.calls = 0
        self.full_calls = 0
        self.cached: torch.Tensor | None = None

    def forward(self, unet, x, timesteps=None, context=None, y=None):
        """The UNet's forward, with the deep part taken from the cache on all but every ``interval``-th call."""
        timesteps = unet._check_inputs(x, timesteps, context, y)
        dtype = unet.input_blocks[0][0].weight.dtype
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(dtype))
        if unet.num_classes is not None:
            emb = emb + unet.label_emb(y)
        if isinstance(context, torch.Tensor):
            context = context.to(dtype)
        n, shallow = len(unet.input_blocks), self.branch + 1
        use_cache = (self.calls % self.interval != 0 and self.cached is not None
                     and self.cached.shape[0] == x.shape[0])
        self.calls += 1
        h, skips = x.to(dtype), []
        for module in unet.input_blocks[: shallow if use_cache else n]:
            h = module(h, emb, context)
            skips.append(h)
        if use_cache:
            h = self.cached
        else:
            self.full_calls += 1
            h = unet.middle_block(h, emb, context)
            for module in unet.output_blocks[: n - shallow]:
                h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
            self.cached = h
        for module in unet.output_blocks[n - shallow:]:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        head = unet.id_predictor if unet.predict_codebook_ids else unet.out
        return head(h).type(x.dtype)


@contextlib.contextmanager
def deep_cache(model, interval: int = 3, branch: int = 0):
    """Run ``model``'s UNet with DeepCache inside the block; yields the state (``calls``, ``full_calls``).

    ``interval``: a full UNet call every this many calls (1 = off). ``branch``: how many of the first levels'
    blocks run on cached calls besides the first (0 = only ``input_blocks[0]`` and ``output_blocks[-1]``, the
    fastest; larger is more faithful and slower)."""
    unet = getattr(model, "unet", model)
    if not hasattr(unet, "input_blocks"):
        raise TypeError(f"deep_cache needs a LatentDiffusion model or a UNetModel, got {type(model).__name__}")
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a whole number ≥ 1 (a full UNet call every `interval` calls), "
                         f"got {interval!r}")
    if not isinstance(branch, int) or not 0 <= branch < len(unet.input_blocks) - 1:
        raise ValueError(f"branch must be between 0 and {len(unet.input_blocks) - 2} for this UNet, got {branch!r}")
    state = DeepCacheState(interval, branch)
    unet.forward = types.MethodType(lambda self, *args, **kwargs: state.forward(self, *args, **kwargs), unet)
    try:
        yield state
    finally:
        del unet.forward   # back to the class's forward
