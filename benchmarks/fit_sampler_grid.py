"""Fit sdkit's "fitted" σ grid (``sdkit/samplers/grids.py``): Align Your Steps in spirit, on problems whose exact
answer is known.

Align Your Steps (Sabour et al. 2024) chooses the σ at which a solver calls the model so as to minimise its
discretisation error on the data the model was trained on. Here the "data" is a family of closed-form problems under
SD v1's schedule: element-wise Gaussians N(μ, s²) (exact ODE solution) and Gaussian mixtures (ODE solved by RK4 to
~1e-9), each sampled by UniPC-3 (``sample(..., sampler="unipc", order=3, grid=[σ list])``) from x_T at σ_max = σ(999)
to σ = 0. The objective is the root-mean-square of the relative errors over the training family, minimised by
Powell's method over the log-σ gaps (softmax weights) and the last σ before 0 (between σ_min and 1).

The training family below is disjoint from the held-out problems ``benchmarks/sampler_accuracy.py`` reports on
(other means, standard deviations, mixtures and seeds; the accuracy table's own problem, μ = 0.2, s = 1, seed 0, is
not in it either), so the table's numbers for grid="fitted" are not numbers the fit saw.

    .venv/bin/python benchmarks/fit_sampler_grid.py              # 5, 10 and 20 steps; prints the grids
    .venv/bin/python benchmarks/fit_sampler_grid.py --steps 10 --maxfev 500

The stored grids come from ``--steps 10`` (2000 evaluations, 13 min on 2 busy cores: training RMS error 8.9e-3 on
the exponential grid, 1.5e-3 fitted) and ``--steps 5 20 --maxfev 3000`` (5 steps: 1.6e-1 -> 3.1e-2, Powell stopped
after 264 evaluations; 20 steps: 1.3e-3 -> 9.0e-5, 29 min).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gaussian_oracle import GaussianMixtureOracle, GaussianOracle  # noqa: E402

from sdkit.samplers import sample  # noqa: E402
from sdkit.schedules import sd_v1_alphas_cumprod, sigmas_from_alphas_cumprod  # noqa: E402

AC = sd_v1_alphas_cumprod()
TABLE = sigmas_from_alphas_cumprod(AC.double())
SIGMA_MIN, SIGMA_MAX = float(TABLE[0]), float(TABLE[-1])
SOLVER = dict(sampler="unipc", order=3)            # the solver the grid is fitted for (bh2, lower_order_final)

# (kind, parameters, seed): Gaussians (mean, std) over s ∈ [0.25, 4.5]; mixtures (weights, means, stds)
TRAIN = [("gaussian", (-0.5, 0.25), 100), ("gaussian", (0.5, 0.4), 101), ("gaussian", (0.0, 0.7), 102),
         ("gaussian", (-0.3, 1.3), 103), ("gaussian", (0.5, 2.2), 104), ("gaussian", (0.0, 4.5), 105),
         ("gaussian", (0.3, 3.0), 106),
         ("mixture", ((0.4, 0.6), (-0.8, 0.9), (0.35, 0.45)), 200),
         ("mixture", ((0.3, 0.4, 0.3), (-1.0, 0.2, 1.1), (0.3, 0.3, 0.35)), 201),
         ("mixture", ((0.6, 0.4), (-0.3, 1.0), (0.5, 0.25)), 202)]


class Problem:
    """One closed-form problem: oracle, x_T (256 elements), and the exact x₀ of the probability-flow ODE."""

    def __init__(self, kind, params, seed, shape=(1, 1, 16, 16)):
        self.x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.oracle = GaussianOracle(AC, *params) if kind == "gaussian" else GaussianMixtureOracle(AC, *params)
        self.exact = self.oracle.pf_ode(self.x_T, SIGMA_MAX, 0.0)

    def error(self, grid, **solver) -> float:
        solver = dict(SOLVER, **solver)
        x = sample(self.oracle, self.x_T, AC, steps=len(grid), grid=list(grid), progress=False, **solver)
        return float((x.double() - self.exact).norm() / self.exact.norm())


def grid_from(theta: np.ndarray) -> list[float]:
    """σ of the model calls: σ_max first, then gaps in log σ (softmax of theta[1:]) down to the last σ, which
    theta[0] places between σ_min and 1 (a sigmoid)."""
    log_last = math.log(SIGMA_MIN) * (1.0 - 1.0 / (1.0 + math.exp(-theta[0])))
    w = np.exp(theta[1:] - theta[1:].max())
    cum = np.concatenate([[0.0], np.cumsum(w / w.sum())])
    return list(np.exp(math.log(SIGMA_MAX) + cum * (log_last - math.log(SIGMA_MAX))))


def fit(steps: int, problems, maxfev: int):
    def objective(theta):
        errors = np.array([p.error(grid_from(theta)) for p in problems])
        return 0.5 * math.log(float(np.mean(errors ** 2)))
    theta0 = np.concatenate([[-8.0], np.zeros(steps - 1)])     # the exponential grid (uniform in log σ)
    res = minimize(objective, theta0, method="Powell", options={"maxfev": maxfev, "xtol": 1e-3, "ftol": 1e-4})
    return grid_from(res.x), math.exp(objective(theta0)), math.exp(res.fun), res.nfev


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--maxfev", type=int, default=2000)
    args = parser.parse_args()
    problems = [Problem(*p) for p in TRAIN]
    for steps in args.steps:
        start = time.time()
        grid, before, after, nfev = fit(steps, problems, args.maxfev)
        print(f"{steps} steps: training RMS error {before:.2e} (exponential grid) -> {after:.2e} (fitted), "
              f"{nfev} evaluations, {time.time() - start:.0f} s")
        print(f"    {steps}: ({', '.join(f'{s:.5g}' for s in grid)}),")


if __name__ == "__main__":
    main()
