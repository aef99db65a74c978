"""Text to image: CompVis ``scripts/txt2img.py`` as a function, with one seed per image and negative prompts."""
from __future__ import annotations

from typing import Sequence

import torch

from .images import round_up
from .plan import fixed_noise, prepare


def txt2img(model, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
            num_images: int | None = None, height: int | None = None, width: int | None = None,
            x_T: torch.Tensor | None = None, **options):
    """Generate ``num_images`` images for ``prompt`` (a string, or one string per image; with a list,
    ``num_images`` defaults to its length). Returns a :class:`PipelineResult`.

    - ``height``/``width``: default ``model.default_image_size`` (512 for SD v1). They must be multiples of the
      autoencoder factor (8 for SD v1). The UNet needs latent sides divisible by 2**(levels − 1) (pixel sides by 64
      for SD v1); for other sizes the latent is sampled at the next size that works, and its top-left part of the
      asked size is decoded (so 520x520 samples a 576x576 canvas).
    - ``x_T`` fixes the starting noise instead of the seeds: [num_images or 1, C, h, w] unit-variance noise at the
      sampling size (``result.latents``' size rounded up).
    - ``negative_prompt`` replaces the empty prompt of the unconditional branch; ``guidance_scale=1`` skips that
      branch entirely (one UNet pass per step).
    - ``options``, shared by every verb (:func:`sdkit.pipelines.plan.prepare`): ``steps`` (20), ``sampler``
      ("dpmpp_2m"; CompVis used ``"ddim"``/``"plms"`` with 50 steps), ``guidance_scale`` (7.5), ``eta`` (ddim,
      euler_a, dpmpp_2m_sde; default: the sampler's own, 0 for ddim and 1 for the ancestral ones), ``seed`` (None, an int — image i gets seed + i — or one per image), ``batch_size``,
      ``callback(step, total, x, x0_pred)``, ``progress``, ``safety_checker``, ``watermark`` (a payload: text or
      bytes, e.g. "sdkit"; None = no mark), ``spacing``, ``karras``, ``decode_tile`` (decode in tiles of this many
      latent pixels), and any option of the sampler (``sdkit.samplers.sampler_options(name)``).
    """
    height = model.default_image_size if height is None else height                        # 1. the canvas
    width = model.default_image_size if width is None else width
    factor, multiple = model.vae_factor, model.unet_multiple
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
            raise ValueError(
                f"{name}={value!r} does not fit this model: image sides must be positive multiples of {factor} "
                f"(the autoencoder factor), and multiples of {factor * multiple} run without padding (e.g. "
                f"{model.default_image_size}, {model.default_image_size + factor * multiple})")
    h, w = height // factor, width // factor
    shape = (int(model.channels), round_up(h, multiple), round_up(w, multiple))
    plan = prepare(model, prompt, negative_prompt, num_images, canvas=(h * factor, w * factor),  # 2. the request
                   verb="txt2img", **options)
    x_T = fixed_noise(x_T, plan.num_images, shape, "x_T", "the latent size rounded up to what the UNet takes")

    latents, pixels = [], []
    for batch in plan.batches():                                                           # 3. per batch:
        start = batch.noise(shape, model.device) if x_T is None else x_T[batch.part].to(model.device)  # noise,
        z = plan.sample(batch, start)[..., :h, :w]                                         # denoise, crop,
        latents.append(z)
        pixels.append(plan.decode(z))                                                      # decode
    return plan.result(pixels, latents, verb="txt2img")                                    # 4. finish
