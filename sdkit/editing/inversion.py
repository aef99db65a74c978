"""Inversion of real images: find the starting noise from which DDIM sampling gives the image back.

DDIM with η = 0 is a deterministic map from noise to image, one step at a time (sdkit.samplers.ddim)::

    x_prev = √ᾱ_prev · x̂₀ + √(1−ᾱ_prev) · ε,    x̂₀ = (x − √(1−ᾱ) ε) / √ᾱ,    ε = ε(x, t)

Solved for x, the same step runs backwards: x = √ᾱ · (x_prev − √(1−ᾱ_prev) ε)/√ᾱ_prev + √(1−ᾱ) ε. Only ε(x, t)
needs the unknown x, so **DDIM inversion** (Song et al. 2021; Dhariwal & Nichol 2021) takes ε at the point it
has, x_prev, with the model time t of the step it is undoing (as diffusers' DDIMInverseScheduler and the
null-text code do). Over the grid DDIM sampling walks (``spacing``, ``steps``), from the clean latent up to the
first step's noise level, this gives ``x_T`` with ``sample(eps_fn, x_T, ᾱ, "ddim", steps)`` ≈ the latent. The
error of taking ε at x_prev instead of x shrinks with the step; ``fixed_point_iterations`` removes it by solving
x = back_step(x_prev, ε(x, t)) by fixed-point iteration (Pan et al. 2023, "Effective Real Image Editing with
Accelerated Iterative Diffusion Inversion"), which inverts the sampler's step itself.

With classifier-free guidance s > 1 the guided ε amplifies the error of every step, so inverting with guidance
and sampling back drifts away from the image. **Null-text inversion** (Mokady et al. 2022, "Null-text Inversion
for Editing Real Images using Guided Diffusion Models") keeps the guidance-1 inversion as a pivot trajectory
z*_0 … z*_T and, for each sampling step, optimises the unconditional embedding ∅_t (the empty prompt's text states
to start with, then the previous step's result) so that the guided DDIM step from the current latent lands on the
pivot's next latent: min ‖z*_{t−1} − step(z̄_t, ∅_t, C)‖², ``inner_steps`` Adam steps (lr 1e-2, decaying with the
step index, early stop when the loss is under 1e-5 + 2e-5·step, the paper's settings). The per-step embeddings
then replace the empty prompt during sampling: with the same prompt they give the image back, with an edited
prompt (and prompt-to-prompt's attention injection) they edit it.

    inv = null_text_invert(model, image, "a red circle", steps=50, guidance_scale=7.5)
    z = sample_inversion(model, inv)                        # ≈ the image's latent
    z = sample_inversion(model, inv, prompt="a blue circle")  # the edit
    eps_fn = inverted_eps_fn(model, inv, ["a red circle", "a blue circle"])   # for your own loop / editor

Measured (benchmarks/inversion.py, shipped tiny model, 6 held-out 64×64 images, PSNR against the image): the VAE
alone gives 28.32 dB; DDIM inversion sampled back at guidance 1 27.24 / 27.77 dB (20 / 50 steps), at guidance 5
22.0 / 21.9 dB; with 3 fixed-point iterations 28.32 dB (the VAE's ceiling) and null-text inversion at guidance 5
28.28 / 28.26 dB.

Latents are the scaled latents the UNet sees; the image is encoded with the posterior's mean (no sampling noise).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .. import checks
from ..samplers import sample
from ..samplers.common import call_eps, check_inputs
from ..samplers.ddim import ddim_alphas
from ..samplers.denoisers import cfg_combine, denoiser, model_eps_fn
from ..samplers.grids import ddim_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NULL_TEXT_LR = 1e-2          # Mokady et al.: Adam, lr 1e-2 · (1 − step/100)
NULL_TEXT_TOLERANCE = 1e-5   # early stop when the step's loss is below tolerance + 2e-5 · step


# ------------------------------------------------------------------------------------------------ the steps
def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_next: float) -> torch.Tensor:
    """The deterministic DDIM update from level ᾱ = ``alpha`` to ``alpha_next`` with the noise estimate ``eps``
    (both directions: towards the image when ``alpha_next > alpha``, towards noise when it is smaller)."""
    x0 = (x - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
    return math.sqrt(alpha_next) * x0 + math.sqrt(1 - alpha_next) * eps


def sampling_grid(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "compvis", timesteps=None):
    """(model timesteps, ᾱ at each step's start, ᾱ after each step) of DDIM sampling, highest noise first."""
    ts = ddim_timesteps(steps, spacing, len(alphas_cumprod), timesteps)
    a, a_prev = ddim_alphas(alphas_cumprod, ts)
    return [int(t) for t in ts], a, a_prev


def invert_ddim(eps_fn: EpsFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int = 50, *,
                spacing: str = "compvis", timesteps=None, fixed_point_iterations: int = 0,
                progress: bool = True) -> list[torch.Tensor]:
    """DDIM inversion of the clean sample ``x0`` for any ``eps_fn(x, t)``.

    Returns the path in sampling order: ``path[i]`` is the sample at the start of DDIM sampling step i (so
    ``path[0]`` is x_T, to hand to ``sample(eps_fn, path[0], alphas_cumprod, "ddim", steps, spacing=spacing)``)
    and ``path[-1]`` is ``x0``. ``fixed_point_iterations`` > 0 refines each backward step by evaluating ε at
    the step's own estimate of x instead of at the previous point (exact inversion of the sampler when it
    converges; each iteration costs one more ε evaluation per step)."""
    check_inputs(x0, alphas_cumprod, steps)
    checks.integer(fixed_point_iterations, "fixed_point_iterations", low=0,
                   hint=" (0 = plain DDIM inversion; 3-5 make it nearly exact)")
    ts, a, a_prev = sampling_grid(alphas_cumprod, steps, spacing, timesteps)
    path = [x0]
    x = x0
    with torch.no_grad():
        for i in tqdm(reversed(range(len(ts))), total=len(ts), desc="ddim inversion", disable=not progress,
                      leave=False):
            # undo sampling step i: from level a_prev[i] (where x is) back to a[i]
            eps = call_eps(eps_fn, x, ts[i])
            x_next = ddim_step(x, eps, a_prev[i], a[i])
            for _ in range(fixed_point_iterations):
                x_next = ddim_step(x, call_eps(eps_fn, x_next, ts[i]), a_prev[i], a[i])
            x = x_next
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"DDIM inversion became NaN/inf at timestep {ts[i]}: eps_fn returned "
                                         "NaN/inf or values too large (run the model in float32)")
            path.append(x)
    return path[::-1]


