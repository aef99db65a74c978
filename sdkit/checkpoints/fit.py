"""Do these weights fit this model? Checked on shapes alone, before ``load_state_dict``, with the reason in words:
an SD 2.x or SDXL file, an inpainting file for a text-to-image config, a part missing, another configuration.
"""
from __future__ import annotations

import warnings

from .ema_copies import EMA_COUNTERS, EMA_PREFIX
from .keys import UNET_PREFIX, VAE_PREFIX
from .read import CheckpointError

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
PARTS = {UNET_PREFIX: "the UNet", VAE_PREFIX: "the autoencoder (VAE)", "cond_stage_model.": "the text encoder"}


def _is_harmless_extra(key: str) -> bool:
    """Keys that checkpoints carry but sdkit models need not have (see sd_v1_facts §2)."""
    return (key.endswith("embeddings.position_ids") or key in EMA_COUNTERS or key.startswith(EMA_PREFIX)
            or key == "lvlb_weights" or key.startswith(VAE_PREFIX + "loss."))


def _summary(items: list[str], n: int = 3) -> str:
    shown = "; ".join(items[:n])
    return shown + (f"; ... ({len(items) - n} more)" if len(items) > n else "")


def _shape(state: dict, key: str):
    t = state.get(key)
    return tuple(t.shape) if t is not None else None


def check_fits(state_dict: dict, model_state_dict: dict, config_name: str = "the config", *,
               strict: bool = True) -> dict:
    """Check that CompVis-keyed weights fit a model, before ``load_state_dict``; return the keys to load.

    Raises :class:`CheckpointError` with an explanation for: an SD 2.x / SDXL checkpoint, an inpainting
    checkpoint into a text-to-image config (or the reverse), a file missing a whole part (UNet, VAE, text
    encoder), other shape mismatches (summarised), and, when ``strict``, missing keys. Known-harmless extra keys
    are dropped silently, other extra keys with a warning. Only shapes are read, so meta tensors work.
    """
    _check_model_family(state_dict, model_state_dict, config_name)
    _check_in_channels(state_dict, model_state_dict, config_name)
    absent_parts = _check_parts(state_dict, model_state_dict, config_name, strict)

    mismatched = [f"{k}: checkpoint {_shape(state_dict, k)} vs model {_shape(model_state_dict, k)}"
                  for k in model_state_dict if k in state_dict and _shape(state_dict, k) != _shape(model_state_dict, k)]
    if mismatched:
        raise CheckpointError(f"{len(mismatched)} weight(s) of the checkpoint have other shapes than the model "
                              f"built from {config_name}: {_summary(mismatched)}. The checkpoint was made for "
                              "a different configuration; use the config it was trained with.")

    # Schedule buffers are computed from the config; a file without them (a diffusers folder) is fine.
    missing = [k for k in model_state_dict if k not in state_dict and k not in SCHEDULE_BUFFERS
               and not k.startswith((EMA_PREFIX, *absent_parts)) and not k.endswith("embeddings.position_ids")]
    if missing:
        message = (f"{len(missing)} weight(s) of the model built from {config_name} are not in the checkpoint: "
                   f"{_summary(missing)}")
        if strict:
            raise CheckpointError(message + ". The checkpoint was made for a different configuration; use its "
                                  "config, or pass strict=False to keep those weights at their initial values.")
        warnings.warn(message + "; they keep their initial values (strict=False).", stacklevel=2)

    unexpected = [k for k in state_dict if k not in model_state_dict and not _is_harmless_extra(k)]
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} checkpoint key(s) that {config_name} has no place for: "
                      f"{_summary(unexpected)}", stacklevel=2)
    return {k: v for k, v in state_dict.items() if k in model_state_dict}


