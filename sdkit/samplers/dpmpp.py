"""Multistep DPM-Solver / DPM-Solver++ on a discrete σ grid (Lu et al. 2022a/b), the way diffusers'
DPMSolverMultistepScheduler discretises it: DPM++ 2M, DPM++ 3M, DPM++ 2M SDE, and orders 1–3.

Written in σ-space (x = x_t/α_t, λ = −log σ, h = λ_next − λ), where the VP formulas lose their α factors.
Warm-up uses lower orders; the step onto σ = 0 is first order (it returns x̂₀), and with ``lower_order_final``
grids of fewer than 15 steps also take their second-to-last step at order ≤ 2 ("stabilising trick").
``grid`` ("karras", "exponential", "ays", "fitted"; see ``grids.py``) walks a named σ grid instead of the spacing's.
"""
from __future__ import annotations

import math

from .common import StepLoop, blend_known_sigma, check_inpainting, prepare_sigma_sampler, randn, vp_scale

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


def _step_order(i: int, n: int, order: int, lower_order_final: bool, sigma_next: float) -> int:
    if sigma_next == 0 or (i == n - 1 and lower_order_final and n < 15):
        return 1
    if i == n - 2 and lower_order_final and n < 15:
        return min(order, 2, i + 1)
    return min(order, i + 1)


