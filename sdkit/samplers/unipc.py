"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) plus a corrector (UniC) that reuses the next model call,
so it costs 1 NFE per step. Data-prediction form with B(h) = e^{h}−1 ("bh2") or h ("bh1"); == diffusers
UniPCMultistepScheduler (order 2, bh2, lower_order_final) on the same grid. Written in σ-space (λ = −log σ).
``order=3`` with ``grid="exponential"`` or ``grid="fitted"`` (see ``grids.py``) is the most accurate
configuration at 10 model calls on the closed-form benchmark (``benchmarks/sampler_accuracy.py``).
"""
from __future__ import annotations

import math

import torch

from .common import StepLoop, blend, check_inpainting, prepare_sigma_sampler, randn, vp_scale

SOLVER_TYPES = ("bh1", "bh2")


def _coefficients(rks: list[float], hh: float, order: int, solver_type: str):
    """The linear system R ρ = b of UniPC (Zhao et al., Alg. 2), with B(h) of the chosen variant."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    R, b, factorial = [], [], 1
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, b_h


def _update(x, ms, lams, lam_t, sigma_s, sigma_t, order, solver_type, model_t=None):
    """UniP (``model_t`` None) or UniC step from the point of ms[-1] (λ = lams[-1], σ_s) to σ_t."""
    h = lam_t - lams[-1]
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, order)] + [1.0]
    d1s = [(ms[-1 - k] - ms[-1]) / rks[k - 1] for k in range(1, order)]
    R, b, h_phi_1, b_h = _coefficients(rks, -h, order, solver_type)
    x_next = (sigma_t / sigma_s) * x - h_phi_1 * ms[-1]
    if model_t is None:                                      # predictor
        if not d1s:
            return x_next
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_next - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()  # corrector
    res = sum((r * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_next - b_h * (res + rhos[-1] * (model_t - ms[-1]))


def sample_unipc(eps_fn, x_T, alphas_cumprod, steps=20, *, order=2, solver_type="bh2", lower_order_final=True,
                 disable_corrector=(), final="zero", spacing="compvis", karras=False, grid=None, generator=None,
                 callback=None, progress=True, mask=None, known=None, start_step=0):
    """UniPC-``order`` (1–3). ``disable_corrector``: step indices whose result is not corrected. ``final``: the
    last σ, "zero" or "sigma_min" (the smallest training σ; then the result is the VP sample there). ``grid``: a
    named σ grid instead of the spacing's ("karras", "exponential", "ays", "fitted").
    With ``mask``/``known`` the known region is set before each model call and again after the corrector."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; choose one of {SOLVER_TYPES}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC supports orders 1 to 3, got order={order}")
    check_inpainting(mask, known)
    x, sigmas, ts, denoise = prepare_sigma_sampler(eps_fn, x_T, alphas_cumprod, steps, spacing, karras, "dpm",
                                                 final, start_step, grid)
    n = len(ts)
    ms, lams, this_order, last_x = [], [], 1, None
    loop = StepLoop("unipc", n, callback, progress, ts)
    for i in loop:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if mask is not None:
            known_now = known + sigma * randn(x, generator)
            x = blend(x, known_now, mask)
        x0 = denoise(x, i)
        if i > 0 and (i - 1) not in disable_corrector:
            x = _update(last_x, ms, lams, -math.log(sigma), float(sigmas[i - 1]), sigma, this_order, solver_type, x0)
            if mask is not None:
                x = blend(x, known_now, mask)
        ms, lams = (ms + [x0])[-order:], (lams + [-math.log(sigma)])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        last_x = x
        if sigma_next == 0:                                  # first order onto σ = 0 is exactly x̂₀
            x = x0
        else:
            x = _update(x, ms, lams, -math.log(sigma_next), sigma, sigma_next, this_order, solver_type)
        loop.done(i, x, x0, vp_scale(sigma_next))
    return x * vp_scale(sigmas[-1])
