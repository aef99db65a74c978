"""Euler and Euler-ancestral in σ-space (Karras et al. 2022; k-diffusion's ``sample_euler`` /
``sample_euler_ancestral``; == diffusers EulerDiscreteScheduler / EulerAncestralDiscreteScheduler).

The probability-flow ODE in σ is dx/dσ = (x − x̂₀)/σ = ε.
"""
from __future__ import annotations

import math

from .common import StepLoop, blend_known_sigma, check_inpainting, prepare_sigma_sampler, randn, vp_scale


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split the step σ → σ_next into a deterministic move to σ_down and fresh noise of size σ_up."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def sample_euler(eps_fn, x_T, alphas_cumprod, steps=20, *, spacing="compvis", karras=False, generator=None,
                 callback=None, progress=True, mask=None, known=None, start_step=0):
    """Euler's method on the probability-flow ODE (deterministic; 1 model call per step)."""
    check_inpainting(mask, known)
    x, sigmas, ts, denoise = prepare_sigma_sampler(eps_fn, x_T, alphas_cumprod, steps, spacing, karras, "k",
                                                   start_step=start_step)
    loop = StepLoop("euler", len(ts), callback, progress, ts)
    for i in loop:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = blend_known_sigma(x, known, mask, sigma, generator)
        x0 = denoise(x, i)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        loop.done(i, x, x0, vp_scale(sigma_next))
    return x * vp_scale(sigmas[-1])


def sample_euler_ancestral(eps_fn, x_T, alphas_cumprod, steps=20, *, eta=1.0, spacing="compvis", karras=False,
                           generator=None, callback=None, progress=True, mask=None, known=None, start_step=0):
    """Euler with ancestral noise: each step moves to σ_down and adds σ_up · z (``eta`` scales σ_up)."""
    check_inpainting(mask, known)
    x, sigmas, ts, denoise = prepare_sigma_sampler(eps_fn, x_T, alphas_cumprod, steps, spacing, karras, "k",
                                                   start_step=start_step)
    loop = StepLoop("euler_a", len(ts), callback, progress, ts)
    for i in loop:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = blend_known_sigma(x, known, mask, sigma, generator)
        x0 = denoise(x, i)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + randn(x, generator) * sigma_up
        loop.done(i, x, x0, vp_scale(sigma_next))
    return x * vp_scale(sigmas[-1])
