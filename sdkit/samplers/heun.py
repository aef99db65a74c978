"""Heun's method (Karras et al. 2022, Algorithm 1 without churn; k-diffusion ``sample_heun``; == diffusers
HeunDiscreteScheduler): an Euler step, then the trapezoid correction with the slope at its end. The last step,
to σ = 0, is a plain Euler step, so NFE = 2·steps − 1.
"""
from __future__ import annotations

from .common import StepLoop, blend_known_sigma, check_inpainting, prepare_sigma_sampler, vp_scale


def sample_heun(eps_fn, x_T, alphas_cumprod, steps=20, *, spacing="compvis", karras=False, generator=None,
                callback=None, progress=True, mask=None, known=None, start_step=0):
    check_inpainting(mask, known)
    x, sigmas, ts, denoise = prepare_sigma_sampler(eps_fn, x_T, alphas_cumprod, steps, spacing, karras, "k",
                                                   start_step=start_step)
    loop = StepLoop("heun", len(ts), callback, progress, ts)
    for i in loop:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = blend_known_sigma(x, known, mask, sigma, generator)
        x0 = denoise(x, i)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, i + 1)) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        loop.done(i, x, x0, vp_scale(sigma_next))
    return x * vp_scale(sigmas[-1])
