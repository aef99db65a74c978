"""DDPM ancestral sampling (Ho et al. 2020) on any subset of timesteps (== diffusers DDPMScheduler,
``variance_type="fixed_small"``): sample the posterior q(x_prev | x_t, x̂₀) of the respaced chain.

With ᾱ_prev the next visited timestep (1 after the last) and β = 1 − ᾱ_t/ᾱ_prev:
mean = √ᾱ_prev β/(1−ᾱ_t) x̂₀ + √(ᾱ_t/ᾱ_prev)(1−ᾱ_prev)/(1−ᾱ_t) x_t, variance = (1−ᾱ_prev)/(1−ᾱ_t) β.
The last step adds no noise and returns the mean, as CompVis ``p_sample_loop`` does at t = 0.
"""
from __future__ import annotations

import math

from .common import StepLoop, blend_known, call_eps, check_inpainting, check_start_step, randn
from .grids import ddim_timesteps


def sample_ddpm(eps_fn, x_T, alphas_cumprod, steps=1000, *, spacing="compvis", timesteps=None, generator=None,
                callback=None, progress=True, mask=None, known=None, start_step=0):
    """DDPM; for the full CompVis chain use ``steps=1000, spacing="linspace"`` (t = 999 … 0).
    ``mask``/``known``: inpainting blend as in ddim; ``start_step`` skips the first grid steps (img2img)."""
    check_inpainting(mask, known)
    ts = ddim_timesteps(steps, spacing, len(alphas_cumprod), timesteps)
    check_start_step(start_step, len(ts))
    ts = ts[start_step:]
    ac = alphas_cumprod.detach().double().cpu()
    a = [float(ac[t]) for t in ts]
    a_prev = a[1:] + [1.0]
    x = x_T
    loop = StepLoop("ddpm", len(ts), callback, progress, ts)
    for i in loop:
        if mask is not None:
            x = blend_known(x, known, mask, a[i], generator)
        eps = call_eps(eps_fn, x, ts[i])
        pred_x0 = (x - math.sqrt(1 - a[i]) * eps) / math.sqrt(a[i])
        beta = 1 - a[i] / a_prev[i]
        x = (math.sqrt(a_prev[i]) * beta / (1 - a[i]) * pred_x0
             + math.sqrt(a[i] / a_prev[i]) * (1 - a_prev[i]) / (1 - a[i]) * x)
        if i < len(ts) - 1:
            x = x + math.sqrt((1 - a_prev[i]) / (1 - a[i]) * beta) * randn(x, generator)
        loop.done(i, x, pred_x0)
    return x
