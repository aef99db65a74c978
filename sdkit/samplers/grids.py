"""The timestep and σ grids the samplers walk, chosen so each sampler matches the diffusers scheduler it mirrors
number for number (diffusers names its spacings alike but builds them differently per scheduler).

``spacing`` (all grids start from :func:`sdkit.schedules.timesteps`):

- "compvis" (default): CompVis ``range(0, T, T // steps) + 1``; 50 steps visit 981, 961, …, 1.
- "leading": diffusers' leading spacing with ``steps_offset=1`` (SD's scheduler config). For 1000/steps whole
  this equals "compvis"; otherwise compvis visits one step more (S=15 → 16), as CompVis does.
- "trailing": ends at T − 1; "linspace": ``linspace(0, T − 1)``.

Three families:

- **DDIM family** (ddim, plms, ddpm): integer timesteps, walked from high to low.
- **k family** (euler, euler_a, heun, lms; EulerDiscreteScheduler & co.): σ interpolated linearly at the timesteps
  (linspace ones unrounded), then a final σ = 0. With ``karras`` the Karras grid spans the σ range of those
  timesteps and the model times are ``sigma_to_t`` (fractional).
- **DPM family** (dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc; DPMSolverMultistep/UniPCMultistep): "leading" and
  "linspace" use ``steps + 1`` points and drop the last (how those schedulers do it); with ``karras`` the grid spans
  the whole training σ range and the model times are rounded to integers.

``grid`` (σ-space samplers that take it: dpmpp_*, unipc) replaces the spacing's timesteps by a σ grid over the whole
training range [σ_min, σ_max], then the final σ (0 or σ_min):

- "karras": the same as ``karras=True``.
- "exponential": uniform in log σ, i.e. in log-SNR λ = −log σ: with the final σ = 0, ``steps`` calls from σ_max to
  σ_min (diffusers' ``use_exponential_sigmas``, k-diffusion's ``get_sigmas_exponential``); with final σ_min, the
  calls and the end point split [σ_max, σ_min] evenly (DPM-Solver's "logSNR" skip).
- "ays": Align Your Steps (Sabour et al. 2024), the noise levels the paper optimised for SD 1.5 (10 steps:
  timesteps 999, 850, 736, 645, 545, 455, 343, 233, 124, 24), interpolated linearly in log σ for other step counts
  and with the last level replaced by the final σ (as ComfyUI's AlignYourStepsScheduler does; at 10 steps this is
  diffusers' DPMSolverMultistepScheduler with those timesteps).
- "fitted": sdkit's own grid in the spirit of Align Your Steps: for each step count in ``FITTED_SD1_SIGMAS`` the σ
  chosen to minimise the RMS error of UniPC-3 (``order=3``) on a training family of Gaussian and Gaussian-mixture
  data under SD v1's schedule (``benchmarks/fit_sampler_grid.py`` fits them; ``benchmarks/sampler_accuracy.py``
  reports them on held-out data). Other step counts interpolate the nearest fitted grid in log σ.

``grid`` may also be the list of σ of the model calls (one per step, decreasing, inside the training range).
On these grids the model times are the fractional ``sigma_to_t(σ)``, so the model sees exactly the σ the solver
assumes (diffusers truncates or rounds them to integers). Stored levels are SD v1's; for another schedule they are
placed at the same fractions of its [log σ_min, log σ_max].
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..schedules import TIMESTEP_SPACINGS, karras_sigmas, sigma_to_t, sigmas_from_alphas_cumprod, timesteps

FAMILIES = ("k", "dpm")
GRIDS = ("karras", "exponential", "ays", "fitted")

# SD v1's σ range (t = 0 and t = 999 of its scaled-linear schedule): the frame the stored levels are given in
SD_V1_LOG_SIGMA_RANGE = (math.log(0.0291675332), math.log(14.6146414897))
# Align Your Steps, SD 1.5 (Sabour et al. 2024, the authors' published levels): 10 steps, the 11th is σ_min
AYS_SD1_SIGMAS = (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                  0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582)
# sdkit's fitted grids (benchmarks/fit_sampler_grid.py): steps -> the σ of its model calls, highest first
FITTED_SD1_SIGMAS = {
    5: (14.615, 5.1994, 1.0013, 0.29882, 0.1371),
    10: (14.615, 8.797, 2.862, 1.1248, 0.66851, 0.44745, 0.30328, 0.14935, 0.11633, 0.049071),
    20: (14.615, 8.418, 6.3116, 3.7608, 2.6898, 1.9669, 1.4552, 1.1215, 0.85492, 0.63333, 0.49666, 0.38989,
         0.29798, 0.23101, 0.18447, 0.1477, 0.13231, 0.09965, 0.066265, 0.031711),
}


def _check_spacing(spacing: str) -> None:
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")


def ddim_timesteps(steps: int, spacing: str, num_train_timesteps: int, custom=None) -> np.ndarray:
    """Integer timesteps in the order they are visited (descending). ``custom`` overrides the spacing."""
    if custom is not None:
        t = np.unique(np.asarray(custom, dtype=np.int64))[::-1]
        if len(t) == 0 or t[-1] < 0 or t[0] >= num_train_timesteps:
            raise ValueError(f"custom timesteps must be integers in [0, {num_train_timesteps - 1}], got {custom!r}")
        return t.copy()
    _check_spacing(spacing)
    # unique: "compvis" with steps = T clips its last timestep onto T − 1 twice
    return np.unique(timesteps(steps, spacing, num_train_timesteps))[::-1].copy()


def _family_timesteps(steps: int, spacing: str, family: str, num_train_timesteps: int) -> np.ndarray:
    _check_spacing(spacing)
    T = num_train_timesteps
    if family == "k" and spacing == "linspace":
        return np.linspace(0, T - 1, steps)[::-1].copy()
    if family == "dpm" and spacing == "leading":
        ratio = T // (steps + 1)
        return np.arange(steps, 0, -1, dtype=np.float64) * ratio + 1
    if family == "dpm" and spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
    return timesteps(steps, spacing, T)[::-1].astype(np.float64)


def log_linear_interp(levels, n: int) -> np.ndarray:
    """``n`` values along a descending list of positive ``levels``, linear in log σ against the index (the
    interpolation Align Your Steps uses to carry its 10-step levels to other step counts)."""
    levels = np.log(np.asarray(levels, dtype=np.float64))
    return np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(levels)), levels))


def _fitted_levels(steps: int) -> np.ndarray:
    """The fitted grid for ``steps`` model calls, or the nearest fitted one interpolated in log σ (σ_min added as
    its end point, so the interpolation keeps the range)."""
    if steps in FITTED_SD1_SIGMAS:
        return np.asarray(FITTED_SD1_SIGMAS[steps], dtype=np.float64)
    nearest = min(FITTED_SD1_SIGMAS, key=lambda k: (abs(math.log(k / steps)), k))
    levels = FITTED_SD1_SIGMAS[nearest] + (AYS_SD1_SIGMAS[-1],)
    return log_linear_interp(levels, steps + 1)[:-1]


def _custom_sigmas(grid, steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """A grid given as the σ of each model call: ``steps`` values, strictly decreasing, inside the training range."""
    try:
        sig = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        sig = None
    if sig is None or sig.ndim != 1:
        raise ValueError(f"grid must be a name ({', '.join(GRIDS)}) or a list of σ, got {grid!r}")
    if len(sig) != steps:
        raise ValueError(f"grid lists {len(sig)} σ but steps={steps}: give one σ per step (the final σ, 0 or σ_min, "
                         "is added)")
    tol = 1e-6
    if not bool(torch.isfinite(sig).all()) or float(sig.min()) < sigma_min * (1 - tol) \
            or float(sig.max()) > sigma_max * (1 + tol) or bool((sig[1:] >= sig[:-1]).any()):
        raise ValueError(f"grid σ must decrease strictly and lie in the training range [{sigma_min:.6g}, "
                         f"{sigma_max:.6g}], got {[round(float(v), 6) for v in sig]}")
    return sig.clamp(sigma_min, sigma_max)


def grid_sigmas(grid: str, steps: int, sigma_min: float, sigma_max: float, final: str = "zero") -> torch.Tensor:
    """The σ of the ``steps`` model calls of a named grid (see the module docstring), descending, without the
    final σ. "exponential" spans [σ_max, σ_min] with its calls when the final σ is 0, and with its calls and the
    final σ_min otherwise (never a step of length 0)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {GRIDS}")
    if grid == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    if grid == "exponential":
        points = torch.linspace(hi, lo, steps + (final == "sigma_min"), dtype=torch.float64).exp()
        return points[:steps]
    levels = log_linear_interp(AYS_SD1_SIGMAS, steps + 1)[:-1] if grid == "ays" else _fitted_levels(steps)
    # the stored levels are SD v1's: keep their place within the range, for any schedule; every stored grid starts
    # at σ_max (its printed digits aside)
    frac = (np.log(levels) - SD_V1_LOG_SIGMA_RANGE[1]) / (SD_V1_LOG_SIGMA_RANGE[0] - SD_V1_LOG_SIGMA_RANGE[1])
    frac = np.clip(frac, 0.0, 1.0)
    frac[0] = 0.0
    return torch.from_numpy(np.exp(hi + frac * (lo - hi)))


