"""Pieces every sampler shares: input checks, the progress loop, noise, and the σ-space denoiser wrapper.

Conventions (see ``sdkit.samplers.sample``):

- ``eps_fn(x, t)`` takes the variance-preserving (VP) sample ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` and float timesteps
  ``t`` of shape [B], and returns ε with the shape of ``x``.
- Samplers that work in σ (k-diffusion style: ``x_σ = x₀ + σ ε = x_t / √ᾱ_t``) turn ε into the denoised
  ``x̂₀ = x_σ − σ ε`` through :func:`sigma_denoiser`.
- Every sampler returns, and passes to ``callback``, samples in VP scaling, so all samplers agree on what ``x`` means.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def check_schedule(alphas_cumprod: torch.Tensor) -> None:
    """ᾱ_t of a diffusion schedule: a float 1-D tensor, finite, inside (0, 1) and strictly decreasing (every
    timestep adds noise). Anything else gives garbage or a math error deep in a sampler, so it is refused here."""
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
        raise ValueError("alphas_cumprod must be a 1-D tensor of ᾱ_t for every training timestep "
                         "(e.g. model.alphas_cumprod or sdkit.schedules.sd_v1_alphas_cumprod())")
    if not alphas_cumprod.is_floating_point():
        raise ValueError(f"alphas_cumprod must be a floating-point tensor (ᾱ_t in (0, 1)), got dtype "
                         f"{alphas_cumprod.dtype}; e.g. sdkit.schedules.sd_v1_alphas_cumprod()")
    ac = alphas_cumprod.detach().double().cpu()
    bad = ~torch.isfinite(ac)
    if bool(bad.any()):
        raise ValueError(f"alphas_cumprod contains {int(bad.sum())} NaN/inf value(s) (first at timestep "
                         f"{int(bad.nonzero()[0])}); every ᾱ_t must be a number in (0, 1)")
    outside = (ac <= 0) | (ac >= 1)
    if bool(outside.any()):
        t = int(outside.nonzero()[0])
        raise ValueError(f"alphas_cumprod must lie strictly between 0 and 1 (ᾱ_t = signal fraction at timestep t); "
                         f"ᾱ[{t}] = {float(ac[t]):g}" + (" (zero-terminal-SNR schedules are not supported by these "
                                                         "samplers: clip the last ᾱ to a small positive value)"
                                                         if float(ac[t]) == 0.0 else ""))
    rising = ac[1:] >= ac[:-1]
    if bool(rising.any()):
        t = int(rising.nonzero()[0]) + 1
        raise ValueError(f"alphas_cumprod must decrease strictly with t (more noise at every step), but ᾱ[{t}] = "
                         f"{float(ac[t]):g} ≥ ᾱ[{t - 1}] = {float(ac[t - 1]):g}"
                         + (" (is it reversed? pass alphas_cumprod.flip(0))" if float(ac[-1]) > float(ac[0]) else ""))


def check_inputs(x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int) -> None:
    """Fail early, with a message a person can act on, instead of deep inside a loop."""
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise TypeError(f"x_T must be a floating-point tensor of noise, got {type(x_T).__name__}"
                        + (f" of dtype {x_T.dtype}" if isinstance(x_T, torch.Tensor) else ""))
    check_schedule(alphas_cumprod)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (the number of sampling steps), got {steps!r}")
    if steps > len(alphas_cumprod):
        raise ValueError(f"steps={steps} is more than the {len(alphas_cumprod)} training timesteps of this schedule")
    if x_T.numel() and not bool(torch.isfinite(x_T).all()):
        raise ValueError(f"x_T contains {int((~torch.isfinite(x_T)).sum())} NaN/inf value(s) (of {x_T.numel()}); "
                         "the starting noise must be finite, e.g. torch.randn(...)")


def check_inpainting_inputs(x_T: torch.Tensor, mask, known) -> None:
    """``mask`` (1 = repaint) in [0, 1] and ``known`` finite, both broadcastable to the sample's shape."""
    check_inpainting(mask, known)
    if mask is None:
        return
    for name, t in (("mask", mask), ("known", known)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        try:
            torch.broadcast_shapes(t.shape, x_T.shape)
        except RuntimeError:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to the sample's "
                             f"{tuple(x_T.shape)}") from None
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains {int((~torch.isfinite(t)).sum())} NaN/inf value(s)")
    if float(mask.min()) < 0 or float(mask.max()) > 1:
        raise ValueError(f"mask values must lie in [0, 1] (1 = repaint, 0 = keep known), got "
                         f"[{float(mask.min()):g}, {float(mask.max()):g}]")


