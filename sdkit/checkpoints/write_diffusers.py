"""Writing a diffusers model folder (unet/, vae/, text_encoder/, scheduler/, tokenizer/, model_index.json) that
diffusers' ``from_pretrained`` loads, assembled under a temporary name and renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_folder
from . import keys
from .write_compvis import save_safetensors, tensors_for_saving


def save_diffusers(model: nn.Module, folder: str | os.PathLike, *, config: Any = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers folder: unet/, vae/, text_encoder/ (safetensors + config.json),
    scheduler/, tokenizer/ and model_index.json, loadable by diffusers' ``from_pretrained``.

    The model's current weights are written; for EMA weights use ``with model.ema_scope(): save_diffusers(...)``.
    ``config`` (a bundled name, YAML path or dict) overrides the architecture read from the model.
    The folder is assembled under a temporary name and renamed into place when complete.
    """
    folder = Path(folder)
    unet_params, ddconfig, embed_dim = _architecture(model, config)
    parts = keys.split_compvis(tensors_for_saving(model.state_dict(), dtype))
    latent_size = int(getattr(model, "image_size", unet_params.get("image_size", 64)))
    vae_size = latent_size * 2 ** (len(ddconfig["ch_mult"]) - 1)
    scale_factor = float(getattr(model, "scale_factor", 0.18215))
    unet_config = keys.unet_diffusers_config(unet_params, sample_size=latent_size)
    vae_config = keys.vae_diffusers_config(ddconfig, embed_dim, scale_factor, sample_size=vae_size)
    text_config = _text_encoder_config(model)

    if folder.exists() and any(folder.iterdir()) and not (folder / "model_index.json").exists():
        raise FileExistsError(f"{str(folder)!r} exists and is not a diffusers model folder; refusing to replace "
                              "it. Choose a new or empty folder.")
    with atomic_folder(folder) as tmp:
        components = {}
        for name, state, cfg in (
            ("unet", keys.unet_to_diffusers(parts["unet"], unet_params), unet_config),
            ("vae", keys.vae_to_diffusers(parts["vae"], ddconfig), vae_config),
        ):
            (tmp / name).mkdir()
            save_safetensors(state, tmp / name / "diffusion_pytorch_model.safetensors")
            _write_json(tmp / name / "config.json", cfg)
            components[name] = ["diffusers", cfg["_class_name"]]
        (tmp / "text_encoder").mkdir()
        save_safetensors(keys.text_to_transformers(parts["text"]), tmp / "text_encoder" / "model.safetensors")
        _write_json(tmp / "text_encoder" / "config.json", text_config)
        components["text_encoder"] = ["transformers", "CLIPTextModel"]
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", keys.scheduler_diffusers_config(
            model.betas, model.linear_start, model.linear_end, getattr(model, "parameterization", "eps")))
        components["scheduler"] = ["diffusers", "PNDMScheduler"]
        if _write_tokenizer(model, tmp / "tokenizer"):
            components["tokenizer"] = ["transformers", "CLIPTokenizer"]
        inpainting = unet_params["in_channels"] == 9
        _write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
            "_diffusers_version": keys.DIFFUSERS_VERSION,
            **components,
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        })
    return folder


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _architecture(model: nn.Module, config: Any) -> tuple[dict, dict, int]:
    """(unet params, ddconfig, embed_dim): from ``config`` if given, else from the model (and its weights)."""
    if config is not None:
        from ..config import load_config

        params = keys.as_plain(load_config(config))["model"]["params"]
        first = params["first_stage_config"]["params"]
        return params["unet_config"]["params"], first["ddconfig"], first.get("embed_dim")
    unet_config = keys.as_plain(getattr(model, "unet_config", None))
    if not unet_config:
        raise ValueError("the model does not record its unet_config; pass config= (the name or YAML it was built "
                         "from) to save_diffusers")
    vae_state = keys.split_compvis(model.state_dict())["vae"]
    ddconfig, embed_dim = keys.infer_ddconfig(vae_state)
    return unet_config.get("params", unet_config), ddconfig, embed_dim


def _text_encoder_config(model: nn.Module) -> dict:
    transformer = getattr(getattr(model, "cond_stage_model", None), "transformer", None)
    config = getattr(transformer, "config", None)
    if config is None:
        raise ValueError("save_diffusers needs a CLIP text encoder (cond_stage_model.transformer with a config); "
                         f"this model's cond stage is {type(getattr(model, 'cond_stage_model', None)).__name__}")
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config.to_dict())
    config.update(architectures=["CLIPTextModel"], model_type="clip_text_model", torch_dtype="float32")
    return config


def _write_tokenizer(model: nn.Module, folder: Path) -> bool:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, from sdkit's bundled CLIP BPE vocabulary."""
    tokenizer = getattr(getattr(model, "cond_stage_model", None), "tokenizer", None)
    encoder, ranks = getattr(tokenizer, "encoder", None), getattr(tokenizer, "bpe_ranks", None)
    if not encoder or not ranks:
        return False
    folder.mkdir()
    _write_json(folder / "vocab.json", encoder)
    merges = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    max_length = int(getattr(tokenizer, "max_length", 77))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False,
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    })
    return True
