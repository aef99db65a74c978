"""Every well-known diffusion sampler, on any ε-prediction function.

    from sdkit.samplers import sample
    x0 = sample(eps_fn, x_T, alphas_cumprod, sampler="dpmpp_2m", steps=20)

``eps_fn(x, t)`` returns ε for the VP sample ``x`` at float timesteps ``t`` (shape [B], in [0, T−1]); guidance is a
wrapper around it (:func:`sdkit.samplers.guidance.cfg_eps_fn`). ``x_T`` is unit-variance noise, as CompVis
samplers take it; σ-space samplers scale it by √(1+σ_max²) themselves. Every sampler returns the sample in the
same VP scaling (at σ = 0 that is x₀ itself).

Common options: ``spacing`` ("compvis" = CompVis uniform +1, "leading", "trailing", "linspace"), ``karras``
(σ-space samplers), ``eta`` (ddim, euler_a, dpmpp_2m_sde), ``generator`` (every random draw),
``callback(i, total, x, x0_pred)`` after every step, ``disable_progress`` (turns the tqdm bar off). Each sampler
documents its own options (``help(SAMPLERS["unipc"])``). Unknown names or options raise ValueError.

CompVis-style classes for LatentDiffusion models: :class:`DDIMSampler`, :class:`PLMSSampler`,
:class:`DPMSolverSampler`.
"""
from __future__ import annotations

import inspect

import torch

from .common import check_inputs
from .compvis import DDIMSampler, DPMSolverSampler, PLMSSampler
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .dpm_solver import sample_dpm_solver, sample_dpm_solver_pp
from .dpmpp import sample_dpm_multistep, sample_dpmpp_2m, sample_dpmpp_2m_sde
from .euler import sample_euler, sample_euler_ancestral
from .guidance import cfg_eps_fn
from .heun import sample_heun
from .lms import sample_lms
from .plms import sample_plms
from .unipc import sample_unipc

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpm_solver": sample_dpm_solver,
    "dpm_solver++": sample_dpm_solver_pp,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}


def sampler_options(sampler: str) -> list[str]:
    """The keyword options a sampler accepts."""
    params = inspect.signature(_lookup(sampler)).parameters.values()
    return [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]


def _lookup(sampler: str):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def sample(eps_fn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, sampler: str = "dpmpp_2m", steps: int = 20,
           **options) -> torch.Tensor:
    """Run ``sampler`` for ``steps`` steps from the noise ``x_T``; returns the final sample."""
    fn = _lookup(sampler)
    check_inputs(x_T, alphas_cumprod, steps)
    accepted = sampler_options(sampler)
    if "eta" in options and "eta" not in accepted:
        if options["eta"]:
            raise ValueError(f"sampler {sampler!r} has no eta option (got eta={options['eta']}); "
                             "the samplers with eta are: ddim, euler_a, dpmpp_2m_sde")
        options.pop("eta")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {sampler!r} does not take option(s) {unknown}; it takes: {', '.join(accepted)}")
    with torch.no_grad():
        return fn(eps_fn, x_T, alphas_cumprod, steps, **options)


__all__ = ["sample", "SAMPLERS", "sampler_options", "cfg_eps_fn", "DDIMSampler", "PLMSSampler", "DPMSolverSampler",
           "sample_dpm_multistep"]
