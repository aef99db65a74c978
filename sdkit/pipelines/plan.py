"""The skeleton every verb shares: check the request once, then run it batch by batch.

    plan = prepare(model, prompt, negative_prompt, num_images, **options)  # 1. prompts, seeds, sampler: checked
    for batch in plan.batches():                                           # 2. encodes the prompts once, then
        z = plan.sample(batch, batch.noise(shape))                         #    per batch: the guided sampler
        latents.append(z); pixels.append(plan.decode(z))                   # 3. latents -> pixels
    return plan.result(pixels, latents)                                    # 4. safety check, watermark, PIL

Seeds: None (fresh random seeds, reported in ``result.seeds``), an int (image i gets seed + i) or a list with one
seed per image. Image i draws everything random from its own ``torch.Generator``, in this order: its starting noise,
then (img2img/inpainting) its posterior sample of the encoded image, then the sampler's noise. So image i is the
same whether it is made alone or in a batch, and with any ``batch_size``.
Latents are the *scaled* latents the UNet sees (``scale_factor ×`` the autoencoder's latent).
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..samplers import SAMPLERS, check_options, noise_levels, sample, sampler_options
from ..samplers.denoisers import denoiser
from .decoding import decode
from .result import PipelineResult, finish

DEFAULT_SAMPLER = "dpmpp_2m"  # DPM-Solver++(2M): good images in 20 steps, deterministic, one model call per step
DEFAULT_STEPS = 20
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]   # (step from 0, total, x, x̂₀), as the samplers


# ------------------------------------------------------------------------------------------------ checks
def check_sampling_args(sampler: str, steps: int, guidance_scale: float = 1.0) -> None:
    """Fail before any expensive work, with messages a person can act on."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (the number of sampling steps), got {steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1.0 = no guidance, 7.5 = SD's default), "
                         f"got {guidance_scale!r}")


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number from 0 to 1 (0 = return the input unchanged, 1 = repaint "
                         f"from pure noise), got {strength!r}")
    return float(strength)


def check_count(num_images: int, batch_size: int | None) -> int:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    batch_size = num_images if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def sampler_kwargs(sampler: str, spacing: str = "compvis", karras: bool = False, eta: float = 0.0,
                   **options) -> dict:
    """The options to hand the sampler: spacing/karras/eta where the sampler takes them; options it does not
    take, or that the pipeline sets itself, are refused here, before any work."""
    reserved = sorted(set(options) & {"mask", "known", "start_step", "generator", "callback", "progress"})
    if reserved:
        raise ValueError(f"the pipeline sets {reserved} itself (use strength, mask, seed, callback, progress)")
    accepted = sampler_options(sampler)
    for name, value, default in (("spacing", spacing, "compvis"), ("karras", karras, False), ("eta", eta, 0.0)):
        if name in accepted or value != default:
            options[name] = value
    return check_options(sampler, options)


def resolve_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    if seed is None:
        return [secrets.randbelow(2 ** 31) for _ in range(n)]
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be None, an int, or a list of {n} ints (one per image), got {seed!r}")
    return [int(s) for s in seeds]


def count_images(prompt, num_images: int | None) -> int:
    """``num_images`` when given; otherwise one image per prompt of a list, or 1 for a single string."""
    if num_images is not None:
        return num_images
    return 1 if isinstance(prompt, str) or prompt is None else len(list(prompt))