def _data_update(x, ms, lams, sigma, sigma_next, k, solver_type):
    """DPM-Solver++ (data prediction) step of order k; ms/lams hold the newest value last."""
    ratio = sigma_next / sigma                       # = e^{−h}
    phi = ratio - 1.0                                # = e^{−h} − 1
    x = ratio * x - phi * ms[-1]
    if k == 1:
        return x
    h = math.log(sigma / sigma_next)
    r0 = (lams[-1] - lams[-2]) / h
    d1_0 = (ms[-1] - ms[-2]) / r0
    if k == 2:
        return x - 0.5 * phi * d1_0 if solver_type == "midpoint" else x + (phi / h + 1.0) * d1_0
    r1 = (lams[-2] - lams[-3]) / h
    d1_1 = (ms[-2] - ms[-3]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return x + (phi / h + 1.0) * d1 - ((phi + h) / h ** 2 - 0.5) * d2


def _noise_update(x, ms, lams, sigma, sigma_next, k, solver_type):
    """DPM-Solver (noise prediction) step of order k: x_next = x − σ_next(e^h − 1) ε − …"""
    h = math.log(sigma / sigma_next)
    em1 = math.expm1(h)
    x = x - sigma_next * em1 * ms[-1]
    if k == 1:
        return x
    r0 = (lams[-1] - lams[-2]) / h
    d1_0 = (ms[-1] - ms[-2]) / r0
    if k == 2:
        if solver_type == "midpoint":
            return x - 0.5 * sigma_next * em1 * d1_0
        return x - sigma_next * (em1 / h - 1.0) * d1_0
    r1 = (lams[-2] - lams[-3]) / h
    d1_1 = (ms[-2] - ms[-3]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return x - sigma_next * (em1 / h - 1.0) * d1 - sigma_next * ((em1 - h) / h ** 2 - 0.5) * d2


def _sde_update(x, ms, lams, sigma, sigma_next, k, solver_type, eta, noise):
    """SDE-DPM-Solver++ step (order ≤ 2): e^{−ηh} damping of x plus fresh noise of size σ_next√(1−e^{−2ηh})."""
    h = math.log(sigma / sigma_next)
    eta_h = eta * h
    gain = -math.expm1(-h - eta_h)                   # 1 − e^{−(1+η)h}
    x = (sigma_next / sigma) * math.exp(-eta_h) * x + gain * ms[-1]
    if k >= 2:
        d1 = (ms[-1] - ms[-2]) / ((lams[-1] - lams[-2]) / h)
        x = x + (0.5 * gain if solver_type == "midpoint" else gain / (-h - eta_h) + 1.0) * d1
    if eta > 0:
        x = x + noise * sigma_next * math.sqrt(-math.expm1(-2 * eta_h))
    return x


def sample_dpm_multistep(eps_fn, x_T, alphas_cumprod, steps=20, *, order=2, algorithm="dpmsolver++",
                         solver_type="midpoint", lower_order_final=True, final=None, eta=1.0, spacing="compvis",
                         karras=False, grid=None, generator=None, callback=None, progress=True, name=None,
                         mask=None, known=None, start_step=0):
    """Multistep DPM-Solver(++) of ``order`` 1–3 (``sde-dpmsolver++``: 1–2). ``final`` is the last σ: "zero"
    (default for the data-prediction algorithms) or "sigma_min" (the only choice for noise prediction, as in
    diffusers). ``eta`` scales the SDE noise (1 = diffusers' sde-dpmsolver++)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; choose one of {SOLVER_TYPES}")
    max_order = 2 if algorithm == "sde-dpmsolver++" else 3
    if order not in range(1, max_order + 1):
        raise ValueError(f"{algorithm} supports orders 1 to {max_order}, got order={order}")
    final = final or ("sigma_min" if algorithm == "dpmsolver" else "zero")
    if algorithm == "dpmsolver" and final == "zero":
        raise ValueError("noise-prediction DPM-Solver cannot step onto σ = 0; use final='sigma_min' or dpmsolver++")
    check_inpainting(mask, known)
    x, sigmas, ts, denoise = prepare_sigma_sampler(eps_fn, x_T, alphas_cumprod, steps, spacing, karras, "dpm", final,
                                                   start_step, grid)
    n = len(ts)
    ms, lams = [], []
    loop = StepLoop(name or algorithm, n, callback, progress, ts)
    for i in loop:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = blend_known_sigma(x, known, mask, sigma, generator)
        x0 = denoise(x, i)
        ms = (ms + [x0 if algorithm != "dpmsolver" else (x - x0) / sigma])[-3:]
        lams = (lams + [-math.log(sigma)])[-3:]
        k = _step_order(i, n, order, lower_order_final, sigma_next)
        if algorithm == "dpmsolver++":
            x = _data_update(x, ms, lams, sigma, sigma_next, k, solver_type)
        elif algorithm == "dpmsolver":
            x = _noise_update(x, ms, lams, sigma, sigma_next, k, solver_type)
        elif sigma_next == 0:
            x = ms[-1]
        else:
            x = _sde_update(x, ms, lams, sigma, sigma_next, k, solver_type, eta, randn(x, generator))
        loop.done(i, x, x0, vp_scale(sigma_next))
    return x * vp_scale(sigmas[-1])


def sample_dpmpp_2m(eps_fn, x_T, alphas_cumprod, steps=20, *, spacing="compvis", karras=False, grid=None,
                    lower_order_final=True, solver_type="midpoint", generator=None, callback=None,
                    progress=True, mask=None, known=None, start_step=0):
    """DPM-Solver++(2M): == diffusers DPMSolverMultistepScheduler's defaults (and k-diffusion dpmpp_2m)."""
    return sample_dpm_multistep(eps_fn, x_T, alphas_cumprod, steps, order=2, algorithm="dpmsolver++",
                                solver_type=solver_type, lower_order_final=lower_order_final, spacing=spacing,
                                karras=karras, grid=grid, generator=generator, callback=callback,
                                progress=progress, name="dpmpp_2m", mask=mask, known=known,
                                start_step=start_step)


def sample_dpmpp_3m(eps_fn, x_T, alphas_cumprod, steps=20, *, spacing="compvis", karras=False, grid=None,
                    lower_order_final=True, solver_type="midpoint", final="zero", generator=None, callback=None,
                    progress=True, mask=None, known=None, start_step=0):
    """DPM-Solver++(3M), third-order multistep: == diffusers DPMSolverMultistepScheduler(solver_order=3) on the same
    grid. Warm-up at orders 1 and 2; with ``lower_order_final`` (default) grids under 15 steps take their last
    two steps at orders 1 and 2. ``final``: the last σ, "zero" or "sigma_min"."""
    return sample_dpm_multistep(eps_fn, x_T, alphas_cumprod, steps, order=3, algorithm="dpmsolver++",
                                solver_type=solver_type, lower_order_final=lower_order_final, final=final,
                                spacing=spacing, karras=karras, grid=grid, generator=generator, callback=callback,
                                progress=progress, name="dpmpp_3m", mask=mask, known=known,
                                start_step=start_step)


def sample_dpmpp_2m_sde(eps_fn, x_T, alphas_cumprod, steps=20, *, eta=1.0, spacing="compvis", karras=False,
                        grid=None, lower_order_final=True, solver_type="midpoint", generator=None, callback=None,
                        progress=True, mask=None, known=None, start_step=0):
    """DPM-Solver++(2M) SDE: == DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") at eta = 1."""
    return sample_dpm_multistep(eps_fn, x_T, alphas_cumprod, steps, order=2, algorithm="sde-dpmsolver++",
                                solver_type=solver_type, lower_order_final=lower_order_final, eta=eta,
                                spacing=spacing, karras=karras, grid=grid, generator=generator, callback=callback,
                                progress=progress, name="dpmpp_2m_sde", mask=mask, known=known,
                                start_step=start_step)