def optimise_null_text(model_eps: Callable, path: Sequence[torch.Tensor], cond: torch.Tensor,
                       uncond: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, guidance_scale: float, *,
                       spacing: str = "compvis", timesteps=None, inner_steps: int = 10,
                       learning_rate: float = NULL_TEXT_LR, tolerance: float = NULL_TEXT_TOLERANCE,
                       progress: bool = True) -> tuple[list[torch.Tensor], list[float]]:
    """Null-text optimisation (Mokady et al. 2022) for any ``model_eps(x, t, c)`` differentiable in ``c``, over a
    pivot ``path`` from :func:`invert_ddim` with the same ``steps``, ``spacing`` and ``timesteps`` (in sampling
    order, one latent more than the grid has steps).

    Returns (one unconditional conditioning per sampling step, each step's final loss, the largest over the
    batch). Images of a batch are optimised independently: the loss is the sum of each image's mean squared
    error, and a step stops early only when every image is under the tolerance."""
    checks.integer(inner_steps, "inner_steps", low=0, hint=" (Adam steps per sampling step; the paper uses 10)")
    checks.number(learning_rate, "learning_rate", low=0.0)
    ts, a, a_prev = sampling_grid(alphas_cumprod, steps, spacing, timesteps)
    if len(path) != len(ts) + 1:
        raise ValueError(f"the path has {len(path)} latents, but the {steps}-step grid (spacing {spacing!r}) has "
                         f"{len(ts)} steps, so it needs {len(ts) + 1}: invert with the same steps and spacing")
    x = path[0]
    nulls, losses = [], []
    current = uncond.detach().expand(x.shape[0], *uncond.shape[1:]).clone()
    for i in tqdm(range(len(ts)), desc="null-text", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), float(ts[i]), dtype=torch.float32, device=x.device)
        target = path[i + 1]
        with torch.no_grad():
            eps_c = model_eps(x, t, cond)
        null = current.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([null], lr=learning_rate * (1.0 - i / 100.0))
        per_image = None
        for _ in range(inner_steps):
            with torch.enable_grad():
                eps = cfg_combine(model_eps(x, t, null), eps_c, guidance_scale)
                per_image = (ddim_step(x, eps, a[i], a_prev[i]) - target).square().flatten(1).mean(1)
                optimiser.zero_grad(set_to_none=True)
                (null.grad,) = torch.autograd.grad(per_image.sum(), [null])
            optimiser.step()
            if float(per_image.detach().max()) < tolerance + i * 2e-5:
                break
        current = null.detach()
        nulls.append(current)
        with torch.no_grad():   # the step with the optimised embedding: where the next step starts from
            x = ddim_step(x, cfg_combine(model_eps(x, t, current), eps_c, guidance_scale), a[i], a_prev[i])
            losses.append(float((x - target).square().flatten(1).mean(1).max()))
    return nulls, losses


