"""The skeleton every verb shares: check the request once, then run it batch by batch.

    plan = prepare(model, prompt, negative_prompt, num_images, **options)  # 1. prompts, seeds, sampler: checked
    for batch in plan.batches():                                           # 2. encodes the prompts once, then
        z = plan.sample(batch, batch.noise(shape))                         #    per batch: the guided sampler
        latents.append(z); pixels.append(plan.decode(z))                   # 3. latents -> pixels
    return plan.result(pixels, latents)                                    # 4. safety check, watermark, PIL

Seeds: None (fresh random seeds, reported in ``result.seeds``), an int (image i gets seed + i) or a list with one
seed per image. Image i draws everything random from its own ``torch.Generator``, in this order: its starting noise,
then (img2img/inpainting) its posterior sample of the encoded image, then the sampler's noise. So nothing random in
image i depends on the other images of the request. What holds, measured on the CPU (tests/test_bad_inputs.py):

- the same request gives bit-identical images, and so does the same seed and prompt in a batch of the same size
  with other companions, at any position;
- made alone or in a batch of another size, an image agrees up to float rounding, not bit for bit: batched
  matrix products sum in another order (the kernels are chosen by shape). Latents differ by about 1e-5 (at most
  3.4e-5 of a latent range of 5 with the shipped tiny model, 8 guided steps) and a few pixels by 1/255 (3 of
  16,384 there). For bit-identical images across runs, keep ``batch_size`` the same.
Latents are the *scaled* latents the UNet sees (``scale_factor ×`` the autoencoder's latent).
"""
from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Callable, Sequence

import torch

from .. import checks
from ..samplers import SAMPLERS, check_options, noise_levels, sample, sampler_default, sampler_options
from ..samplers.denoisers import denoiser
from .decoding import decode
from .memory import check_memory
from .result import PipelineResult, finish

DEFAULT_SAMPLER = "dpmpp_2m"  # DPM-Solver++(2M): good images in 20 steps, deterministic, one model call per step
DEFAULT_STEPS = 20
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]   # (step from 0, total, x, x̂₀), as the samplers


# ------------------------------------------------------------------------------------------------ checks
MAX_GUIDANCE = 1000.0   # beyond this the guided ε is mostly the amplified difference of two predictions: garbage


def check_sampling_args(sampler: str, steps: int, guidance_scale: float = 1.0) -> None:
    """Fail before any expensive work, with messages a person can act on."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    checks.integer(steps, "steps", low=1, hint=" (the number of sampling steps)")
    checks.number(guidance_scale, "guidance_scale", low=-MAX_GUIDANCE, high=MAX_GUIDANCE,
                  hint=" (1 = no guidance, 7.5 = SD's default; SD works with about 1 to 20)")


def check_strength(strength: float) -> float:
    return checks.number(strength, "strength", low=0.0, high=1.0,
                         hint=" (0 = return the input unchanged, 1 = repaint from pure noise)")


def check_count(num_images: int, batch_size: int | None) -> int:
    checks.integer(num_images, "num_images", low=1)
    batch_size = num_images if batch_size is None else batch_size
    return checks.integer(batch_size, "batch_size", low=1, hint=" (images sampled at once)")


def check_decode_tile(decode_tile: int | None) -> int | None:
    if decode_tile is None:
        return None
    return checks.integer(decode_tile, "decode_tile", low=0,
                          hint=" (latent pixels per tile, e.g. 64; 0 or None = decode whole)")


def check_watermark(watermark: str | bytes | None) -> str | bytes | None:
    """The payload to mark the images with (None or False: no mark), checked before anything is generated: an
    int or float payload would otherwise be found wrong only after sampling (and bytes(123) is 123 NUL bytes)."""
    if watermark is None or watermark is False:
        return None
    from ..watermark import payload_bytes
    payload_bytes(watermark)     # refuses anything but non-empty text or bytes, in words
    return watermark


def sampler_kwargs(sampler: str, spacing: str = "compvis", karras: bool = False, eta: float | None = None,
                   **options) -> dict:
    """The options to hand the sampler: spacing/karras/eta where the sampler takes them; options it does not
    take, or that the pipeline sets itself, are refused here, before any work. ``eta=None`` is the sampler's own
    default (0 for ddim, 1 for the ancestral euler_a and dpmpp_2m_sde, as k-diffusion and diffusers have them)."""
    reserved = sorted(set(options) & {"mask", "known", "start_step", "generator", "callback", "progress"})
    if reserved:
        raise ValueError(f"the pipeline sets {reserved} itself (use strength, mask, seed, callback, progress)")
    accepted = sampler_options(sampler)
    if eta is None:
        eta = sampler_default(sampler, "eta") if "eta" in accepted else 0.0
    for name, value, default in (("spacing", spacing, "compvis"), ("karras", karras, False), ("eta", eta, 0.0)):
        if name in accepted or value != default:
            options[name] = value
    return check_options(sampler, options)


def resolve_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """One seed per image: ``seed + i`` for an int, the list itself, or fresh random seeds for None."""
    resolved = checks.seeds(seed, n)
    return [secrets.randbelow(2 ** 31) for _ in range(n)] if resolved is None else resolved


def count_images(prompt, num_images: int | None) -> int:
    """``num_images`` when given; otherwise one image per prompt of a list, or 1 for a single string."""
    if num_images is not None:
        return num_images
    if isinstance(prompt, (list, tuple)):
        return max(1, len(prompt))
    return 1


def as_prompt_list(prompt: str | Sequence[str], n: int, what: str = "prompt") -> list[str]:
    return checks.texts(prompt, n, what)


def fixed_noise(noise: torch.Tensor | None, n: int, shape: tuple, what: str, size_note: str) -> torch.Tensor | None:
    """A user's fixed noise [n or 1, *shape] (or [*shape]) expanded to n images; None passes through."""
    if noise is None:
        return None
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"{what} must be a float tensor of unit-variance noise, got "
                        f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.ndim == 3:
        noise = noise[None]
    if tuple(noise.shape[1:]) != tuple(shape) or noise.shape[0] not in (1, n):
        raise ValueError(f"{what} has shape {tuple(noise.shape)}; it must be [{n}{' (or 1)' if n > 1 else ''}, "
                         f"{', '.join(map(str, shape))}] ({size_note})")
    checks.finite(noise, what, "; it must be finite unit-variance noise, e.g. torch.randn(...)")
    return noise.expand(n, *shape).float()