def as_prompt_list(prompt: str | Sequence[str], n: int, what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * n
    prompts = list(prompt)
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a list of {n} strings (one per image), got {prompt!r}")
    return prompts


def fixed_noise(noise: torch.Tensor | None, n: int, shape: tuple, what: str, size_note: str) -> torch.Tensor | None:
    """A user's fixed noise [n or 1, *shape] (or [*shape]) expanded to n images; None passes through."""
    if noise is None:
        return None
    if noise.ndim == 3:
        noise = noise[None]
    if tuple(noise.shape[1:]) != tuple(shape) or noise.shape[0] not in (1, n):
        raise ValueError(f"{what} has shape {tuple(noise.shape)}; it must be [{n}{' (or 1)' if n > 1 else ''}, "
                         f"{', '.join(map(str, shape))}] ({size_note})")
    return noise.expand(n, *shape).float()


def check_finite(x: torch.Tensor, stage: str, advice: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{int((~torch.isfinite(x)).sum())} NaN/inf values in {stage}. {advice}")


def encode_prompts(model, prompts: Sequence[str]) -> torch.Tensor:
    """Encode each distinct prompt once (so an over-long prompt warns once, with the cut words) and repeat."""
    unique = list(dict.fromkeys(prompts))
    with torch.no_grad():
        encoded = {p: model.get_learned_conditioning([p]) for p in unique}
    return torch.cat([encoded[p] for p in prompts])


# ------------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Batch:
    """Some of the images, with one CPU generator each (so a seed gives the same image on every device)."""

    part: slice
    generators: list[torch.Generator]

    def __len__(self) -> int:
        return len(self.generators)

    def noise(self, shape: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
        """[len, *shape] standard normal noise, item b from generator b."""
        return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in self.generators]).to(device)


@dataclasses.dataclass
class Plan:
    """A checked request: what to sample, for which prompts and seeds, in which batches, and how to finish."""

    model: Any
    num_images: int
    batch_size: int
    seeds: list[int]
    prompts: list[str] | None        # None: a model without text conditioning
    negatives: list[str] | None
    guidance_scale: float
    sampler: str
    steps: int
    options: dict                    # the sampler's own options (spacing, karras, eta, ...)
    callback: Callback | None = None
    progress: bool = True
    decode_tile: int | None = None
    safety_checker: Any = None
    watermark: str | None = None
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None

    def encode(self) -> None:
        """Encode the prompts (and the negative prompts, when guidance needs the unconditional branch: a negative
        prompt replaces the empty prompt there, where CompVis used "")."""
        if self.prompts is None or self.cond is not None:
            return
        self.cond = encode_prompts(self.model, self.prompts)
        self.uncond = encode_prompts(self.model, self.negatives) if self.guidance_scale != 1.0 else None

    def batches(self):
        self.encode()
        for start in range(0, self.num_images, self.batch_size):
            part = slice(start, min(self.num_images, start + self.batch_size))
            yield Batch(part, [torch.Generator().manual_seed(s) for s in self.seeds[part]])

    def levels(self) -> torch.Tensor:
        """ᾱ at the start of each step of the sampler's grid."""
        return noise_levels(self.sampler, self.model.alphas_cumprod, self.steps, **self.options)

    def start_step(self, strength: float) -> tuple[int, float]:
        """(first step to run, ᾱ where it starts) for img2img's ``strength``: the grid's last int(strength · n)
        steps, at least one, as CompVis and diffusers count them."""
        levels = self.levels()
        n = len(levels)
        start = n - max(1, min(n, int(strength * n)))
        return start, float(levels[start])

    def encode_image(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[1, 3, H, W] pixels -> one float32 scaled latent per image of the batch (each its own posterior sample)."""
        from .decoding import vae_dtype
        model = self.model
        with torch.no_grad():
            posterior = model.encode_first_stage(x.to(model.device, vae_dtype(model)))
        mean = posterior if isinstance(posterior, torch.Tensor) else posterior.mean  # VQ: a tensor; KL: a Gaussian
        check_finite(mean, "the encoded image latents (VAE encoder output)",
                     "The VAE encoder overflowed; run the VAE in float32 (model.first_stage_model.float()).")
        return torch.cat([model.get_first_stage_encoding(posterior, generator=g) for g in batch.generators]).float()

    def sample(self, batch: Batch, x: torch.Tensor, *, start_step: int = 0, concat: list | None = None,
               mask: torch.Tensor | None = None, known: torch.Tensor | None = None) -> torch.Tensor:
        """The guided sampler loop for one batch from ``x``: ``concat`` goes to the UNet input of concat/hybrid
        models; ``mask`` (1 = repaint) and ``known`` blend in a known latent (inpainting)."""
        uncond = None if self.uncond is None else self.uncond[batch.part]
        cond = None if self.cond is None else self.cond[batch.part]
        eps_fn = denoiser(self.model, cond, uncond, self.guidance_scale, concat)
        options = dict(self.options)
        if mask is not None:
            options.update(mask=mask, known=known)
        if start_step:
            options["start_step"] = start_step
        return sample(eps_fn, x, self.model.alphas_cumprod, sampler=self.sampler, steps=self.steps,
                      generator=batch.generators, callback=self.callback, progress=self.progress, **options)

    def decode(self, z: torch.Tensor, overlap: int = 8) -> torch.Tensor:
        return decode(self.model, z, self.decode_tile, overlap)

    def result(self, pixels: list[torch.Tensor], latents: list[torch.Tensor],
               init_latents: list[torch.Tensor] | None = None, **extra) -> PipelineResult:
        """Finish (safety check, watermark, PIL) and record what made each image (``extra``: the verb's own
        settings, e.g. strength)."""
        images, nsfw, safety = finish(torch.cat(pixels), self.safety_checker, self.watermark)
        return PipelineResult(images, torch.cat(latents), self.seeds, nsfw,
                              None if init_latents is None else torch.cat(init_latents), safety,
                              self.parameters(images, **extra))

    def parameters(self, images, **extra) -> list[dict]:
        from .metadata import model_identity
        guided = self.guidance_scale != 1.0 and self.prompts is not None
        common = {"sampler": self.sampler, "steps": self.steps, "guidance_scale": self.guidance_scale,
                  "karras": bool(self.options.get("karras", False)), "eta": self.options.get("eta", 0.0),
                  "spacing": self.options.get("spacing"), **model_identity(self.model), **extra}
        return [{"prompt": None if self.prompts is None else self.prompts[i],
                 "negative_prompt": self.negatives[i] if guided else "", "seed": seed,
                 "width": image.width, "height": image.height, **common}
                for i, (seed, image) in enumerate(zip(self.seeds, images))]


def prepare(model, prompt: str | Sequence[str] | None, negative_prompt: str | Sequence[str] = "",
            num_images: int | None = None, *, steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
            guidance_scale: float = 7.5, eta: float = 0.0, seed: int | Sequence[int] | None = None,
            batch_size: int | None = None, callback: Callback | None = None, safety_checker=None,
            watermark: str | None = None, spacing: str = "compvis", karras: bool = False, progress: bool = True,
            decode_tile: int | None = None, text: bool = True, **sampler_options) -> Plan:
    """Check the options every verb shares and settle them into a :class:`Plan` (nothing is computed yet).

    ``text=False``: the model takes no prompt (a concat-only upscaler); guidance is then off."""
    check_sampling_args(sampler, steps, guidance_scale)
    options = sampler_kwargs(sampler, spacing, karras, eta, **sampler_options)
    num_images = count_images(prompt, num_images)
    batch_size = check_count(num_images, batch_size)
    prompts = negatives = None
    if text:
        prompts = as_prompt_list("" if prompt is None else prompt, num_images)
        negatives = as_prompt_list(negative_prompt, num_images, "negative_prompt")
    return Plan(model, num_images, batch_size, resolve_seeds(seed, num_images), prompts, negatives,
                float(guidance_scale) if text else 1.0, sampler, steps, options, callback, progress, decode_tile,
                safety_checker, watermark)
