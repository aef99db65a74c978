"""DPM-Solver and DPM-Solver++ as the DPM-Solver library (vendored by CompVis in ``ldm/models/diffusion/dpm_solver``)
discretises them: continuous time t ∈ [1/N, 1] over a discrete-time model.

``NoiseScheduleVP('discrete')``: t_n = (n+1)/N carries log α_t = ½ log ᾱ_n, piecewise linear in t in between; the
model is called at time (t − 1/N)·N, i.e. 999 … 0 as floats. Time grids (``skip_type``): "time_uniform",
"logSNR" (uniform in λ = log α − log σ) or "time_quadratic". Methods: "multistep" (orders 1–3, 1 NFE per step),
"singlestep" ("DPM-Solver-fast": orders mixed so that NFE = steps), "singlestep_fixed".
``lower_order_final`` lowers the order of the last steps when steps < 15 (multistep).
``discretization="diffusers"`` runs the multistep solver on diffusers' σ grid instead (see ``dpmpp.py``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .common import StepLoop, blend, call_eps, check_inpainting, check_start_step, randn
from .dpmpp import sample_dpm_multistep

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
METHODS = ("multistep", "singlestep", "singlestep_fixed")
SOLVER_TYPES = ("dpm_solver", "taylor")


def _interp(x: float, xp: np.ndarray, yp: np.ndarray) -> float:
    """Piecewise-linear through (xp, yp), xp increasing, extended linearly past both ends (the library's
    ``interpolate_fn``)."""
    i = int(np.clip(np.searchsorted(xp, x) - 1, 0, len(xp) - 2))
    return float(yp[i] + (x - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i]))


class DiscreteVPSchedule:
    """α_t, σ_t, λ_t of a discrete-time VP model seen in continuous time t ∈ [1/N, 1] (float64)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_alpha_array = 0.5 * np.log(alphas_cumprod.detach().double().cpu().numpy())
        self.N = len(self.log_alpha_array)
        self.t_array = np.linspace(0.0, 1.0, self.N + 1)[1:]
        self.T, self.eps = 1.0, 1.0 / self.N

    def log_alpha(self, t: float) -> float:
        return _interp(t, self.t_array, self.log_alpha_array)

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha(t))

    def sigma(self, t: float) -> float:
        return math.sqrt(-math.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t: float) -> float:
        la = self.log_alpha(t)
        return la - 0.5 * math.log(-math.expm1(2.0 * la))

    def inverse_lambda(self, lam: float) -> float:
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        return _interp(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])

    def model_time(self, t: float) -> float:
        """The discrete model's timestep for continuous t: (t − 1/N)·N."""
        return (t - self.eps) * self.N

    def time_steps(self, skip_type: str, t_T: float, t_0: float, n: int) -> list[float]:
        if skip_type == "logSNR":
            return [self.inverse_lambda(lam) for lam in np.linspace(self.lam(t_T), self.lam(t_0), n + 1)]
        if skip_type == "time_uniform":
            return list(np.linspace(t_T, t_0, n + 1))
        if skip_type == "time_quadratic":
            return list(np.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1) ** 2)
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {SKIP_TYPES}")


