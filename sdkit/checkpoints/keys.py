"""CompVis <-> diffusers / transformers state-dict key maps for the SD v1 model family.

sdkit's own layout is the CompVis one (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``). diffusers stores the same weights as three separate models
(UNet2DConditionModel, AutoencoderKL, transformers' CLIPTextModel) under other names.

The maps work module by module. From the CompVis config (channel_mult, num_res_blocks, attention_resolutions,
...) we list every CompVis module that owns parameters together with its diffusers counterpart and a *kind*
that says how the parameter names inside it change ("same", a UNet ResBlock, a VAE ResnetBlock, the VAE
attention block). A key converts by finding its module, swapping the module path and renaming the rest.
Both directions use the same table, so the reverse map is the exact inverse by construction.

The same configs also yield the ``config.json`` dicts that diffusers needs (``unet_diffusers_config`` ...)
and the way back (``unet_params_from_diffusers`` ...), which reading a diffusers folder uses.
"""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
DIFFUSERS_VERSION = "0.30.0"  # the format version we write; any diffusers since 0.2x reads it


class NotExpressibleError(ValueError):
    """The CompVis config uses a feature that diffusers' model classes cannot represent."""


# Parameter names inside one module, CompVis -> diffusers. "same" modules keep their inner names (convs,
# linears, SpatialTransformer == diffusers Transformer2DModel, down to transformer_blocks.N.attn1.to_q).
_INNER_RENAMES = {
    "same": None,
    "unet_resnet": {
        "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
    },
    "vae_resnet": {
        "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut",
    },
    "vae_attn": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
}
# The VAE attention projections are 1x1 convs in CompVis and Linear layers in diffusers.
_VAE_ATTN_LINEARS = {"q", "k", "v", "proj_out"}


def as_plain(cfg):
    """OmegaConf DictConfig / ListConfig (or anything dict-like) -> plain dicts and lists."""
    if hasattr(cfg, "items"):
        return {k: as_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)) or type(cfg).__name__ == "ListConfig":
        return [as_plain(v) for v in cfg]
    return cfg


def _per_level(value, levels: int, name: str) -> list[int]:
    """An int or a per-level list (newer CompVis-style configs allow both) -> a per-level list."""
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name} has {len(value)} entries but channel_mult has {levels} levels")
    return value


# ---------------------------------------------------------------------------------------------------------------
# UNet


def _check_unet_expressible(p: dict) -> None:
    problems = []
    if not p.get("use_spatial_transformer", False):
        problems.append("use_spatial_transformer=False (AttentionBlock UNets have no diffusers class)")
    if p.get("resblock_updown", False):
        problems.append("resblock_updown=True (ResBlock up/downsampling)")
    if not p.get("conv_resample", True):
        problems.append("conv_resample=False (pooling downsamplers)")
    if p.get("dims", 2) != 2:
        problems.append(f"dims={p['dims']}")
    if p.get("num_classes") == "sequential":
        problems.append("num_classes='sequential'")
    if problems:
        raise NotExpressibleError("this UNet config cannot be written as a diffusers UNet2DConditionModel: "
                                  + "; ".join(problems))


