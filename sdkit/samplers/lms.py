"""Linear multistep (k-diffusion ``sample_lms``; == diffusers LMSDiscreteScheduler with its default order 4):
Adams–Bashforth in σ, with coefficients from integrating the Lagrange basis over each (uneven) σ step.
"""
from __future__ import annotations

from numpy.polynomial import Polynomial

from .common import StepLoop, blend_known_sigma, check_inpainting, prepare_sigma_sampler, vp_scale


def lms_coefficient(sigmas, order: int, i: int, j: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial through σ_i … σ_{i−order+1} that is 1 at σ_{i−j}."""
    basis = Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis *= Polynomial([-float(sigmas[i - k]), 1.0]) / (float(sigmas[i - j]) - float(sigmas[i - k]))
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


def sample_lms(eps_fn, x_T, alphas_cumprod, steps=20, *, order=4, spacing="compvis", karras=False, generator=None,
               callback=None, progress=True, mask=None, known=None, start_step=0):
    if order < 1:
        raise ValueError(f"LMS order must be at least 1, got {order}")
    check_inpainting(mask, known)
    x, sigmas, ts, denoise = prepare_sigma_sampler(eps_fn, x_T, alphas_cumprod, steps, spacing, karras, "k",
                                                   start_step=start_step)
    slopes = []
    loop = StepLoop("lms", len(ts), callback, progress, ts)
    for i in loop:
        x = blend_known_sigma(x, known, mask, sigmas[i], generator)
        x0 = denoise(x, i)
        slopes = (slopes + [(x - x0) / float(sigmas[i])])[-order:]
        cur = min(i + 1, order)
        x = x + sum(lms_coefficient(sigmas, cur, i, j) * d for j, d in enumerate(reversed(slopes)))
        loop.done(i, x, x0, vp_scale(sigmas[i + 1]))
    return x * vp_scale(sigmas[-1])