def check_finite(x: torch.Tensor, stage: str, advice: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{int((~torch.isfinite(x)).sum())} NaN/inf values in {stage}. {advice}")


def is_half(module) -> bool:
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters())


def non_finite_weights(module, limit: int = 3) -> list[str]:
    """Names of (at most ``limit``) parameters or buffers of ``module`` holding NaN/inf."""
    bad = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def explain_non_finite(plan: "Plan", cond, uncond) -> str:
    """Why the sample became NaN/inf, from what the plan knows (its inputs were checked finite before)."""
    model, unet = plan.model, plan.model.model
    bad = non_finite_weights(unet)
    if bad:
        return (f"the UNet's weights contain NaN/inf ({', '.join(bad)}): the checkpoint is damaged or its training "
                "diverged; load other weights")
    for name, c in (("the encoded prompt", cond), ("the encoded negative prompt", uncond)):
        if isinstance(c, torch.Tensor) and not bool(torch.isfinite(c).all()):
            stage = getattr(model, "cond_stage_model", None)
            weights = non_finite_weights(stage) if stage is not None else []
            return (f"{name} contains NaN/inf" + (f": the text encoder's weights do ({', '.join(weights)})"
                                                  if weights else ""))
    if is_half(unet):
        return ("the UNet runs in float16/bfloat16 and overflowed: run it in float32 "
                "(load_model(..., dtype=torch.float32) or model.model.float())")
    if abs(plan.guidance_scale) > 30:
        return (f"guidance_scale={plan.guidance_scale:g} amplifies the difference of the two predictions until it "
                "overflows; SD works with about 1 to 20 (7.5 by default)")
    return ("the model returned NaN/inf for finite inputs in float32 (its weights and the encoded prompts are "
            "finite): an overflow inside the model")


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
    watermark: str | bytes | None = None
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
        try:
            return sample(eps_fn, x, self.model.alphas_cumprod, sampler=self.sampler, steps=self.steps,
                          generator=batch.generators, callback=self.callback, progress=self.progress, **options)
        except FloatingPointError as e:
            where = getattr(e, "location", f"sampler {self.sampler!r}: the sample became NaN/inf")
            raise FloatingPointError(f"{where}: {explain_non_finite(self, cond, uncond)}") from e

    def decode(self, z: torch.Tensor, overlap: int = 8) -> torch.Tensor:
        """Latents -> pixels; with ``decode_tile`` in tiles overlapping by ``overlap`` latent pixels (at most half
        a tile, so that any tile size works)."""
        return decode(self.model, z, self.decode_tile, min(overlap, (self.decode_tile or 0) // 2))

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


def prepare(model, prompt: str | Sequence[str] | None, negative_prompt: str | Sequence[str] | None = "",
            num_images: int | None = None, *, steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
            guidance_scale: float = 7.5, eta: float | None = None, seed: int | Sequence[int] | None = None,
            batch_size: int | None = None, callback: Callback | None = None, safety_checker=None,
            watermark: str | bytes | None = None, spacing: str = "compvis", karras: bool = False, progress: bool = True,
            decode_tile: int | None = None, text: bool = True, canvas: tuple[int, int] | None = None,
            encode: bool = False, verb: str = "this request", **sampler_options) -> Plan:
    """Check the options every verb shares and settle them into a :class:`Plan` (nothing is computed yet).

    ``text=False``: the model takes no prompt (a concat-only upscaler); guidance is then off.
    ``canvas``: the (height, width) in pixels the verb will decode (``encode``: and encode); a request that would
    need more memory than is available is refused here, before anything is allocated
    (:func:`sdkit.pipelines.memory.check_memory`)."""
    check_sampling_args(sampler, steps, guidance_scale)
    options = sampler_kwargs(sampler, spacing, karras, eta, **sampler_options)
    num_images = count_images(prompt, num_images)
    batch_size = check_count(num_images, batch_size)
    decode_tile = check_decode_tile(decode_tile)
    watermark = check_watermark(watermark)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function callback(step, total, x, x0_pred), got {callback!r:.60}")
    guided = text and float(guidance_scale) != 1.0
    if canvas is not None:
        check_memory(model, num_images, min(batch_size, num_images), *canvas, guided=guided,
                     decode_tile=decode_tile, encode=encode, verb=verb)
    prompts = negatives = None
    if text:
        if prompt is None:
            raise TypeError('prompt must be a string or a list of strings (use "" for an unconditional image), '
                            "got None")
        prompts = as_prompt_list(prompt, num_images)
        negatives = as_prompt_list("" if negative_prompt is None else negative_prompt, num_images,
                                   "negative_prompt")
    return Plan(model, num_images, batch_size, resolve_seeds(seed, num_images), prompts, negatives,
                float(guidance_scale) if text else 1.0, sampler, steps, options, callback, progress, decode_tile,
                safety_checker, watermark)
