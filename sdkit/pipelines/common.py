"""What every pipeline shares: argument checks, seeds and noise, prompt encoding, the guided ε-function, the
size policy, image and mask inputs, decoding, and the safety/watermark finish.

Conventions (all pipelines):

- Images go in as PIL images, file paths, uint8 arrays [H, W, 3], or float tensors [3, H, W] / [1, 3, H, W] in
  [-1, 1] (the CompVis range). Results are PIL images.
- Latents are the *scaled* latents the UNet sees (``scale_factor ×`` the autoencoder's latent).
- ``seed``: None (fresh random seeds, reported in ``result.seeds``), an int (image i gets seed + i) or a list
  with one seed per image. Image i draws everything random from its own ``torch.Generator``, in this order:
  its starting noise, then (img2img/inpainting) its posterior sample of the encoded image, then the sampler's
  noise. So image i is the same whether it is made alone or in a batch, and with any ``batch_size``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import to_pil, to_tensor
from ..samplers import SAMPLERS, cfg_eps_fn, noise_levels, sample, sampler_options
from ..samplers.compvis import _model_eps_fn

DEFAULT_SAMPLER = "dpmpp_2m"  # DPM-Solver++(2M): good images in 20 steps, deterministic, one model call per step
DEFAULT_STEPS = 20
Callback = Callable[[int, int, torch.Tensor], None]


@dataclasses.dataclass
class PipelineResult:
    """What a pipeline returns.

    images: the final PIL images (flagged ones replaced by the safety checker's placeholder).
    latents: the final scaled latents [B, C, h, w] (None when nothing was sampled, e.g. img2img strength 0).
    seeds: the seed of each image. nsfw: the safety checker's flag per image (all False when it is off).
    init_latents: the encoded input image(s) [B, C, h, w] the sampler started from (img2img, inpainting).
    safety: the checker's full ``SafetyResult`` (None when it is off).
    """

    images: list[Image.Image]
    latents: torch.Tensor | None
    seeds: list[int]
    nsfw: list[bool]
    init_latents: torch.Tensor | None = None
    safety: Any = None

    def __len__(self) -> int:
        return len(self.images)


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


# ------------------------------------------------------------------------------------------------ geometry
@dataclasses.dataclass(frozen=True)
class Geometry:
    """How pixel sizes relate to what the model can take.

    factor: the autoencoder's downsampling (8 for SD v1). unet_multiple: latent sides must be multiples of
    2**(UNet levels − 1) (8 for SD v1), because each level halves the size and the way up must meet the
    skip connections again. So SD v1 pixel sides must be multiples of 64 to run without padding.
    """

    channels: int
    factor: int
    unet_multiple: int
    default_size: int

    @property
    def pixel_multiple(self) -> int:
        return self.factor * self.unet_multiple


def geometry(model) -> Geometry:
    first = model.first_stage_model
    encoder = getattr(first, "encoder", None)
    factor = int(getattr(encoder, "downsampling_factor", 0) or 2 ** (len(first.decoder.up) - 1))
    unet = model.model.diffusion_model
    multiple = 2 ** (len(getattr(unet, "channel_mult", (1,))) - 1)
    return Geometry(int(model.channels), factor, multiple, int(model.image_size) * factor)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad [B, C, H, W] on the right and bottom to the next multiple, mirroring the image (reflection; edge
    replication where the image is too small to mirror). Returns the padded tensor and the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = round_up(h, multiple) - h, round_up(w, multiple) - w
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


# ------------------------------------------------------------------------------------------------ seeds and noise
def resolve_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    if seed is None:
        return [secrets.randbelow(2 ** 31) for _ in range(n)]
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be None, an int, or a list of {n} ints (one per image), got {seed!r}")
    return [int(s) for s in seeds]


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so a seed gives the same image on every device."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise_like(shape: Sequence[int], gens: Sequence[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """[len(gens), *shape] standard normal noise, item b from gens[b]."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens]).to(device)


# ------------------------------------------------------------------------------------------------ prompts
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


def encode_prompts(model, prompts: Sequence[str]) -> torch.Tensor:
    """Encode each distinct prompt once (so an over-long prompt warns once, with the cut words) and repeat."""
    unique = list(dict.fromkeys(prompts))
    with torch.no_grad():
        encoded = {p: model.get_learned_conditioning([p]) for p in unique}
    return torch.cat([encoded[p] for p in prompts])


def guided_eps_fn(model, cond, uncond, guidance_scale: float):
    """The model's ε-function with classifier-free guidance (one batched pass over [uncond, cond]; none at 1.0)."""
    return cfg_eps_fn(_model_eps_fn(model, model.alphas_cumprod), cond, uncond, guidance_scale)


def text_conditioning(model, prompts: list[str], negative: list[str], guidance_scale: float):
    """(cond, uncond) for prompts; uncond is None when guidance is off (scale 1). A negative prompt replaces the
    empty prompt of the unconditional branch (CompVis used "")."""
    cond = encode_prompts(model, prompts)
    uncond = encode_prompts(model, negative) if guidance_scale != 1.0 else None
    return cond, uncond


# ------------------------------------------------------------------------------------------------ sampling
def sampler_kwargs(sampler: str, spacing: str = "compvis", karras: bool = False, eta: float = 0.0,
                   **options) -> dict:
    """The options to hand the sampler: spacing/karras/eta where the sampler takes them; options it does not
    take, or that the pipeline sets itself, are refused here, before any work."""
    reserved = sorted(set(options) & {"mask", "x0", "start_step", "generator", "callback", "disable_progress"})
    if reserved:
        raise ValueError(f"the pipeline sets {reserved} itself (use strength, mask, seed, callback, progress)")
    accepted = sampler_options(sampler)
    for name, value, default in (("spacing", spacing, "compvis"), ("karras", karras, False), ("eta", eta, 0.0)):
        if name in accepted or value != default:
            options[name] = value
    if "eta" in options and "eta" not in accepted:
        raise ValueError(f"sampler {sampler!r} has no eta option (got eta={eta}); the samplers with eta are: "
                         f"{', '.join(n for n in SAMPLERS if 'eta' in sampler_options(n))}")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {sampler!r} does not take option(s) {unknown}; it takes: {', '.join(accepted)}")
    return options


def run_sampler(eps_fn, x_start: torch.Tensor, model, *, sampler: str, steps: int, options: dict,
                start_step: int = 0, gens=None, callback: Callback | None = None, progress: bool = True,
                mask=None, x0=None) -> torch.Tensor:
    """One batch through ``sdkit.samplers.sample`` with the pipeline conventions: the callback gets
    (step, total, x̂₀ latent) with step counted from 1, and the sampler's generator list is the images'."""
    on_step = None
    if callback is not None:
        def on_step(i, total, x, x0_pred):
            callback(i + 1, total, x0_pred)
    options = dict(options)
    if mask is not None:
        options.update(mask=mask, x0=x0)
    if start_step:
        options["start_step"] = start_step
    return sample(eps_fn, x_start, model.alphas_cumprod, sampler=sampler, steps=steps, generator=gens,
                  callback=on_step, disable_progress=not progress, **options)


def grid_levels(model, sampler: str, steps: int, options: dict) -> torch.Tensor:
    """ᾱ at the start of each step of the sampler's grid for ``steps`` steps."""
    return noise_levels(sampler, model.alphas_cumprod, steps, **options)


def steps_for_strength(strength: float, n: int) -> int:
    """How many of the grid's n steps img2img runs: int(strength · n) as CompVis and diffusers, at least one."""
    return max(1, min(n, int(strength * n)))


def noised(z0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """z0 noised to exactly the level ᾱ where the first denoising step starts."""
    return math.sqrt(alpha_cumprod) * z0 + math.sqrt(1.0 - alpha_cumprod) * noise


# ------------------------------------------------------------------------------------------------ images
def image_tensor(image, what: str = "image") -> torch.Tensor:
    """Any accepted image -> float [1, 3, H, W] in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{what}: no such file {str(image)!r}")
        with Image.open(image) as im:
            image = im.copy()
    if isinstance(image, Image.Image):
        return to_tensor(image)[None]
    if isinstance(image, np.ndarray):
        return to_tensor(image)[None]
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[:2] != (1, 3) or not x.is_floating_point():
            raise ValueError(f"{what} as a tensor must be float [3, H, W] or [1, 3, H, W] in [-1, 1], "
                             f"got {x.dtype} {tuple(image.shape)}")
        return x.float().clamp(-1, 1)
    raise TypeError(f"{what} must be a PIL image, a file path, a uint8 array [H, W, 3] or a float tensor "
                    f"[3, H, W] in [-1, 1]; got {type(image).__name__}")


def mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor:
    """A mask -> float [1, 1, H, W] in [0, 1] (1 = white = repaint), checked against the image size (H, W)."""
    if isinstance(mask, (str, os.PathLike)):
        with Image.open(mask) as im:
            mask = im.copy()
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1", "I", "F", "I;16"):
            raise ValueError(f"the mask must be single-channel (a grayscale image: white = repaint, black = keep), "
                             f"got a {mask.mode} image; convert it with mask.convert('L')")
        m = torch.from_numpy(np.asarray(mask.convert("F"), dtype=np.float32).copy())
        m = m / 255.0
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        m = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
        if m.ndim == 4 and m.shape[0] == 1:
            m = m[0]
        if m.ndim == 3:
            if m.shape[0] != 1:
                raise ValueError(f"the mask must be single-channel [H, W] or [1, H, W] (1 = repaint), got shape "
                                 f"{tuple(m.shape)}; for an RGB mask use mask.mean(0, keepdim=True) "
                                 "(or mask[..., 0] for an [H, W, 3] array)")
            m = m[0]
        if m.ndim != 2:
            raise ValueError(f"the mask must be single-channel [H, W] or [1, H, W], got shape {tuple(m.shape)}")
        m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
        if m.min() < 0 or m.max() > 1:
            raise ValueError("mask values must be in [0, 1] (or uint8 0..255): 1 = repaint, 0 = keep")
    else:
        raise TypeError(f"mask must be a grayscale PIL image, a file path, or an array/tensor [H, W]; "
                        f"got {type(mask).__name__}")
    if tuple(m.shape) != tuple(size):
        raise ValueError(f"the mask is {m.shape[1]}x{m.shape[0]} (width x height) but the image is "
                         f"{size[1]}x{size[0]}: they must be the same size; resize the mask with "
                         f"mask.resize(image.size, Image.NEAREST)")
    return m[None, None]


def check_finite(x: torch.Tensor, stage: str, advice: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{int((~torch.isfinite(x)).sum())} NaN/inf values in {stage}. {advice}")


def vae_dtype(model) -> torch.dtype:
    return next(model.first_stage_model.parameters()).dtype


def encode_image(model, x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """[1, 3, H, W] pixels -> one float32 scaled latent per generator (each its own posterior sample)."""
    with torch.no_grad():
        posterior = model.encode_first_stage(x.to(model.device, vae_dtype(model)))
    mean = posterior if isinstance(posterior, torch.Tensor) else posterior.mean  # VQ: a tensor; KL: a Gaussian
    check_finite(mean, "the encoded image latents (VAE encoder output)",
                 "The VAE encoder overflowed; run the VAE in float32 (model.first_stage_model.float()).")
    return torch.cat([model.get_first_stage_encoding(posterior, generator=g) for g in gens]).float()


@torch.no_grad()
def vae_decode(model, z: torch.Tensor) -> torch.Tensor:
    """``decode_first_stage`` in the VAE's dtype (it checks for NaN/inf), back to float32."""
    return model.decode_first_stage(z.to(vae_dtype(model))).float()


def decode(model, z: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
    """Scaled latents -> pixels [B, 3, H, W] in about [-1, 1]; ``tile`` (latent pixels) decodes in tiles."""
    if tile:
        from .tiling import decode_tiled
        return decode_tiled(model, z, tile=tile, overlap=overlap)
    return vae_decode(model, z)


def finish(pixels: torch.Tensor, safety_checker=None, watermark: str | None = None):
    """Pixels in [-1, 1] -> (PIL images, nsfw flags, safety result): the safety check, then the watermark."""
    images01 = ((pixels.detach().float().cpu() + 1) / 2).clamp(0, 1)
    safety = None
    nsfw = [False] * len(images01)
    if safety_checker is not None:
        from ..safety import run_safety_checker
        safety = run_safety_checker(safety_checker, images01)
        images01, nsfw = safety.images, list(safety.nsfw)
    images = [to_pil(x * 2 - 1) for x in images01]
    if watermark:
        from ..watermark import apply_watermark
        images = apply_watermark(images, watermark)
    return images, nsfw, safety


def batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))
