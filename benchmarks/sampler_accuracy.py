"""Accuracy of every deterministic sampler against the exact probability-flow ODE solution, beside diffusers.

Data x₀ ~ N(μ, s²) per element (μ = 0.2, s = 1, about SD's scaled latents), so the ideal ε-prediction and the ODE's
solution are closed-form (tests/gaussian_oracle.py). Every sampler starts from the same x_T, taken as the sample
at t = 999 ("trailing" spacing: σ_max = 14.61), and is compared with the exact solution at the noise level where it
stops (σ = 0, or σ_min = σ(t=0) for DDIM, PLMS and the DPM-Solver library). Columns are model evaluations (NFE),
not steps: Heun takes 2 per step (minus 1), PLMS S + 1; each cell uses the most steps that fit the budget, and
shows sdkit's relative RMS error | diffusers' on the same problem (its closest scheduler, same x_T; σ-space
schedulers get x_T·√(1+σ_max²), sdkit's convention).

    .venv/bin/python benchmarks/sampler_accuracy.py
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gaussian_oracle import GaussianOracle  # noqa: E402

from sdkit.samplers import sample  # noqa: E402
from sdkit.samplers.dpm_solver import DiscreteVPSchedule  # noqa: E402

warnings.filterwarnings("ignore")
import diffusers  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
AC = diffusers.DDIMScheduler(**SD).alphas_cumprod
SIGMAS = ((1 - AC.double()) / AC.double()).sqrt()
SIGMA_MAX, SIGMA_MIN = float(SIGMAS[-1]), float(SIGMAS[0])
NFES = (5, 10, 20, 50)


def library_timesteps(steps):
    """The DPM-Solver library's time-uniform model times, rounded: diffusers' closest grid."""
    ns = DiscreteVPSchedule(AC)
    return [round(ns.model_time(t)) for t in ns.time_steps("time_uniform", 1.0, 1.0 / 1000, steps)[:-1]]


def run_diffusers(scheduler, eps_fn, x_T, steps, timesteps=None):
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    sigma_space = float(scheduler.init_noise_sigma) != 1.0
    x = x_T * math.sqrt(1 + float(scheduler.sigmas.max()) ** 2) if sigma_space else x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0])), t, x).prev_sample
    return x


def trailing(cls, **kw):
    return lambda steps: (cls(**SD, timestep_spacing="trailing", **kw), None)


def library(cls, **kw):
    return lambda steps: (cls(**SD, final_sigmas_type="sigma_min", lower_order_final=True, **kw),
                          library_timesteps(steps))


# (label, sdkit sampler, sdkit options, steps for an NFE budget, σ where it ends, diffusers factory)
ROWS = [
    ("ddim", "ddim", {}, lambda n: n, SIGMA_MIN,
     trailing(diffusers.DDIMScheduler, set_alpha_to_one=False, clip_sample=False)),
    ("plms", "plms", {}, lambda n: n - 1, SIGMA_MIN,
     trailing(diffusers.PNDMScheduler, skip_prk_steps=True, set_alpha_to_one=False)),
    ("euler", "euler", {}, lambda n: n, 0.0, trailing(diffusers.EulerDiscreteScheduler)),
    ("euler karras", "euler", {"karras": True}, lambda n: n, 0.0,
     trailing(diffusers.EulerDiscreteScheduler, use_karras_sigmas=True)),
    ("heun", "heun", {}, lambda n: (n + 1) // 2, 0.0, trailing(diffusers.HeunDiscreteScheduler)),
    ("heun karras", "heun", {"karras": True}, lambda n: (n + 1) // 2, 0.0,
     trailing(diffusers.HeunDiscreteScheduler, use_karras_sigmas=True)),
    ("lms", "lms", {}, lambda n: n, 0.0, trailing(diffusers.LMSDiscreteScheduler)),
    ("lms karras", "lms", {"karras": True}, lambda n: n, 0.0,
     trailing(diffusers.LMSDiscreteScheduler, use_karras_sigmas=True)),
    ("dpmpp_2m", "dpmpp_2m", {}, lambda n: n, 0.0, trailing(diffusers.DPMSolverMultistepScheduler)),
    ("dpmpp_2m karras", "dpmpp_2m", {"karras": True}, lambda n: n, 0.0,
     trailing(diffusers.DPMSolverMultistepScheduler, use_karras_sigmas=True)),
    ("unipc", "unipc", {}, lambda n: n, 0.0, trailing(diffusers.UniPCMultistepScheduler)),
    ("unipc karras", "unipc", {"karras": True}, lambda n: n, 0.0,
     trailing(diffusers.UniPCMultistepScheduler, use_karras_sigmas=True)),
    ("dpm_solver++ 2M (CompVis)", "dpm_solver++", {}, lambda n: n, SIGMA_MIN,
     library(diffusers.DPMSolverMultistepScheduler)),
    ("dpm_solver++ 3M (CompVis)", "dpm_solver++", {"order": 3}, lambda n: n, SIGMA_MIN,
     library(diffusers.DPMSolverMultistepScheduler, solver_order=3)),
    ("dpm_solver 3S (CompVis)", "dpm_solver", {}, lambda n: n, SIGMA_MIN,
     library(diffusers.DPMSolverSinglestepScheduler, solver_order=3, algorithm_type="dpmsolver")),
    ("dpm_solver++ 2M logSNR", "dpm_solver++", {"skip_type": "logSNR"}, lambda n: n, SIGMA_MIN, None),
]


def rel_rms(x, exact):
    return float((x.double() - exact).norm() / exact.norm())


def main():
    oracle = GaussianOracle(AC, mean=0.2, std=1.0)
    x_T = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    print(__doc__.split("\n\n")[1].replace("\n", " ") + "\n")
    header = f"{'sampler':<27}" + "".join(f"{'NFE ' + str(n):>26}" for n in NFES)
    print(header + "\n" + f"{'':<27}" + "".join(f"{'sdkit | diffusers':>26}" for _ in NFES))
    print("-" * len(header))
    for label, name, options, steps_for, sigma_end, make_diffusers in ROWS:
        exact = oracle.pf_ode(x_T, SIGMA_MAX, sigma_end)
        cells = []
        for nfe in NFES:
            steps = steps_for(nfe)
            oracle.calls = 0
            spacing = {} if name.startswith("dpm_solver") else {"spacing": "trailing"}
            ours = rel_rms(sample(oracle, x_T, AC, name, steps, progress=False, **spacing, **options), exact)
            used = oracle.calls
            theirs = f"{'—':>8}"
            if make_diffusers is not None:
                scheduler, timesteps = make_diffusers(steps)
                theirs = f"{rel_rms(run_diffusers(scheduler, oracle, x_T, steps, timesteps), exact):.2e}"
            mark = "" if used == nfe else f"[{used}] "
            cells.append(f"{mark}{ours:.2e} | {theirs}")
        print(f"{label:<27}" + "".join(f"{c:>26}" for c in cells))
    print("\n[n] before a cell: the NFE actually used when the budget cannot be met exactly.")


if __name__ == "__main__":
    main()