class _Solver:
    """The library's update formulas, in VP space, for noise prediction (DPM-Solver: model value ε, φ₁ = e^h − 1)
    or data prediction (DPM-Solver++: model value x̂₀, φ₁ = e^{−h} − 1). ``sgn`` is where the two differ in sign."""

    def __init__(self, eps_fn, ns: DiscreteVPSchedule, predict_x0: bool, solver_type: str):
        self.eps_fn, self.ns, self.predict_x0, self.solver_type = eps_fn, ns, predict_x0, solver_type
        self.sgn = 1.0 if predict_x0 else -1.0
        self.last_x0 = None

    def model(self, x, t):
        """ε (DPM-Solver) or x̂₀ (DPM-Solver++) at continuous time t; keeps x̂₀ for previews."""
        eps = call_eps(self.eps_fn, x, self.ns.model_time(t))
        self.last_x0 = (x - self.ns.sigma(t) * eps) / self.ns.alpha(t)
        return self.last_x0 if self.predict_x0 else eps

    def first_order(self, x, m, s, t):
        """DPM-Solver-1 (= DDIM) from s to t; also returns h, the coefficient c (α_t or σ_t) and φ₁."""
        ns = self.ns
        h = ns.lam(t) - ns.lam(s)
        if self.predict_x0:
            phi_1 = math.expm1(-h)
            return ns.sigma(t) / ns.sigma(s) * x - ns.alpha(t) * phi_1 * m, h, ns.alpha(t), phi_1
        phi_1 = math.expm1(h)
        return math.exp(ns.log_alpha(t) - ns.log_alpha(s)) * x - ns.sigma(t) * phi_1 * m, h, ns.sigma(t), phi_1

    def multistep(self, x, ms, ts, t, order):
        """Multistep update of ``order`` from ts[-1] to t with the newest ``order`` model values ms."""
        x_t, h, c, phi_1 = self.first_order(x, ms[-1], ts[-1], t)
        if order == 1:
            return x_t
        lam = self.ns.lam
        r0 = (lam(ts[-1]) - lam(ts[-2])) / h
        d1_0 = (ms[-1] - ms[-2]) / r0
        phi_2 = phi_1 / h + self.sgn
        if order == 2:
            if self.solver_type == "dpm_solver":
                return x_t - 0.5 * c * phi_1 * d1_0
            return x_t + self.sgn * c * phi_2 * d1_0
        r1 = (lam(ts[-2]) - lam(ts[-3])) / h
        d1_1 = (ms[-2] - ms[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return x_t + self.sgn * c * phi_2 * d1 - c * (phi_2 / h - 0.5) * d2

    def singlestep(self, x, s, t, order, r1=None, r2=None):
        """One singlestep update of ``order`` from s to t, with ``order`` model calls at λ_s + (0, r1, r2)·h."""
        ns, sgn = self.ns, self.sgn
        m_s = self.model(x, s)
        x_t, h, c, phi_1 = self.first_order(x, m_s, s, t)
        if order == 1:
            return x_t
        phi_2 = phi_1 / h + sgn
        r1 = (0.5 if order == 2 else 1.0 / 3.0) if r1 is None else r1
        s1 = ns.inverse_lambda(ns.lam(s) + r1 * h)
        m_s1 = self.model(self.first_order(x, m_s, s, s1)[0], s1)
        if order == 2:
            if self.solver_type == "dpm_solver":
                return x_t - (0.5 / r1) * c * phi_1 * (m_s1 - m_s)
            return x_t + sgn * (1.0 / r1) * c * phi_2 * (m_s1 - m_s)
        r2 = 2.0 / 3.0 if r2 is None else r2
        s2 = ns.inverse_lambda(ns.lam(s) + r2 * h)
        x_s2, h2, c2, phi_12 = self.first_order(x, m_s, s, s2)
        m_s2 = self.model(x_s2 + sgn * (r2 / r1) * c2 * (phi_12 / h2 + sgn) * (m_s1 - m_s), s2)
        if self.solver_type == "dpm_solver":
            return x_t + sgn * (1.0 / r2) * c * phi_2 * (m_s2 - m_s)
        d1_0, d1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return x_t + sgn * c * phi_2 * d1 - c * (phi_2 / h - 0.5) * d2


def singlestep_plan(steps: int, order: int) -> list[int]:
    """Orders of the singlestep solver's steps, using exactly ``steps`` model calls ("DPM-Solver-fast")."""
    if order == 3:
        k = steps // 3 + 1
        return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
    if order == 2:
        return [2] * (steps // 2) + ([1] if steps % 2 else [])
    return [1] * steps


def library_alphas_cumprod(alphas_cumprod: torch.Tensor, steps: int, skip_type: str = "time_uniform"
                           ) -> torch.Tensor:
    """ᾱ = α_t² at the start of each of the ``steps`` steps of the library's time grid (float64)."""
    ns = DiscreteVPSchedule(alphas_cumprod)
    ts = ns.time_steps(skip_type, ns.T, ns.eps, steps)[:-1]
    return torch.tensor([ns.alpha(t) ** 2 for t in ts], dtype=torch.float64)


def _sample(eps_fn, x_T, alphas_cumprod, steps, *, predict_x0, order, method, skip_type, lower_order_final,
            solver_type, denoise_to_zero, discretization, spacing, karras, generator, callback,
            progress, name, mask=None, known=None, start_step=0):
    check_inpainting(mask, known)
    if discretization == "diffusers":
        if method != "multistep" or denoise_to_zero:
            raise ValueError("discretization='diffusers' supports method='multistep' without denoise_to_zero")
        return sample_dpm_multistep(
            eps_fn, x_T, alphas_cumprod, steps, order=order, algorithm="dpmsolver++" if predict_x0 else "dpmsolver",
            solver_type="midpoint" if solver_type == "dpm_solver" else "heun", lower_order_final=lower_order_final,
            spacing=spacing, karras=karras, generator=generator, callback=callback,
            progress=progress, name=name, mask=mask, known=known, start_step=start_step)
    if discretization != "compvis":
        raise ValueError(f"discretization must be 'compvis' or 'diffusers', got {discretization!r}")
    if spacing != "compvis" or karras:
        raise ValueError(f"{name} (DPM-Solver library time grid) takes skip_type={SKIP_TYPES}, not spacing/karras; "
                         "pass discretization='diffusers' to use diffusers' σ grid with spacing and karras")
    for value, allowed, what in ((method, METHODS, "method"), (solver_type, SOLVER_TYPES, "solver_type"),
                                 (skip_type, SKIP_TYPES, "skip_type"), (order, (1, 2, 3), "order")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r} for {name}; choose one of {allowed}")
    ns = DiscreteVPSchedule(alphas_cumprod)
    # img2img: start at point start_step of the steps-step time grid and spend the remaining steps from there
    # (for these three skip types that is exactly the tail of the full grid, for multistep)
    check_start_step(start_step, steps)
    t_start = ns.time_steps(skip_type, ns.T, ns.eps, steps)[start_step]
    solver = _Solver(eps_fn, ns, predict_x0, solver_type)

    def blend_at(x, t):  # inpainting: the known region noised to time t, before each step's model call
        if mask is None:
            return x
        return blend(x, ns.alpha(t) * known + ns.sigma(t) * randn(x, generator), mask)

    run = _multistep if method == "multistep" else _singlestep
    x = run(solver, x_T, steps - start_step, order, method, skip_type, lower_order_final,
            lambda n, ts: StepLoop(name, n, callback, progress, [ns.model_time(t) for t in ts]),
            t_start, blend_at)
    if denoise_to_zero:  # one more call: jump from t = 1/N straight to x̂₀
        solver.model(x, ns.eps)
        x = solver.last_x0
    return x


def _multistep(solver, x, steps, order, method, skip_type, lower_order_final, make_loop, t_start, blend):
    """Order 1, then 2, … up to ``order`` (warm-up), one model call per step; with ``lower_order_final`` and
    fewer than 15 steps the last steps drop back to lower orders."""
    ns = solver.ns
    order = min(order, steps)  # the library asserts steps >= order; fewer steps simply use a lower order
    ts = ns.time_steps(skip_type, t_start, ns.eps, steps)
    x = blend(x, ts[0])
    ms, hist = [solver.model(x, ts[0])], [ts[0]]
    loop = make_loop(steps, ts)
    for i in loop:
        step = i + 1
        k = min(order, step)
        if lower_order_final and steps < 15:
            k = min(k, steps + 1 - step)
        x0 = solver.last_x0
        x = solver.multistep(x, ms, hist, ts[step], k)
        hist = (hist + [ts[step]])[-order:]
        if step < steps:  # the final model value is never needed
            x = blend(x, ts[step])
            ms = (ms + [solver.model(x, ts[step])])[-order:]
        loop.done(i, x, x0)
    return x


def _singlestep(solver, x, steps, order, method, skip_type, lower_order_final, make_loop, t_start, blend):
    """"singlestep": orders mixed so that NFE = steps (on the fine grid, or a K-point logSNR grid as in the paper);
    "singlestep_fixed": steps // order steps of ``order``."""
    ns = solver.ns
    if method == "singlestep":
        orders = singlestep_plan(steps, order)
        outer_n = len(orders) if skip_type == "logSNR" else steps
    else:
        orders = [order] * (steps // order)
        outer_n = len(orders)
    if not orders:
        raise ValueError(f"{method} of order {order} needs at least {order} steps, got {steps}")
    ts = ns.time_steps(skip_type, t_start, ns.eps, outer_n)
    if outer_n != len(orders):  # a fine grid: each step spans `order` of its intervals
        ts = [ts[j] for j in np.cumsum([0] + orders)]
    loop = make_loop(len(orders), ts)
    for i in loop:
        s, t, k = ts[i], ts[i + 1], orders[i]
        inner = ns.time_steps(skip_type, s, t, k)  # where the intermediate model calls go
        h = ns.lam(t) - ns.lam(s)
        r1 = (ns.lam(inner[1]) - ns.lam(s)) / h if k > 1 else None
        r2 = (ns.lam(inner[2]) - ns.lam(s)) / h if k > 2 else None
        x = solver.singlestep(blend(x, s), s, t, k, r1, r2)
        loop.done(i, x, solver.last_x0)
    return x


def sample_dpm_solver(eps_fn, x_T, alphas_cumprod, steps=20, *, order=3, method="singlestep",
                      skip_type="time_uniform", lower_order_final=True, solver_type="dpm_solver",
                      denoise_to_zero=False, discretization="compvis", spacing="compvis", karras=False,
                      generator=None, callback=None, progress=True, mask=None, known=None, start_step=0):
    """DPM-Solver (noise prediction). Default: DPM-Solver-3 singlestep ("DPM-Solver-fast"), NFE = steps."""
    return _sample(eps_fn, x_T, alphas_cumprod, steps, predict_x0=False, order=order, method=method,
                   skip_type=skip_type, lower_order_final=lower_order_final, solver_type=solver_type,
                   denoise_to_zero=denoise_to_zero, discretization=discretization, spacing=spacing, karras=karras,
                   generator=generator, callback=callback, progress=progress, name="dpm_solver",
                   mask=mask, known=known, start_step=start_step)


def sample_dpm_solver_pp(eps_fn, x_T, alphas_cumprod, steps=20, *, order=2, method="multistep",
                         skip_type="time_uniform", lower_order_final=True, solver_type="dpm_solver",
                         denoise_to_zero=False, discretization="compvis", spacing="compvis", karras=False,
                         generator=None, callback=None, progress=True, mask=None, known=None,
                         start_step=0):
    """DPM-Solver++ (data prediction). Default: 2M multistep, time-uniform, as CompVis ``DPMSolverSampler``."""
    return _sample(eps_fn, x_T, alphas_cumprod, steps, predict_x0=True, order=order, method=method,
                   skip_type=skip_type, lower_order_final=lower_order_final, solver_type=solver_type,
                   denoise_to_zero=denoise_to_zero, discretization=discretization, spacing=spacing, karras=karras,
                   generator=generator, callback=callback, progress=progress, name="dpm_solver++",
                   mask=mask, known=known, start_step=start_step)