def stepwise_guided_eps_fn(model_eps: Callable, cond, nulls: Sequence[torch.Tensor], timesteps: Sequence[int],
                           guidance_scale: float) -> EpsFn:
    """Guidance with one unconditional conditioning per step: ``nulls[i]`` at ``timesteps[i]`` (null-text
    inversion's result on its grid). A timestep off that grid is refused: the embeddings belong to their steps."""
    by_time = {int(t): null for t, null in zip(timesteps, nulls)}

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = round(float(t[0]))
        if key not in by_time or float(t[0]) != key:
            raise ValueError(f"timestep {float(t[0]):g} is not on the grid of the null-text embeddings ({len(nulls)} "
                             "DDIM steps); sample with DDIM on the grid the image was inverted on")
        eps_u, eps_c = model_eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([by_time[key], cond])).chunk(2)
        return cfg_combine(eps_u, eps_c, guidance_scale)
    return eps_fn


# ------------------------------------------------------------------------------------------------ with a model
@dataclasses.dataclass
class Inversion:
    """A real image (or batch) inverted: what sampling needs to give it back, or to edit it.

    ``latent``: x_T [B, C, h, w]; ``path``: the inversion latents in sampling order (``path[-1]`` the image's
    latent); ``prompts``/``cond``: the prompt(s) it was inverted with and their encoding; ``nulls``: with null-text
    inversion, one unconditional conditioning per sampling step (else None: the encoded ``negative_prompt``
    ``uncond``); ``losses``: null-text's final loss per step."""

    latent: torch.Tensor
    path: list[torch.Tensor]
    prompts: list[str]
    cond: torch.Tensor
    uncond: torch.Tensor | None
    steps: int
    spacing: str
    guidance_scale: float
    nulls: list[torch.Tensor] | None = None
    losses: list[float] | None = None

    @property
    def image_latent(self) -> torch.Tensor:
        return self.path[-1]


def image_latents(model, images) -> torch.Tensor:
    """One image or a list of images (PIL, path, array or [-1, 1] tensor; all the same size) -> scaled latents
    [B, C, h, w], from the posterior's mean (deterministic). Sides must be multiples the UNet takes."""
    from ..pipelines.images import image_tensor
    single = not isinstance(images, (list, tuple))
    xs = [image_tensor(im, "image") for im in ([images] if single else images)]
    if not xs:
        raise ValueError("images is an empty list; pass at least one image")
    sizes = {tuple(x.shape[-2:]) for x in xs}
    if len(sizes) > 1:
        raise ValueError(f"the images have different sizes {sorted(sizes)}; resize them to one size first")
    h, w = sizes.pop()
    multiple = model.vae_factor * model.unet_multiple
    if h % multiple or w % multiple:
        raise ValueError(f"the image is {w}×{h} pixels; inversion needs sides that are multiples of {multiple} for "
                         f"this model (e.g. {model.default_image_size}×{model.default_image_size}): resize or crop "
                         "it")
    x = torch.cat(xs).to(model.device)
    with torch.no_grad():
        posterior = model.encode_first_stage(x.to(next(model.first_stage_model.parameters()).dtype))
    mean = posterior if isinstance(posterior, torch.Tensor) else posterior.mean
    return (model.scale_factor * mean).float()


def _encode(model, prompt, n: int, what: str) -> tuple[list[str], torch.Tensor]:
    prompts = checks.texts(prompt, n, what)
    with torch.no_grad():
        return prompts, model.get_learned_conditioning(prompts).float()


def ddim_invert(model, image, prompt: str | Sequence[str] = "", steps: int = 50, *, guidance_scale: float = 1.0,
                negative_prompt: str | Sequence[str] = "", spacing: str = "compvis",
                fixed_point_iterations: int = 0, progress: bool = True) -> Inversion:
    """DDIM inversion of ``image`` (or a list of same-size images) with ``prompt``; guidance 1 (the default)
    inverts with the conditional ε alone, which is what sampling back at guidance 1 undoes best."""
    checks.integer(steps, "steps", low=1)
    checks.number(guidance_scale, "guidance_scale", low=0.0, high=1000.0)
    z = image_latents(model, image)
    prompts, cond = _encode(model, prompt, len(z), "prompt")
    uncond = None
    if guidance_scale != 1.0:
        uncond = _encode(model, negative_prompt, len(z), "negative_prompt")[1]
    eps_fn = denoiser(model, cond, uncond, guidance_scale)
    path = invert_ddim(eps_fn, z, model.alphas_cumprod, steps, spacing=spacing,
                       fixed_point_iterations=fixed_point_iterations, progress=progress)
    return Inversion(path[0], path, prompts, cond, uncond, steps, spacing, float(guidance_scale))


