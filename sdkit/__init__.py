"""sdkit: Stable Diffusion v1 rebuilt from its parts.

    import sdkit
    model = sdkit.load_model("sd-v1-inference", "v1-5-pruned-emaonly.safetensors")

Everything keeps the CompVis names, so scripts written against ``ldm`` port by changing imports.
"""
from .config import bundled_configs, get_obj_from_str, instantiate_from_config, load_config

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy submodules are imported on first use, so `import sdkit` stays fast.
    if name in ("load_model", "load_weights", "save_compvis", "save_diffusers", "read_checkpoint", "check_fits",
                "CheckpointError"):
        from . import checkpoints
        return getattr(checkpoints, name)
    if name == "LatentDiffusion":
        from .diffusion import LatentDiffusion
        return LatentDiffusion
    raise AttributeError(f"module 'sdkit' has no attribute {name!r}")


__all__ = ["bundled_configs", "get_obj_from_str", "instantiate_from_config", "load_config", "load_model",
           "load_weights", "save_compvis", "save_diffusers", "read_checkpoint", "check_fits", "CheckpointError",
           "LatentDiffusion"]
