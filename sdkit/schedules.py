"""Noise schedules: betas, ᾱ (alphas_cumprod), σ, and the timestep and sigma grids samplers walk.

Everything is computed in float64 numpy first, exactly as CompVis ``make_beta_schedule`` does, and turned into
float32 torch tensors at the end, so the buffers match an official checkpoint bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
TIMESTEP_SPACINGS = ("compvis", "leading", "trailing", "linspace")


def make_beta_schedule(schedule: str = "linear", n_timestep: int = 1000, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """β_t for t = 0..T-1 (float64), as CompVis computes it.

    "linear" is linear in √β (diffusers calls it "scaled_linear"); "sqrt_linear" is plain linear despite the name;
    "sqrt" is the square root of a linear ramp; "cosine" is Nichol & Dhariwal's schedule clipped at 0.999.
    """
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        # CompVis evaluates this in torch float64; numpy float64 gives the same numbers.
        t = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(t / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas, axis=0)


def sd_v1_alphas_cumprod() -> torch.Tensor:
    """ᾱ of Stable Diffusion v1 (linear 0.00085 → 0.012, T = 1000) as float32, the values stored in its checkpoints."""
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    return torch.tensor(alphas_cumprod_from_betas(betas), dtype=torch.float32)


def schedule_buffers(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The 12 buffers CompVis ``DDPM.register_schedule`` stores (float32), keyed by their state-dict names,
    plus ``lvlb_weights`` for ε-prediction (non-persistent in CompVis)."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                          + v_posterior * betas)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        # the variance is 0 at t = 0, so the log is clipped (CompVis does the same)
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    out = {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}
    # CompVis computes lvlb_weights from the float32 buffers (torch ops), not from the float64 arrays
    lvlb = out["betas"] ** 2 / (2 * out["posterior_variance"] * torch.tensor(alphas, dtype=torch.float32)
                                * (1 - out["alphas_cumprod"]))
    lvlb[0] = lvlb[1]
    out["lvlb_weights"] = lvlb
    return out


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t): the noise level of x_t / √ᾱ_t in the variance-exploding view."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def timesteps(steps: int, spacing: str = "compvis", num_train_timesteps: int = 1000,
              steps_offset: int = 1) -> np.ndarray:
    """The discrete timesteps a sampler visits, in ascending order (samplers walk them in reverse).

    - "compvis": ``range(0, T, T // steps) + 1`` as CompVis ``make_ddim_timesteps``; when ``steps`` does not divide
      T this gives more than ``steps`` values (CompVis behaviour, kept on purpose so results match).
    - "leading": diffusers' leading spacing, ``arange(steps) * (T // steps) + steps_offset``.
    - "trailing": ``round(arange(T, 0, -T / steps)) - 1``, ending at T − 1.
    - "linspace": ``round(linspace(0, T − 1, steps))``.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps={steps} is more than the {num_train_timesteps} training timesteps")
    if spacing == "compvis":
        t = np.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1
    elif spacing == "leading":
        t = np.arange(steps) * (num_train_timesteps // steps) + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64)[::-1] - 1
    elif spacing == "linspace":
        t = np.round(np.linspace(0, num_train_timesteps - 1, steps)).astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    return np.clip(t.astype(np.int64), 0, num_train_timesteps - 1)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) σ grid, descending, without the trailing zero."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Continuous timestep for a σ, interpolating linearly in log σ between the training timesteps
    (as k-diffusion and diffusers do), so σ-space samplers can call an ε-model that takes t."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double()).log()
    log_sigma = sigma.double().clamp_min(1e-10).log()
    dists = log_sigma.reshape(-1, 1) - log_sigmas.reshape(1, -1)
    low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)
