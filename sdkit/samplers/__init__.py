"""Every well-known diffusion sampler, on any ε-prediction function.

    from sdkit.samplers import sample
    x0 = sample(eps_fn, x_T, alphas_cumprod, sampler="dpmpp_2m", steps=20)

``eps_fn(x, t)`` returns ε for the VP sample ``x`` at float timesteps ``t`` (shape [B], in [0, T−1]); guidance is a
wrapper around it, and :mod:`sdkit.samplers.denoisers` builds it from a model (``denoiser(model, cond, uncond,
scale)``). ``x_T`` is unit-variance noise, as CompVis
samplers take it; σ-space samplers scale it by √(1+σ_max²) themselves. Every sampler returns the sample in the
same VP scaling (at σ = 0 that is x₀ itself).

Common options: ``spacing`` ("compvis" = CompVis uniform +1, "leading", "trailing", "linspace"), ``karras``
(σ-space samplers), ``grid`` (dpmpp_*, unipc: "karras", "exponential", "ays", "fitted" σ grids, see grids.py),
``eta`` (ddim, euler_a, dpmpp_2m_sde), ``generator`` (every random draw; also lcm's fresh noise per step),
``callback(step, total, x, x0_pred)`` after every step (``step`` from 0), ``progress`` (False turns the tqdm
bar off). Each sampler
documents its own options (``help(SAMPLERS["unipc"])``). Unknown names or options raise ValueError.

Options every sampler takes, for the pipelines (img2img, inpainting):

- ``start_step``: skip the first steps of the grid; ``x_T`` is then the VP sample at the noise level where step
  ``start_step`` starts, ``noise_levels(sampler, …)[start_step]`` (ᾱ). Noise an image latent to exactly that level
  and no step is lost or repeated (CompVis img2img noised one step too far).
- ``mask``, ``known``: inpainting. ``mask`` is 1 where the sampler paints (repaint) and 0 where the latent
  ``known`` is kept: before every step the kept region of the sample is replaced by ``known`` noised to that step's
  level (CompVis' DDIM inpainting blend, for every sampler; CompVis' own ``mask`` meant the opposite, and its
  sampler classes here keep that meaning).
- ``generator`` may be a list with one generator per batch item, so each item's noise is independent of the batch.

CompVis-style classes for LatentDiffusion models: :class:`DDIMSampler`, :class:`PLMSSampler`,
:class:`DPMSolverSampler`.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch

from .common import check_inpainting_inputs, check_inputs
from .dpm_solver import library_alphas_cumprod
from .grids import ddim_timesteps, sigma_grid
from .compvis import DDIMSampler, DPMSolverSampler, PLMSSampler
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .dpm_solver import sample_dpm_solver, sample_dpm_solver_pp
from .dpmpp import sample_dpm_multistep, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m
from .euler import sample_euler, sample_euler_ancestral
from .denoisers import cfg_eps_fn, denoiser
from .heun import sample_heun
from .lcm import lcm_timesteps, sample_lcm
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
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}

ETA_ZERO_ONLY = ("plms",)   # takes eta, as CompVis' signature does, but only 0: it is deterministic

# Which grid each sampler walks (see grids.py): the DDIM family's integer timesteps, the k or DPM σ grids, or the
# DPM-Solver library's continuous time grid.
GRID_FAMILY = {"ddpm": "ddim", "ddim": "ddim", "plms": "ddim", "euler": "k", "euler_a": "k", "heun": "k",
               "lms": "k", "dpmpp_2m": "dpm", "dpmpp_3m": "dpm", "dpmpp_2m_sde": "dpm", "unipc": "dpm",
               "dpm_solver": "library", "dpm_solver++": "library", "lcm": "lcm"}


def noise_levels(sampler: str, alphas_cumprod: torch.Tensor, steps: int, **options) -> torch.Tensor:
    """ᾱ of the sample each step of ``sampler`` starts from (float64, one value per step, highest noise first).

    Takes the sampler's grid options (``spacing``, ``karras``, ``grid``, ``timesteps``, ``skip_type``,
    ``discretization``, ``original_inference_steps``);
    others are ignored. ``start_step=k`` with ``x_T = √ᾱ_k x₀ + √(1−ᾱ_k) ε`` (ᾱ_k = ``noise_levels(…)[k]``)
    starts the sampler part-way down, e.g. for img2img."""
    _lookup(sampler)
    check_inputs(torch.zeros(1), alphas_cumprod, steps)
    defaults = {p: v.default for p, v in inspect.signature(SAMPLERS[sampler]).parameters.items()}
    get = lambda name: options.get(name, defaults.get(name))  # noqa: E731
    family = GRID_FAMILY[sampler]
    if family == "library" and get("discretization") == "diffusers":
        family = "dpm"
    ac = alphas_cumprod.detach().double().cpu()
    if family == "ddim":
        ts = ddim_timesteps(steps, get("spacing"), len(ac), get("timesteps"))
        return ac[torch.from_numpy(ts.copy())]
    if family == "lcm":
        ts = lcm_timesteps(steps, len(ac), get("original_inference_steps"), get("timesteps"))
        return ac[torch.from_numpy(ts)]
    if family == "library":
        return library_alphas_cumprod(ac, steps, get("skip_type"))
    sigmas, _ = sigma_grid(ac, steps, get("spacing"), bool(get("karras")), family, grid=get("grid"))
    return 1.0 / (1.0 + sigmas[:-1] ** 2)


def sampler_options(sampler: str) -> list[str]:
    """The keyword options a sampler accepts."""
    params = inspect.signature(_lookup(sampler)).parameters.values()
    return [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]


def sampler_default(sampler: str, option: str):
    """The default value of one of a sampler's keyword options (e.g. eta: 0 for ddim, 1 for euler_a)."""
    parameter = inspect.signature(_lookup(sampler)).parameters.get(option)
    if parameter is None or parameter.kind != inspect.Parameter.KEYWORD_ONLY:
        raise ValueError(f"sampler {sampler!r} has no option {option!r}; it takes {sampler_options(sampler)}")
    return parameter.default


