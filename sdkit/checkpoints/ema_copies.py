"""The EMA copies of the UNet that CompVis checkpoints carry (LitEma's ``model_ema.*`` keys): find, pick or drop them.

Not to be confused with :mod:`sdkit.ema`, which keeps the moving average during training.
"""
from __future__ import annotations

import warnings

from .keys import UNET_PREFIX

EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")


def has_ema(state_dict: dict) -> bool:
    """True when the state dict carries LitEma copies of the UNet (``model_ema.<flattened name>``)."""
    return any(k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS for k in state_dict)


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def extract_ema(state_dict: dict) -> dict:
    """The state dict with the UNet weights replaced by their EMA copies and every ``model_ema.*`` key dropped.

    CompVis stores the EMA under flattened names (dots removed); each real UNet parameter name is flattened the
    same way to find its copy. Without EMA copies the UNet weights are kept (and ``model_ema.*`` still dropped).
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    if not has_ema(state_dict):
        return out
    unet_keys = [k for k in out if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        warnings.warn(f"the checkpoint's EMA covers {len(unet_keys) - len(missing)} of {len(unet_keys)} UNet "
                      f"weights; the others keep their raw values (first without EMA: {missing[0]})", stacklevel=2)
    for k in unet_keys:
        if ema_key(k) in state_dict:
            out[k] = state_dict[ema_key(k)]
    return out


def drop_ema(state_dict: dict) -> dict:
    """The state dict without ``model_ema.*`` keys (the raw training weights)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
