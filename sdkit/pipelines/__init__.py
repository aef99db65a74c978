"""The user-facing verbs: txt2img, img2img, inpaint / outpaint, upscale.

    import sdkit
    model = sdkit.load_model("sd-v1-inference", "v1-5-pruned-emaonly.safetensors")
    result = sdkit.txt2img(model, "a painting of a virus monster playing guitar", seed=42, num_images=2)
    result.images[0].save("out.png")

Every verb is a few numbered steps over one shared skeleton (``plan.py``: check the request, encode the prompts,
loop over batches, sample through ``sdkit.samplers.denoisers``, decode, finish). They take any sampler of
``sdkit.samplers.SAMPLERS`` with its options, classifier-free guidance with an optional negative prompt, one seed per
image (its noise independent of the batch; ``plan.py`` says what holds exactly), a per-step
``callback(step, total, x, x0_pred)`` (``latent_preview`` turns the x̂₀ latent into pictures), a tqdm progress bar
(``progress=False`` hides it), and optional ``safety_checker`` (``sdkit.safety``) and ``watermark`` (a payload for
``sdkit.watermark``). Each returns a :class:`PipelineResult` (``.images``, ``.latents``, ``.seeds``, ``.nsfw``).
Masks mean 1 (white) = repaint, everywhere.
"""
from ..lazy import lazy_exports

# name -> submodule (named apart from the functions, so neither hides the other); imported on first use, so
# `sdkit --help` does not load torch
_EXPORTS = {"txt2img": "text_to_image", "img2img": "image_to_image", "inpaint": "inpainting",
            "outpaint": "inpainting", "is_inpainting_model": "inpainting", "upscale": "upscaling",
            "is_superresolution_model": "upscaling", "prepare": "plan", "Plan": "plan",
            "decode_tiled": "decoding", "latent_preview": "preview", "PipelineResult": "result",
            "DEFAULT_SAMPLER": "plan", "DEFAULT_STEPS": "plan"}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = sorted(_EXPORTS)