def sigma_grid(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "compvis", karras: bool = False,
               family: str = "k", final: str = "zero", grid=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, model_timesteps) as float64 CPU tensors: ``len(sigmas) == len(model_timesteps) + 1``, σ descending,
    the last σ being 0 (``final="zero"``) or the smallest training σ (``final="sigma_min"``). ``grid`` names a σ
    grid over the whole training range instead of the spacing's timesteps (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown grid family {family!r}; choose one of {FAMILIES}")
    named = isinstance(grid, str)
    if named and grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {GRIDS}, a list of σ, or None (the spacing's "
                         "timesteps)")
    if karras and not (grid is None or (named and grid == "karras")):
        raise ValueError(f"karras=True is grid='karras'; it cannot be combined with grid={grid!r}")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    table = sigmas_from_alphas_cumprod(alphas_cumprod.detach().double().cpu())
    last = torch.zeros(1, dtype=torch.float64) if final == "zero" else table[:1]
    if named and grid == "karras":
        karras = True
    elif grid is not None:
        sig = (grid_sigmas(grid, steps, float(table[0]), float(table[-1]), final) if named
               else _custom_sigmas(grid, steps, float(table[0]), float(table[-1])))
        if float(sig[-1]) <= float(last[0]):
            raise ValueError(f"the grid's last σ ({float(sig[-1]):.6g}) is the final σ_min: a step of length 0; end "
                             "the grid above σ_min or use final='zero'")
        return torch.cat([sig, last]), sigma_to_t(sig, alphas_cumprod)
    t = _family_timesteps(steps, spacing, family, len(table))
    t = t[np.r_[True, np.diff(t) != 0]]  # a repeated timestep (steps ≈ T) would be a step of length 0
    sig = np.interp(t, np.arange(len(table)), table.numpy())
    t, sig = torch.from_numpy(t), torch.from_numpy(sig)
    if karras:
        if family == "k":
            sig = karras_sigmas(len(t), float(sig[-1]), float(sig[0]))
            t = sigma_to_t(sig, alphas_cumprod)
        else:
            sig = karras_sigmas(steps, float(table[0]), float(table[-1]))
            t = sigma_to_t(sig, alphas_cumprod).round()
    return torch.cat([sig, last]), t
