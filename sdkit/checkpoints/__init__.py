"""Stable Diffusion checkpoints in and out: CompVis ``.ckpt`` / ``.safetensors`` files and diffusers folders.

    model = load_model("sd-v1-inference", "v1-5-pruned-emaonly.safetensors")   # or a .ckpt, or a diffusers folder
    save_compvis(model, "mine.safetensors")
    save_diffusers(model, "mine-diffusers/")

Reading never runs code from a file unless asked: pickles load with ``torch.load(weights_only=True)``. Loading
checks that the weights fit the config before touching the model and explains mismatches in words (an SD 2.x
file, an inpainting file, a missing autoencoder, ...). Writing is atomic (:mod:`sdkit.atomic`): a crash leaves
the old file intact.

One concern per module, in the order a checkpoint travels:

    read.py             format sniffing, safe unpickling, safetensors, diffusers folders -> CompVis keys
    keys.py             the CompVis <-> diffusers / transformers key maps and config.json translations
    ema_copies.py       the UNet's EMA copies stored in the file (``model_ema.*``): pick or drop them
    fit.py              do the weights fit the model? (shapes only, reasons in words)
    load.py             load_model / load_weights, and where the shipped weights live
    write_compvis.py    save_compvis: one .safetensors or .ckpt file
    write_diffusers.py  save_diffusers: a folder diffusers' from_pretrained loads
"""
from .ema_copies import EMA_COUNTERS, EMA_PREFIX, drop_ema, ema_key, extract_ema, has_ema
from .fit import PARTS, SCHEDULE_BUFFERS, check_fits
from .keys import UNET_PREFIX, VAE_PREFIX
from .load import data_dir, load_model, load_weights, shipped_weights
from .read import PICKLE_SUFFIXES, CheckpointError, read_checkpoint
from .write_compvis import save_compvis
from .write_diffusers import save_diffusers

__all__ = ["CheckpointError", "read_checkpoint", "has_ema", "ema_key", "extract_ema", "drop_ema", "check_fits",
           "load_weights", "load_model", "data_dir", "shipped_weights", "save_compvis", "save_diffusers",
           "PICKLE_SUFFIXES", "SCHEDULE_BUFFERS", "EMA_PREFIX", "EMA_COUNTERS", "PARTS", "UNET_PREFIX",
           "VAE_PREFIX"]
