"""DDIM (Song et al. 2021), as CompVis ``DDIMSampler.p_sample_ddim`` computes it (== diffusers DDIMScheduler with
``set_alpha_to_one=False``).

Each step: x̂₀ = (x − √(1−ᾱ_t) ε)/√ᾱ_t, then x_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε + σ z with
σ = η √((1−ᾱ_prev)/(1−ᾱ_t) · (1−ᾱ_t/ᾱ_prev)). The last step goes to ᾱ₀ (not 1), as CompVis does.
"""
from __future__ import annotations

import math

import torch

from .common import StepLoop, blend_known, call_eps, check_inpainting, check_start_step, randn
from .grids import ddim_timesteps


def ddim_alphas(alphas_cumprod: torch.Tensor, ts, final_alpha_cumprod: float | None = None):
    """ᾱ at each visited timestep and at the one after it; after the last comes ᾱ₀ (CompVis' alphas_prev[0])
    unless ``final_alpha_cumprod`` says otherwise (1.0 = step to the clean sample)."""
    ac = alphas_cumprod.detach().double().cpu()
    a = [float(ac[t]) for t in ts]
    return a, a[1:] + [float(ac[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)]


def ddim_sigmas(a: list[float], a_prev: list[float], eta: float) -> list[float]:
    return [eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap)) for at, ap in zip(a, a_prev)]


def sample_ddim(eps_fn, x_T, alphas_cumprod, steps=50, *, eta=0.0, spacing="compvis", timesteps=None,
                generator=None, callback=None, progress=True, temperature=1.0, noise_dropout=0.0,
                mask=None, known=None, x0_fn=None, final_alpha_cumprod=None, start_step=0):
    """DDIM; ``eta=0`` is deterministic, ``eta=1`` is DDPM-like ancestral sampling.

    ``timesteps`` overrides ``spacing`` with explicit integer timesteps. ``mask``/``known``: repaint where ``mask``
    is 1 and keep the latent ``known`` elsewhere, noised to each step's level (CompVis inpainting).
    ``temperature``/``noise_dropout`` scale/drop the added noise (CompVis options). ``x0_fn`` post-processes x̂₀ (e.g. VQ quantisation).
    ``final_alpha_cumprod``: ᾱ the last step goes to (default ᾱ₀, as CompVis; 1.0 for the clean sample).
    ``start_step``: skip the first grid steps (img2img); x_T is then the VP sample at ᾱ of ts[start_step].
    """
    ts = ddim_timesteps(steps, spacing, len(alphas_cumprod), timesteps)
    check_start_step(start_step, len(ts))
    ts = ts[start_step:]
    a, a_prev = ddim_alphas(alphas_cumprod, ts, final_alpha_cumprod)
    sig = ddim_sigmas(a, a_prev, eta)
    check_inpainting(mask, known)
    x = x_T
    loop = StepLoop("ddim", len(ts), callback, progress, ts)
    for i in loop:
        if mask is not None:
            x = blend_known(x, known, mask, a[i], generator)
        eps = call_eps(eps_fn, x, ts[i])
        pred_x0 = (x - math.sqrt(1 - a[i]) * eps) / math.sqrt(a[i])
        if x0_fn is not None:
            pred_x0 = x0_fn(pred_x0)
        x = math.sqrt(a_prev[i]) * pred_x0 + math.sqrt(1 - a_prev[i] - sig[i] ** 2) * eps
        if eta > 0:
            noise = randn(x, generator) * temperature
            if noise_dropout > 0:
                noise = torch.nn.functional.dropout(noise, p=noise_dropout)
            x = x + sig[i] * noise
        loop.done(i, x, pred_x0)
    return x
