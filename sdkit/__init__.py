"""sdkit: Stable Diffusion v1 rebuilt from its parts.

    import sdkit
    model = sdkit.load_model("tiny")                        # or ("sd-v1-inference", "v1-5-pruned-emaonly.safetensors")
    image = sdkit.txt2img(model, "a red circle", guidance_scale=5).images[0]
    x0 = sdkit.samplers.sample(eps_fn, x_T, model.alphas_cumprod, sampler="dpmpp_2m", steps=20)

Everything keeps the CompVis names, so scripts written against ``ldm`` port by changing imports. Names and
submodules are imported on first use (``dir(sdkit)`` lists them all).
"""
from .config import bundled_configs, get_obj_from_str, instantiate_from_config, load_config
from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # loading and saving weights
    "load_model": "checkpoints", "load_weights": "checkpoints", "save_compvis": "checkpoints",
    "save_diffusers": "checkpoints", "read_checkpoint": "checkpoints", "check_fits": "checkpoints",
    "CheckpointError": "checkpoints",
    # the model
    "LatentDiffusion": "diffusion",
    # the verbs
    "txt2img": "pipelines", "img2img": "pipelines", "inpaint": "pipelines", "outpaint": "pipelines",
    "upscale": "pipelines", "latent_preview": "pipelines", "PipelineResult": "pipelines",
    # LoRA files (kohya/A1111, diffusers/PEFT) on a model
    "load_lora": "lora",
    # textual-inversion embeddings (A1111 .pt / .safetensors) in a model's text encoder
    "load_embedding": "textual_inversion",
    # sampling on any ε-function
    "sample": "samplers", "SAMPLERS": "samplers", "denoiser": "samplers",
    # the submodules people reach for
    **{name: "" for name in ("nn", "samplers", "pipelines", "schedules", "data", "training", "safety", "watermark",
                              "widgets", "checkpoints", "diffusion", "lora",
                              "textual_inversion")},
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = ["bundled_configs", "get_obj_from_str", "instantiate_from_config", "load_config", *_EXPORTS]
