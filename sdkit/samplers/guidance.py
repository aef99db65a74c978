"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the ε-function, exactly as CompVis does it in
DDIM, PLMS and the DPM-Solver wrapper: one batched pass over ``cat([uncond, cond])``, then
ε = ε_u + s·(ε_c − ε_u). Scale 1 or no unconditional conditioning skips the extra pass.
"""
from __future__ import annotations

from typing import Callable

import torch


def _batch_size(cond) -> int | None:
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, dict):
        for value in cond.values():
            size = _batch_size(value[0] if isinstance(value, (list, tuple)) else value)
            if size is not None:
                return size
    if isinstance(cond, (list, tuple)) and cond:
        return _batch_size(cond[0])
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


def cfg_eps_fn(model_eps_fn: Callable, cond, uncond=None, scale: float = 1.0) -> Callable:
    """Turn ``model_eps_fn(x, t, c)`` into a guided ``eps_fn(x, t)`` for the samplers.

    ``scale`` may be a float or a tensor with one value per sample.
    """
    guided = uncond is not None and not (isinstance(scale, (int, float)) and scale == 1.0)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided:
            return model_eps_fn(x, t, cond)
        size = _batch_size(cond)
        if size is not None and size != x.shape[0]:
            raise ValueError(f"the conditioning has batch size {size} but x has {x.shape[0]}; "
                             "pass one conditioning (and one unconditional conditioning) per sample")
        eps_u, eps_c = model_eps_fn(torch.cat([x, x]), torch.cat([t, t]), concat_conditioning(uncond, cond)).chunk(2)
        s = scale.to(x).reshape(-1, *[1] * (x.ndim - 1)) if isinstance(scale, torch.Tensor) else scale
        return eps_u + s * (eps_c - eps_u)

    return eps_fn