def check_options(sampler: str, options: dict) -> dict:
    """``options`` checked against what ``sampler`` takes, before any work: ``eta=0`` is dropped for samplers
    without noise (it means "deterministic" there too); anything else the sampler does not take is refused with
    the list of what it does take."""
    accepted, options = sampler_options(sampler), dict(options)
    if "eta" in options:
        eta = options["eta"]
        limit = 1.0 if sampler == "ddim" else math.inf   # DDIM's noise cannot exceed the posterior's (eta 1)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) \
                or not 0.0 <= eta <= limit:
            raise ValueError(f"eta must be a number ≥ 0{' and ≤ 1' if limit == 1.0 else ''} (0 = deterministic), "
                             f"got {eta!r}")
        if eta and ("eta" not in accepted or sampler in ETA_ZERO_ONLY):
            with_eta = ", ".join(n for n in SAMPLERS if "eta" in sampler_options(n) and n not in ETA_ZERO_ONLY)
            what = "is deterministic, so eta must be 0" if sampler in ETA_ZERO_ONLY else "has no eta option"
            raise ValueError(f"sampler {sampler!r} {what} (got eta={eta}); the samplers with eta are: {with_eta}")
        if "eta" not in accepted:
            options.pop("eta")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {sampler!r} does not take option(s) {unknown}; it takes: {', '.join(accepted)}")
    return options


def _lookup(sampler: str):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def sample(eps_fn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, sampler: str = "dpmpp_2m", steps: int = 20,
           **options) -> torch.Tensor:
    """Run ``sampler`` for ``steps`` steps from the noise ``x_T``; returns the final sample."""
    fn = _lookup(sampler)
    check_inputs(x_T, alphas_cumprod, steps)
    if "disable_progress" in options:  # the name before progress= was the one switch everywhere
        warnings.warn("disable_progress is deprecated; pass progress=False", DeprecationWarning, stacklevel=2)
        options["progress"] = not options.pop("disable_progress")
    options = check_options(sampler, options)
    check_inpainting_inputs(x_T, options.get("mask"), options.get("known"))
    with torch.no_grad():
        return fn(eps_fn, x_T, alphas_cumprod, steps, **options)


__all__ = ["sample", "SAMPLERS", "sampler_options", "sampler_default", "check_options", "noise_levels",
           "cfg_eps_fn", "denoiser",
           "DDIMSampler", "PLMSSampler", "DPMSolverSampler", "sample_dpm_multistep"]
