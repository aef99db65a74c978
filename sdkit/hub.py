"""Find official Stable Diffusion v1 weights already on this machine (sdkit never downloads them).

    from sdkit.hub import find_sd_v1_weights
    path = find_sd_v1_weights()        # a file or a diffusers folder, or None
    model = sdkit.load_model("sd-v1-inference", path)

Looked for, in order: $SDKIT_SD_V1_WEIGHTS (a file or folder); then the Hugging Face cache (huggingface_hub's
own lookup, so HF_HOME / HF_HUB_CACHE are honoured) for the well-known single files and diffusers folders.
"""
from __future__ import annotations

import os
from pathlib import Path

# (repository, file): single-file CompVis checkpoints, newest first
SINGLE_FILES = [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
    ("runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
    ("runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.ckpt"),
    ("CompVis/stable-diffusion-v-1-4-original", "sd-v1-4.ckpt"),
]
# repositories in the diffusers layout (a folder with unet/, vae/, text_encoder/ ...)
DIFFUSERS_REPOS = ["stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
                   "CompVis/stable-diffusion-v1-4"]
DIFFUSERS_UNET_FILES = ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"]


def find_sd_v1_weights(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The path of SD v1 weights on this machine, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    given = os.environ.get("SDKIT_SD_V1_WEIGHTS")
    if given:
        path = Path(given).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"SDKIT_SD_V1_WEIGHTS={given!r} does not exist; point it at a .safetensors/"
                                    ".ckpt file or a diffusers folder, or unset it")
        return path
    for repo, filename in SINGLE_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    for repo in DIFFUSERS_REPOS:
        for filename in DIFFUSERS_UNET_FILES:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
            if isinstance(found, str):
                return Path(found).parents[1]   # the snapshot folder
    return None
