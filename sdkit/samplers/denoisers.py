"""From a model to the ε-function the samplers call: everything that adapts a model lives here.

The samplers of this package are pure loops over a noise grid; they never see a model, only
``eps_fn(x, t) -> ε``. This module builds that function from a LatentDiffusion (k-diffusion's ``external.py`` plays
the same part there):

- :func:`model_eps_fn`: ``apply_model`` as ``ε(x, t, cond)`` (x₀-parameterised models are converted to ε);
- :func:`cfg_combine`: classifier-free guidance (Ho & Salimans 2022), ε = ε_u + s·(ε_c − ε_u), the one place the
  formula is written;
- :func:`cfg_eps_fn`: guidance as a wrapper around any ``ε(x, t, cond)``: one batched pass over
  ``cat([uncond, cond])``, exactly as CompVis' DDIM, PLMS and DPM-Solver wrappers do; scale 1 or no
  unconditional conditioning skips the extra pass. ``scale`` may be a float or one value per sample;
- :func:`hybrid_conditioning`: the ``{"c_concat", "c_crossattn"}`` dict of concat/hybrid models (the 9-channel
  inpainting UNet, the upscalers);
- :func:`denoiser`: all of it in one call, what the pipelines, training previews, CompVis sampler classes and
  widgets use.
"""
from __future__ import annotations

from typing import Callable

import torch

ModelEpsFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_eps_fn(model, alphas_cumprod: torch.Tensor | None = None) -> ModelEpsFn:
    """``model.apply_model`` as ``ε(x, t, cond)`` for float timesteps ``t`` [B].

    Integer-valued timesteps reach the model as ``long`` (as CompVis hands them over). An x₀-parameterised model's
    output is turned into ε = (x − √ᾱ x̂₀)/√(1−ᾱ), with ᾱ interpolated log-linearly between integer timesteps."""
    alphas_cumprod = model.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    log_ac = alphas_cumprod.detach().double().log()

    def eps_fn(x, t, c):
        t_model = t.long() if bool((t == t.round()).all()) else t
        out = model.apply_model(x, t_model, c)
        if getattr(model, "parameterization", "eps") != "x0":
            return out
        pos = t.double().clamp(0, len(log_ac) - 1)
        lo = pos.floor().long().clamp(max=len(log_ac) - 2)
        a = torch.exp(log_ac[lo] + (pos - lo) * (log_ac[lo + 1] - log_ac[lo])).to(x).reshape(-1, *[1] * (x.ndim - 1))
        return (x - a.sqrt() * out) / (1 - a).sqrt()
    return eps_fn


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: ε_u + s·(ε_c − ε_u). ``scale``: a number, or a tensor with one value per sample.

    As scores (ε = −√(1−ᾱ) ∇log p), this is ∇log p(x) + s·(∇log p(x|c) − ∇log p(x)): the score of
    p(x)·p(c|x)^s, an implicit classifier raised to the power s."""
    if isinstance(scale, torch.Tensor):
        scale = scale.to(eps_cond).reshape(-1, *[1] * (eps_cond.ndim - 1))
    return eps_uncond + scale * (eps_cond - eps_uncond)


def batch_size_of(cond) -> int | None:
    """The batch size of a conditioning: a tensor, a list of tensors, or a dict of those (None if it has none)."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, dict):
        for value in cond.values():
            size = batch_size_of(value[0] if isinstance(value, (list, tuple)) else value)
            if size is not None:
                return size
    if isinstance(cond, (list, tuple)) and cond:
        return batch_size_of(cond[0])
    return None


def concat_conditioning(uncond, cond):
    """``cat([uncond, cond])`` for a tensor, a list of tensors, or a dict of those (hybrid models:
    ``{"c_concat": [...], "c_crossattn": [...]}``), concatenated entry by entry."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise TypeError(f"cond is a tensor, so uncond must be one too (got {type(uncond).__name__})")
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"uncond {tuple(uncond.shape)} and cond {tuple(cond.shape)} must have the same shape "
                             "after the batch dimension (encode the empty prompt with the same encoder and padding)")
        return torch.cat([uncond, cond])
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError("cond is a list, so uncond must be a list of the same length")
        return [concat_conditioning(u, c) for u, c in zip(uncond, cond)]
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(uncond) != set(cond):
            raise ValueError(f"cond is a dict with keys {sorted(cond)}, so uncond must be a dict with the same keys")
        return {key: concat_conditioning(uncond[key], cond[key]) for key in cond}
    raise TypeError(f"conditioning must be a tensor, a list of tensors or a dict of those, got {type(cond).__name__}")


def is_guided(uncond, scale) -> bool:
    """Whether guidance needs the unconditional pass (not at scale 1, nor without an unconditional input)."""
    return uncond is not None and not (isinstance(scale, (int, float)) and scale == 1.0)


def cfg_eps_fn(model_eps: ModelEpsFn, cond, uncond=None, scale=1.0) -> EpsFn:
    """Turn ``model_eps(x, t, c)`` into a guided ``eps_fn(x, t)`` for the samplers."""
    guided = is_guided(uncond, scale)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided:
            return model_eps(x, t, cond)
        size = batch_size_of(cond)
        if size is not None and size != x.shape[0]:
            raise ValueError(f"the conditioning has batch size {size} but x has {x.shape[0]}; "
                             "pass one conditioning (and one unconditional conditioning) per sample")
        eps_u, eps_c = model_eps(torch.cat([x, x]), torch.cat([t, t]), concat_conditioning(uncond, cond)).chunk(2)
        return cfg_combine(eps_u, eps_c, scale)

    return eps_fn


def hybrid_conditioning(text: torch.Tensor | None, concat: list[torch.Tensor]) -> dict:
    """Conditioning for a concat (``text=None``: super-resolution) or hybrid (text + concat: the 9-channel
    inpainting UNet, text-guided upscalers) model: ``{"c_concat": concat, "c_crossattn": [text]}``."""
    return {"c_concat": list(concat)} if text is None else {"c_concat": list(concat), "c_crossattn": [text]}


def denoiser(model, cond, uncond=None, scale=1.0, concat: list[torch.Tensor] | None = None) -> EpsFn:
    """The model's guided ε-function ``eps_fn(x, t)``.

    ``cond``/``uncond``: encoded prompts (or any conditioning ``apply_model`` takes); ``uncond`` None or
    ``scale == 1`` means no guidance. ``concat``: images concatenated to the UNet input (hybrid/concat models);
    both branches of guidance get the same ``concat``, and only ``cond``/``uncond`` differ."""
    if concat is not None:
        cond = hybrid_conditioning(cond, concat)
        uncond = None if uncond is None else hybrid_conditioning(uncond, concat)
    return cfg_eps_fn(model_eps_fn(model), cond, uncond, scale)


__all__ = ["model_eps_fn", "cfg_combine", "cfg_eps_fn", "batch_size_of", "concat_conditioning", "is_guided",
           "hybrid_conditioning", "denoiser"]