def unet_module_map(unet_params: dict) -> list[tuple[str, str, str]]:
    """(CompVis module, diffusers module, kind) for every parameter-owning module of a UNetModel.

    ``unet_params`` are the CompVis UNetModel constructor arguments (``unet_config.params``).
    """
    p = as_plain(unet_params)
    _check_unet_expressible(p)
    levels = len(p["channel_mult"])
    res_blocks = _per_level(p["num_res_blocks"], levels, "num_res_blocks")
    attn_at = set(p["attention_resolutions"])
    table = [
        ("time_embed.0", "time_embedding.linear_1", "same"),
        ("time_embed.2", "time_embedding.linear_2", "same"),
        ("input_blocks.0.0", "conv_in", "same"),
        ("middle_block.0", "mid_block.resnets.0", "unet_resnet"),
        ("middle_block.1", "mid_block.attentions.0", "same"),
        ("middle_block.2", "mid_block.resnets.1", "unet_resnet"),
        ("out.0", "conv_norm_out", "same"),
        ("out.2", "conv_out", "same"),
    ]
    if isinstance(p.get("num_classes"), int):
        table.append(("label_emb", "class_embedding", "same"))

    block, ds = 1, 1  # input_blocks index, downsampling factor (CompVis "ds")
    for level in range(levels):
        for j in range(res_blocks[level]):
            table.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", "unet_resnet"))
            if ds in attn_at:
                table.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", "same"))
            block += 1
        if level != levels - 1:
            table.append((f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            block += 1
            ds *= 2

    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(res_blocks[level] + 1):
            table.append((f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", "unet_resnet"))
            next_child = 1
            if ds in attn_at:
                table.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}", "same"))
                next_child = 2
            if level and j == res_blocks[level]:
                table.append((f"output_blocks.{block}.{next_child}.conv", f"up_blocks.{up}.upsamplers.0.conv", "same"))
                ds //= 2
            block += 1
    return table


def _heads_per_level(p: dict) -> list[int]:
    """Attention heads of each level's SpatialTransformers (CompVis: num_heads, or ch // num_head_channels)."""
    heads = []
    for mult in p["channel_mult"]:
        ch = p["model_channels"] * mult
        nhc = p.get("num_head_channels", -1)
        heads.append(p.get("num_heads", -1) if nhc == -1 else ch // nhc)
    return heads


def _attn_levels(p: dict) -> list[bool]:
    return [2 ** level in set(p["attention_resolutions"]) for level in range(len(p["channel_mult"]))]


def unet_diffusers_config(unet_params: dict, sample_size: int | None = None) -> dict:
    """config.json for diffusers' UNet2DConditionModel equivalent to a CompVis UNetModel config.

    ``sample_size`` is the latent size (LatentDiffusion ``image_size``, 64 for SD v1); the UNet's own
    ``image_size`` is unused in CompVis and is the fallback.
    """
    p = as_plain(unet_params)
    _check_unet_expressible(p)
    with_attn = _attn_levels(p)
    heads = _heads_per_level(p)
    depth = p.get("transformer_depth", 1)
    res_blocks = p["num_res_blocks"]
    config = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size or p.get("image_size", 64),
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # CompVis timestep_embedding is cat[cos, sin]
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attn)],
        "only_cross_attention": False,
        "block_out_channels": [p["model_channels"] * m for m in p["channel_mult"]],
        "layers_per_block": res_blocks if isinstance(res_blocks, int) else list(res_blocks),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": p.get("context_dim"),
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
        # diffusers' "attention_head_dim" is really the number of heads for SD v1/v2 UNets (a known misnomer)
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "dual_cross_attention": False,
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "class_embed_type": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
        "num_class_embeds": p.get("num_classes"),
        "upcast_attention": False,
        "resnet_time_scale_shift": "scale_shift" if p.get("use_scale_shift_norm", False) else "default",
    }
    return config


def unet_params_from_diffusers(config: dict) -> dict:
    """CompVis UNetModel params from a diffusers UNet2DConditionModel config.json (the inverse of the above)."""
    c = dict(config)
    unsupported = [k for k, ok in [
        ("mid_block_type", c.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"),
        ("class_embed_type", c.get("class_embed_type") is None),
        ("addition_embed_type", c.get("addition_embed_type") is None),
        ("flip_sin_to_cos", c.get("flip_sin_to_cos", True) is True),
        ("freq_shift", c.get("freq_shift", 0) == 0),
        ("only_cross_attention", not c.get("only_cross_attention", False)),
        ("dual_cross_attention", not c.get("dual_cross_attention", False)),
        ("time_embedding_type", c.get("time_embedding_type", "positional") == "positional"),
    ] if not ok]
    if unsupported:
        raise NotExpressibleError("this diffusers UNet has settings with no CompVis UNetModel equivalent: "
                                  + ", ".join(f"{k}={c.get(k)!r}" for k in unsupported))
    channels = list(c["block_out_channels"])
    model_channels = channels[0]
    down_types = list(c["down_block_types"])
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, int) else list(heads)
    params = {
        "image_size": c.get("sample_size", 64),
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "model_channels": model_channels,
        "attention_resolutions": [2 ** i for i, t in enumerate(down_types) if t.startswith("CrossAttn")],
        "num_res_blocks": c["layers_per_block"],
        "channel_mult": [ch // model_channels for ch in channels],
        "use_spatial_transformer": True,
        "transformer_depth": c.get("transformer_layers_per_block", 1),
        "context_dim": c.get("cross_attention_dim"),
        "use_linear_in_transformer": bool(c.get("use_linear_projection", False)),
        "use_scale_shift_norm": c.get("resnet_time_scale_shift", "default") == "scale_shift",
        "legacy": False,
    }
    if isinstance(heads, int):
        params.update(num_heads=heads, num_head_channels=-1)
    else:  # per-level heads: CompVis can express them only as a fixed head width
        widths = {ch // h for ch, h in zip(channels, heads)}
        if len(widths) != 1:
            raise NotExpressibleError(f"per-level attention heads {heads} have no CompVis equivalent")
        params.update(num_heads=-1, num_head_channels=widths.pop())
    if c.get("num_class_embeds") is not None:
        params["num_classes"] = c["num_class_embeds"]
    return params


# ---------------------------------------------------------------------------------------------------------------
# Autoencoder


def _check_vae_expressible(ddconfig: dict, embed_dim: int | None) -> None:
    problems = []
    if not ddconfig.get("double_z", True):
        problems.append("double_z=False")
    if embed_dim is not None and embed_dim != ddconfig["z_channels"]:
        problems.append(f"embed_dim={embed_dim} != z_channels={ddconfig['z_channels']}")
    if ddconfig.get("attn_type", "vanilla") not in ("vanilla", "vanilla-xformers"):
        problems.append(f"attn_type={ddconfig['attn_type']!r}")
    for flag in ("use_linear_attn", "give_pre_end", "tanh_out"):
        if ddconfig.get(flag, False):
            problems.append(f"{flag}=True")
    if not ddconfig.get("resamp_with_conv", True):
        problems.append("resamp_with_conv=False")
    if problems:
        raise NotExpressibleError("this autoencoder config cannot be written as a diffusers AutoencoderKL: "
                                  + "; ".join(problems))


def vae_module_map(ddconfig: dict) -> list[tuple[str, str, str]]:
    """(CompVis module, diffusers module, kind) for every parameter-owning module of an AutoencoderKL."""
    dd = as_plain(ddconfig)
    _check_vae_expressible(dd, None)
    levels = len(dd["ch_mult"])
    n_blocks = dd["num_res_blocks"]
    attn_at = set(dd.get("attn_resolutions", []))
    table = [("quant_conv", "quant_conv", "same"), ("post_quant_conv", "post_quant_conv", "same")]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.conv_in", f"{part}.conv_in", "same"),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vae_resnet"),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vae_attn"),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vae_resnet"),
            (f"{part}.norm_out", f"{part}.conv_norm_out", "same"),
            (f"{part}.conv_out", f"{part}.conv_out", "same"),
        ]
    res = dd["resolution"]
    for level in range(levels):
        for j in range(n_blocks):
            table.append((f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", "vae_resnet"))
            if res in attn_at:
                table.append((f"encoder.down.{level}.attn.{j}", f"encoder.down_blocks.{level}.attentions.{j}",
                              "vae_attn"))
        if level != levels - 1:
            table.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv",
                          "same"))
            res //= 2
    # CompVis builds decoder.up from the lowest resolution and prepends, so up.{levels-1} is diffusers' up_blocks.0
    for level in reversed(range(levels)):
        up = levels - 1 - level
        for j in range(n_blocks + 1):
            table.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", "vae_resnet"))
            if res in attn_at:
                table.append((f"decoder.up.{level}.attn.{j}", f"decoder.up_blocks.{up}.attentions.{j}", "vae_attn"))
        if level != 0:
            table.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", "same"))
            res *= 2
    return table