def null_text_invert(model, image, prompt: str | Sequence[str], steps: int = 50, *, guidance_scale: float = 7.5,
                     inner_steps: int = 10, learning_rate: float = NULL_TEXT_LR,
                     tolerance: float = NULL_TEXT_TOLERANCE, spacing: str = "compvis",
                     fixed_point_iterations: int = 0, progress: bool = True) -> Inversion:
    """Null-text inversion: DDIM inversion at guidance 1 as the pivot, then one optimised unconditional
    embedding per step so that guided DDIM sampling (``guidance_scale``) follows the pivot."""
    pivot = ddim_invert(model, image, prompt, steps, spacing=spacing, fixed_point_iterations=fixed_point_iterations,
                        progress=progress)
    _, empty = _encode(model, "", 1, "negative_prompt")
    params = [p for p in model.model.parameters() if p.requires_grad]
    for p in params:        # no weight gradients: only the embedding is optimised
        p.requires_grad_(False)
    try:
        nulls, losses = optimise_null_text(model_eps_fn(model), pivot.path, pivot.cond, empty, model.alphas_cumprod,
                                           steps, guidance_scale, spacing=spacing, inner_steps=inner_steps,
                                           learning_rate=learning_rate, tolerance=tolerance, progress=progress)
    finally:
        for p in params:
            p.requires_grad_(True)
    return dataclasses.replace(pivot, guidance_scale=float(guidance_scale), uncond=None, nulls=nulls,
                               losses=losses)


def _repeat(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"the inversion holds {x.shape[0]} images but {n} prompts were given; give one prompt per "
                     f"image, or invert a single image to sample it with several prompts ({what})")


def inverted_eps_fn(model, inversion: Inversion, prompts: str | Sequence[str] | None = None,
                    guidance_scale: float | None = None) -> EpsFn:
    """The guided ``eps_fn(x, t)`` that samples ``inversion`` back: its prompts (or ``prompts``, e.g. edited
    ones; one inverted image may be sampled with several prompts at once) and, after null-text inversion, step
    i's optimised unconditional embedding at step i's timestep."""
    if prompts is None:
        cond = inversion.cond
    else:
        n = len(prompts) if isinstance(prompts, (list, tuple)) else inversion.latent.shape[0]
        cond = _encode(model, prompts, n, "prompts")[1]
    n = cond.shape[0]
    scale = inversion.guidance_scale if guidance_scale is None else checks.number(
        guidance_scale, "guidance_scale", low=0.0, high=1000.0)
    if inversion.nulls is None:
        uncond = None if inversion.uncond is None else _repeat(inversion.uncond, n, "uncond")
        if uncond is None and scale != 1.0:
            uncond = _encode(model, "", n, "negative_prompt")[1]
        return denoiser(model, cond, uncond, scale)
    ts = sampling_grid(model.alphas_cumprod, inversion.steps, inversion.spacing)[0]
    nulls = [_repeat(null, n, "nulls") for null in inversion.nulls]
    return stepwise_guided_eps_fn(model_eps_fn(model), cond, nulls, ts, scale)


def sample_inversion(model, inversion: Inversion, prompt: str | Sequence[str] | None = None,
                     guidance_scale: float | None = None, progress: bool = True) -> torch.Tensor:
    """DDIM sampling from the inverted latent on the inversion's grid: the image's latent back (same prompt) or an
    edit (another ``prompt``). Returns scaled latents; ``model.decode_first_stage`` turns them into pixels."""
    eps_fn = inverted_eps_fn(model, inversion, prompt, guidance_scale)
    n = inversion.cond.shape[0] if prompt is None else (
        len(prompt) if isinstance(prompt, (list, tuple)) else inversion.latent.shape[0])
    x_T = _repeat(inversion.latent, n, "latent")
    return sample(eps_fn, x_T, model.alphas_cumprod, sampler="ddim", steps=inversion.steps,
                  spacing=inversion.spacing, progress=progress)


__all__ = [
    "Inversion",
    "ddim_invert",
    "ddim_step",
    "image_latents",
    "invert_ddim",
    "inverted_eps_fn",
    "null_text_invert",
    "optimise_null_text",
    "sample_inversion",
    "sampling_grid",
    "stepwise_guided_eps_fn",
]
