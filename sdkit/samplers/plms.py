"""PLMS (Liu et al. 2022, "pseudo linear multi-step"), as in CompVis ``plms.py`` (Katherine Crowson's version,
== diffusers PNDMScheduler with ``skip_prk_steps=True``).

The update is the deterministic DDIM step with a combined ε′:
first step "pseudo improved Euler" (a DDIM step, ε at its result, ε′ = mean of both: 2 model calls), then
Adams–Bashforth 2/3/4 on the raw ε history: ε′ = (3ε₀−ε₋₁)/2, (23ε₀−16ε₋₁+5ε₋₂)/12, (55ε₀−59ε₋₁+37ε₋₂−9ε₋₃)/24.
NFE = steps + 1.
"""
from __future__ import annotations

import math

from .common import StepLoop, blend_known, call_eps, check_inpainting, check_start_step
from .ddim import ddim_alphas
from .grids import ddim_timesteps


def _combine(eps, history):
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def sample_plms(eps_fn, x_T, alphas_cumprod, steps=50, *, eta=0.0, spacing="compvis", timesteps=None,
                generator=None, callback=None, progress=True, mask=None, known=None, x0_fn=None,
                start_step=0):
    """PLMS. Deterministic: ``eta`` must be 0 (use ddim for η > 0). ``generator`` only feeds the inpainting
    blend (``mask``/``known``, as in ddim). ``start_step`` skips the first grid steps (img2img)."""
    if eta != 0:
        raise ValueError(f"PLMS is deterministic, so eta must be 0 (got eta={eta}); use sampler='ddim' for eta > 0")
    check_inpainting(mask, known)
    ts = ddim_timesteps(steps, spacing, len(alphas_cumprod), timesteps)
    check_start_step(start_step, len(ts))
    ts = ts[start_step:]
    a, a_prev = ddim_alphas(alphas_cumprod, ts)

    def ddim_step(x, eps, i):
        pred_x0 = (x - math.sqrt(1 - a[i]) * eps) / math.sqrt(a[i])
        if x0_fn is not None:
            pred_x0 = x0_fn(pred_x0)
        return math.sqrt(a_prev[i]) * pred_x0 + math.sqrt(1 - a_prev[i]) * eps, pred_x0

    x, history = x_T, []
    loop = StepLoop("plms", len(ts), callback, progress, ts)
    for i in loop:
        if mask is not None:
            x = blend_known(x, known, mask, a[i], generator)
        eps = call_eps(eps_fn, x, ts[i])
        if not history:
            x_next, _ = ddim_step(x, eps, i)
            eps_next = call_eps(eps_fn, x_next, ts[min(i + 1, len(ts) - 1)])
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = _combine(eps, history)
        x, pred_x0 = ddim_step(x, eps_prime, i)
        history = (history + [eps])[-3:]
        loop.done(i, x, pred_x0)
    return x