def vae_diffusers_config(ddconfig: dict, embed_dim: int | None = None, scale_factor: float = 0.18215,
                         sample_size: int | None = None) -> dict:
    """config.json for diffusers' AutoencoderKL equivalent to a CompVis AutoencoderKL (ddconfig + embed_dim)."""
    dd = as_plain(ddconfig)
    _check_vae_expressible(dd, embed_dim)
    attn_at = set(dd.get("attn_resolutions", []))
    levels = len(dd["ch_mult"])
    with_attn = [dd["resolution"] // 2 ** level in attn_at for level in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in with_attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(with_attn)],
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "sample_size": sample_size or dd["resolution"],
        "scaling_factor": float(scale_factor),
    }


def ddconfig_from_diffusers(config: dict) -> tuple[dict, int, float]:
    """(ddconfig, embed_dim, scale_factor) from a diffusers AutoencoderKL config.json."""
    c = dict(config)
    if c.get("norm_num_groups", 32) != 32 or c.get("act_fn", "silu") != "silu":
        raise NotExpressibleError("this diffusers AutoencoderKL uses norm_num_groups/act_fn other than 32/silu, "
                                  "which CompVis AutoencoderKL cannot express")
    channels = list(c["block_out_channels"])
    resolution = c.get("sample_size", 256)
    if isinstance(resolution, (list, tuple)):
        resolution = resolution[0]
    attn = [resolution // 2 ** i for i, t in enumerate(c["down_block_types"]) if t.startswith("Attn")]
    ddconfig = {
        "double_z": True,
        "z_channels": c["latent_channels"],
        "resolution": resolution,
        "in_channels": c["in_channels"],
        "out_ch": c["out_channels"],
        "ch": channels[0],
        "ch_mult": [ch // channels[0] for ch in channels],
        "num_res_blocks": c["layers_per_block"],
        "attn_resolutions": attn,
        "dropout": 0.0,
    }
    return ddconfig, c["latent_channels"], c.get("scaling_factor", 0.18215)


def scheduler_diffusers_config(betas, linear_start: float, linear_end: float, parameterization: str = "eps") -> dict:
    """diffusers' PNDMScheduler config as SD v1 ships it. CompVis "linear" is diffusers "scaled_linear" (linear in
    sqrt(beta)); any other schedule is written out as explicit ``trained_betas``."""
    import torch

    betas = torch.as_tensor(betas).detach().double().cpu()
    start, end, steps = float(linear_start), float(linear_end), int(betas.shape[0])
    scaled_linear = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    trained = None if torch.allclose(betas, scaled_linear, rtol=1e-5, atol=1e-8) else betas.tolist()
    return {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": start,
        "beta_end": end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": steps,
        "trained_betas": trained,
        "prediction_type": "epsilon" if parameterization == "eps" else "sample",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    }


# ---------------------------------------------------------------------------------------------------------------
# Applying a module map


def _module_of(key: str, modules: dict) -> tuple[str, str] | None:
    """Split ``key`` into (module path in ``modules``, parameter name inside it); longest module wins."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in modules:
            return head, ".".join(parts[n:])
    return None


def _rename_inner(inner: str, renames: dict | None) -> str | None:
    if renames is None:
        return inner
    sub, _, leaf = inner.rpartition(".")
    return f"{renames[sub]}.{leaf}" if sub in renames else None


def _convert(state_dict: dict, table, to_diffusers: bool, what: str) -> dict:
    if to_diffusers:
        modules = {c: (d, kind) for c, d, kind in table}
    else:
        modules = {d: (c, kind) for c, d, kind in table}
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        found = _module_of(key, modules)
        if found is None:
            unmapped.append(key)
            continue
        head, inner = found
        target, kind = modules[head]
        renames = _INNER_RENAMES[kind]
        if renames is not None and not to_diffusers:
            renames = {v: k for k, v in renames.items()}
        new_inner = _rename_inner(inner, renames)
        if new_inner is None:
            unmapped.append(key)
            continue
        if kind == "vae_attn" and inner.endswith(".weight"):
            compvis_sub = inner.rpartition(".")[0] if to_diffusers else new_inner.rpartition(".")[0]
            if compvis_sub in _VAE_ATTN_LINEARS:
                tensor = _conv1x1_to_linear(tensor) if to_diffusers else _linear_to_conv1x1(tensor)
        out[f"{target}.{new_inner}"] = tensor
    if unmapped:
        shown = ", ".join(unmapped[:3])
        raise KeyError(f"{len(unmapped)} {what} key(s) do not belong to the configured architecture "
                       f"(first: {shown}). The weights were made for a different config.")
    return out


def _conv1x1_to_linear(t):
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def _linear_to_conv1x1(t):
    return t.reshape(t.shape[0], t.shape[1], 1, 1) if t.ndim == 2 else t


def unet_to_diffusers(unet_state: dict, unet_params: dict) -> dict:
    """UNet weights with CompVis names (without the ``model.diffusion_model.`` prefix) -> diffusers names."""
    return _convert(unet_state, unet_module_map(unet_params), True, "UNet")


def unet_from_diffusers(unet_state: dict, unet_params: dict) -> dict:
    """diffusers UNet2DConditionModel weights -> CompVis names (without prefix)."""
    return _convert(unet_state, unet_module_map(unet_params), False, "diffusers UNet")


def vae_to_diffusers(vae_state: dict, ddconfig: dict) -> dict:
    """AutoencoderKL weights with CompVis names (without ``first_stage_model.``) -> diffusers names.

    The mid-block attention q/k/v/proj_out 1x1-conv weights [C, C, 1, 1] become Linear weights [C, C].
    """
    return _convert(vae_state, vae_module_map(ddconfig), True, "autoencoder")


def vae_from_diffusers(vae_state: dict, ddconfig: dict) -> dict:
    """diffusers AutoencoderKL weights -> CompVis names (without prefix); Linear attention weights -> 1x1 convs.

    Also accepts the pre-0.14 diffusers attention names (query/key/value/proj_attn).
    """
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    renamed = {}
    for key, tensor in vae_state.items():
        if ".attentions." in key:
            for old, new in legacy.items():
                key = key.replace(old, new)
        renamed[key] = tensor
    return _convert(renamed, vae_module_map(ddconfig), False, "diffusers autoencoder")


def text_to_transformers(text_state: dict) -> dict:
    """CLIP text weights under ``cond_stage_model.transformer.`` -> CLIPTextModel file keys (``text_model.*``).

    ``position_ids`` is dropped: transformers rebuilds it and newer versions no longer store it.
    """
    return {k: v for k, v in text_state.items() if not k.endswith("position_ids")}


def text_from_transformers(text_state: dict) -> dict:
    """CLIPTextModel file keys -> names under ``cond_stage_model.transformer.``.

    Files written by transformers >= 5 drop the ``text_model.`` prefix; both spellings are accepted.
    """
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in text_state.items()}


# ---------------------------------------------------------------------------------------------------------------
# Whole-model helpers


def split_compvis(state_dict: dict) -> dict[str, dict]:
    """Split a CompVis LatentDiffusion state dict into {"unet", "vae", "text", "other"} parts, prefixes removed."""
    parts = {"unet": {}, "vae": {}, "text": {}, "other": {}}
    prefixes = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", TEXT_PREFIX))
    for key, tensor in state_dict.items():
        for part, prefix in prefixes:
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = tensor
                break
        else:
            parts["other"][key] = tensor
    return parts


def join_compvis(unet: dict, vae: dict, text: dict) -> dict:
    """The inverse of :func:`split_compvis` for the three model parts."""
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    out.update({TEXT_PREFIX + k: v for k, v in text.items()})
    return out


def infer_ddconfig(vae_state: dict, resolution: int = 256) -> tuple[dict, int]:
    """(ddconfig, embed_dim) of a CompVis AutoencoderKL, read from its weights (keys without prefix).

    ``resolution`` only places attention levels (``attn_resolutions`` counts from it); SD's kl-f8 has none.
    """
    def count(prefix: str) -> int:
        return 1 + max(int(k[len(prefix):].split(".")[0]) for k in vae_state if k.startswith(prefix))

    ch = int(vae_state["encoder.conv_in.weight"].shape[0])
    levels = count("encoder.down.")
    z_channels = int(vae_state["decoder.conv_in.weight"].shape[1])
    ddconfig = {
        "double_z": int(vae_state["encoder.conv_out.weight"].shape[0]) == 2 * z_channels,
        "z_channels": z_channels,
        "resolution": resolution,
        "in_channels": int(vae_state["encoder.conv_in.weight"].shape[1]),
        "out_ch": int(vae_state["decoder.conv_out.weight"].shape[0]),
        "ch": ch,
        "ch_mult": [int(vae_state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels)],
        "num_res_blocks": count("encoder.down.0.block."),
        "attn_resolutions": [resolution // 2 ** i for i in range(levels)
                             if any(k.startswith(f"encoder.down.{i}.attn.") for k in vae_state)],
        "dropout": 0.0,
    }
    return ddconfig, int(vae_state["post_quant_conv.weight"].shape[1])