def time_dtype(x: torch.Tensor) -> torch.dtype:
    """Timesteps go to the model as float32 (float64 when the sample itself is float64, e.g. in tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def timestep_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=time_dtype(x), device=x.device)


def call_eps(eps_fn: EpsFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """Evaluate ε at one timestep for the whole batch, and check the answer has the shape of x."""
    eps = eps_fn(x, timestep_batch(t, x))
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        shape = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise ValueError(f"eps_fn returned {shape} for an input of shape {tuple(x.shape)}; it must return the "
                         "ε-prediction with the same shape as x (a model with learned variance returns 2C "
                         "channels: keep the first C)")
    return eps


def randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (the CPU by default) and moved,
    so that one seed gives the same noise on every device. ``generator`` may also be a list with one generator
    per batch item: then item b's noise comes from its own generator, so it does not depend on the batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample")
        return torch.cat([randn(x[b:b + 1], g) for b, g in enumerate(generator)])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def check_start_step(start_step: int, n: int) -> None:
    """``start_step`` skips the first steps of an ``n``-step grid (img2img); at least one step must remain."""
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < n:
        raise ValueError(f"start_step must be an integer from 0 to {n - 1} (this grid has {n} steps), "
                         f"got {start_step!r}")


def check_inpainting(mask, known) -> None:
    if (mask is None) != (known is None):
        raise ValueError("inpainting needs both mask and known (mask = 1 where the sampler repaints, 0 where the "
                         "latent known is kept)")


def sigma_denoiser(eps_fn: EpsFn, sigmas: torch.Tensor, timesteps: torch.Tensor):
    """``denoise(x, i)``: x̂₀ for a σ-space sample ``x`` at grid point ``i`` (σ = sigmas[i], model time
    timesteps[i]). The model sees ``x / √(1+σ²)``, the VP sample it was trained on."""
    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        sigma = float(sigmas[i])
        eps = call_eps(eps_fn, x / math.sqrt(1.0 + sigma ** 2), float(timesteps[i]))
        return x - sigma * eps
    return denoise


def vp_scale(sigma: float) -> float:
    """Factor that takes a σ-space sample to VP scaling: 1/√(1+σ²) (1 at σ = 0)."""
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2)


class StepLoop:
    """The loop every sampler runs: a tqdm bar (``progress=False`` turns it off), a NaN/inf check after every
    step, and ``callback(step, total, x, x0_pred)`` for live previews."""

    def __init__(self, name: str, total: int, callback: Callback | None = None, progress: bool = True,
                 timesteps=None):
        self.name, self.total, self.callback, self.timesteps = name, total, callback, timesteps
        self.bar = tqdm(range(total), desc=name, disable=not progress, leave=False)

    def __iter__(self):
        return iter(self.bar)

    def done(self, i: int, x: torch.Tensor, x0: torch.Tensor, scale: float = 1.0) -> None:
        """Report step ``i``: ``x`` is the new sample (``scale`` takes it to VP scaling), ``x0`` the x̂₀ used."""
        if not torch.isfinite(x).all():
            where = "" if self.timesteps is None else f" (model timestep {float(self.timesteps[i]):g})"
            self.bar.close()
            location = f"sampler {self.name!r}: the sample became NaN/inf at step {i + 1} of {self.total}{where}"
            half = x.dtype in (torch.float16, torch.bfloat16)
            error = FloatingPointError(
                f"{location}: eps_fn returned NaN/inf, or values too large for the sampler's arithmetic; check that "
                "it returns finite values for finite inputs"
                + (f" (the sample is {x.dtype}: run in float32)" if half else ""))
            error.location = location
            raise error
        if self.callback is not None:
            self.callback(i, self.total, x * scale if scale != 1.0 else x, x0)


def start_sigma_sampler(x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_T is unit-variance noise (the VP sample at the first timestep); σ-space samplers start from
    ``x_T · √(1+σ_max²)``, as diffusers' ``init_noise_sigma`` does for SD's leading spacing."""
    return x_T * math.sqrt(1.0 + float(sigmas[0]) ** 2)


def blend(x: torch.Tensor, known_noised: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting blend: the sample where ``mask`` is 1 (repaint), ``known_noised`` where it is 0 (keep)."""
    return known_noised * (1.0 - mask) + mask * x


def blend_known(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, alpha_cumprod: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """CompVis inpainting blend of a VP sample: keep ``known`` noised to the level ᾱ where ``mask`` is 0."""
    return blend(x, math.sqrt(alpha_cumprod) * known + math.sqrt(1.0 - alpha_cumprod) * randn(x, generator), mask)


def blend_known_sigma(x: torch.Tensor, known: torch.Tensor | None, mask: torch.Tensor | None, sigma: float,
                      generator) -> torch.Tensor:
    """The same blend for a σ-space sample (known + σ z); a no-op without a mask."""
    if mask is None:
        return x
    return blend(x, known + float(sigma) * randn(x, generator), mask)


def prepare_sigma_sampler(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                          spacing: str, karras: bool, family: str, final: str = "zero", start_step: int = 0,
                          grid=None):
    """Grid, starting sample and denoiser for a σ-space sampler: returns (x, sigmas, timesteps, denoise).

    ``start_step`` drops the first grid steps (img2img): x_T is then the VP sample at σ = sigmas[start_step].
    ``grid`` names a σ grid instead of the spacing's timesteps (``grids.sigma_grid``)."""
    from .grids import sigma_grid
    sigmas, ts = sigma_grid(alphas_cumprod, steps, spacing, karras, family, final, grid)
    check_start_step(start_step, len(ts))
    sigmas, ts = sigmas[start_step:], ts[start_step:]
    return start_sigma_sampler(x_T, sigmas), sigmas, ts, sigma_denoiser(eps_fn, sigmas, ts)