def check_finite_weights(state_dict: dict, source: str = "the checkpoint") -> None:
    """Refuse weights holding NaN or inf (a damaged file, or a training run that diverged): a model built from
    them only makes NaN images, reported much later as an overflow."""
    bad = [k for k, t in state_dict.items() if hasattr(t, "is_floating_point") and t.is_floating_point()
           and t.device.type != "meta" and not bool(t.isfinite().all())]
    if bad:
        raise CheckpointError(f"{len(bad)} weight tensor(s) of {source} contain NaN/inf values: {_summary(bad)}. The "
                              "file is damaged or its training diverged (an on_exception.ckpt?); load an earlier "
                              "checkpoint. read_checkpoint(path) gives the raw tensors to inspect.")


def _check_model_family(sd: dict, model: dict, config_name: str) -> None:
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError("this is a Stable Diffusion XL checkpoint (its text encoders live under "
                              "conditioner.embedders.*); sdkit supports SD v1.x (e.g. v1-5-pruned-emaonly).")
    openclip = any(k.startswith("cond_stage_model.model.") for k in sd)
    sd_ctx = _context_dim(sd)
    model_ctx = _context_dim(model)
    if (openclip and not any(k.startswith("cond_stage_model.model.") for k in model)) or (
            sd_ctx == 1024 and model_ctx not in (None, 1024)):
        raise CheckpointError(
            "this is a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, 1024-wide cross-attention); "
            f"sdkit supports SD v1.x, whose {config_name} expects CLIP ViT-L/14 and "
            f"{model_ctx or 768}-wide cross-attention. Use an SD v1.x checkpoint (e.g. v1-5-pruned-emaonly).")


def _context_dim(state: dict) -> int | None:
    for k, t in state.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return int(t.shape[1])
    return None


def _check_in_channels(sd: dict, model: dict, config_name: str) -> None:
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    if key not in sd or key not in model:
        return
    have, want = int(sd[key].shape[1]), int(model[key].shape[1])
    if have == want:
        return
    if have == 9 and want == 4:
        raise CheckpointError(f"this is an inpainting checkpoint (its UNet takes 9 input channels: latent, mask, "
                              f"masked image), but {config_name} builds a 4-channel text-to-image UNet; use config "
                              "'sd-v1-inpainting'.")
    if have == 4 and want == 9:
        raise CheckpointError(f"this is a text-to-image checkpoint (4 UNet input channels), but {config_name} "
                              "builds the 9-channel inpainting UNet; use config 'sd-v1-inference', or an "
                              "inpainting checkpoint such as sd-v1-5-inpainting.")
    raise CheckpointError(f"the checkpoint's UNet takes {have} input channels but {config_name} builds one with "
                          f"{want}; use the config the checkpoint was made with.")


def _check_parts(sd: dict, model: dict, config_name: str, strict: bool) -> tuple[str, ...]:
    """Raise (strict) or warn when the checkpoint lacks a whole part; return the prefixes of absent parts."""
    absent = []
    for prefix, part in PARTS.items():
        if any(k.startswith(prefix) for k in model) and not any(k.startswith(prefix) for k in sd):
            hint = _standalone_hint(sd)
            message = f"the checkpoint has no weights for {part} ({prefix}* keys), which {config_name} needs"
            if strict:
                raise CheckpointError(message + (f". {hint}" if hint else ". It may hold only part of a model; "
                                                 "pass strict=False to keep that part at its initial values."))
            warnings.warn(message + "; that part keeps its initial values (strict=False).", stacklevel=3)
            absent.append(prefix)
    return tuple(absent)


def _standalone_hint(sd: dict) -> str:
    if any(k.startswith(("down_blocks.", "mid_block.", "text_model.", "encoder.down_blocks.")) for k in sd):
        return ("Its keys use diffusers names (down_blocks.*, text_model.*): pass the whole diffusers folder "
                "(with unet/, vae/, text_encoder/ and their config.json) instead of one of its files.")
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        return ("Its keys (encoder.*, decoder.*) are those of a standalone autoencoder file such as "
                "vae-ft-mse-840000-ema-pruned, not a full Stable Diffusion checkpoint.")
    return ""
