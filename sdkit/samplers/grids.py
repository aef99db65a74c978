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
- **DPM family** (dpmpp_2m, dpmpp_2m_sde, unipc; DPMSolverMultistep/UniPCMultistep): "leading" and "linspace"
  use ``steps + 1`` points and drop the last (how those schedulers do it); with ``karras`` the grid spans the whole
  training σ range and the model times are rounded to integers.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedules import TIMESTEP_SPACINGS, karras_sigmas, sigma_to_t, sigmas_from_alphas_cumprod, timesteps

FAMILIES = ("k", "dpm")


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


def sigma_grid(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "compvis", karras: bool = False,
               family: str = "k", final: str = "zero") -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, model_timesteps) as float64 CPU tensors: ``len(sigmas) == len(model_timesteps) + 1``, σ descending,
    the last σ being 0 (``final="zero"``) or the smallest training σ (``final="sigma_min"``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown grid family {family!r}; choose one of {FAMILIES}")
    table = sigmas_from_alphas_cumprod(alphas_cumprod.detach().double().cpu())
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
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    last = torch.zeros(1, dtype=torch.float64) if final == "zero" else table[:1]
    return torch.cat([sig, last]), t
