"""The layers of an SD v1 model that a LoRA can change, and the names the LoRA file layouts give them.

A LoRA file names each layer it changes by the layer's path in the *diffusers* model (kohya's files write that
path with "_" for "." after ``lora_unet_`` / ``lora_te_``; diffusers/PEFT files write it after ``unet.`` /
``text_encoder.``). sdkit keeps CompVis paths (``input_blocks.1.1`` is diffusers' ``down_blocks.0.attentions.0``),
so the UNet's names come from the CompVis↔diffusers module map of ``sdkit.checkpoints.keys``. The text encoder is
sdkit's own CLIP text model, whose paths are transformers' (``text_model.encoder.layers.N.self_attn.q_proj``).

Layers (what kohya's and diffusers' SD v1 trainers target):

- in each transformer block of the UNet: ``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and the
  feed-forward ``ff.net.0.proj``, ``ff.net.2`` (Linear layers);
- in each SpatialTransformer: ``proj_in``, ``proj_out`` (1x1 convolutions in SD v1);
- in each CLIP text layer: ``self_attn.q_proj``/``k_proj``/``v_proj``/``out_proj``, ``mlp.fc1``, ``mlp.fc2``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

BLOCK_LAYERS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")) \
    + ("ff.net.0.proj", "ff.net.2")
TRANSFORMER_CONVS = ("proj_in", "proj_out")
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
               "mlp.fc2")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")   # what a LoRA trains by default
PARTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


@dataclass(frozen=True)
class Target:
    """One layer a LoRA can change.

    ``name`` is the diffusers/PEFT name with its part (``unet.down_blocks.0.attentions.0.transformer_blocks.0.
    attn1.to_q``), ``path`` the layer's path inside sdkit's part (CompVis names), ``module`` the Linear or 1x1
    Conv2d, and ``transformer`` the SpatialTransformer that applies a ``proj_in``/``proj_out`` conv (None for
    Linear layers)."""

    name: str
    part: str
    path: str
    module: nn.Module = field(repr=False)
    transformer: nn.Module | None = field(default=None, repr=False)

    @property
    def kohya_name(self) -> str:
        """kohya/A1111's name: ``lora_unet_down_blocks_0_..._attn1_to_q``."""
        return KOHYA_PREFIX[self.part] + self.name.split(".", 1)[1].replace(".", "_")

    @property
    def compvis_kohya_name(self) -> str:
        """The same with the CompVis path (``lora_unet_input_blocks_1_1_...``), as some LDM-based trainers write."""
        return KOHYA_PREFIX[self.part] + self.path.replace(".", "_")

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every name a LoRA file may give this layer: the diffusers/PEFT name, kohya's, kohya's with the CompVis
        path, and for the text encoder the same without ``text_model.`` (transformers 5 dropped that level)."""
        names = (self.name, self.kohya_name, self.compvis_kohya_name)
        if self.part == "text_encoder":
            names += (self.name.replace(".text_model.", ".", 1), self.kohya_name.replace("_text_model_", "_", 1))
        return names

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def in_features(self) -> int:
        return self.module.in_channels if self.is_conv else self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_channels if self.is_conv else self.module.out_features


def model_parts(model: nn.Module) -> dict[str, nn.Module | None]:
    """{"unet": the UNetModel, "text_encoder": sdkit's CLIP text model or None} of a LatentDiffusion (also
    accepted: its DiffusionWrapper or a bare UNetModel)."""
    from ..nn.unet import UNetModel

    if isinstance(model, UNetModel):
        return {"unet": model, "text_encoder": None}
    unet = getattr(getattr(model, "model", model), "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise TypeError(f"a LoRA applies to a LatentDiffusion model (sdkit.load_model) or its UNetModel, got "
                        f"{type(model).__name__}")
    encoder = getattr(model, "cond_stage_model", None)
    text = getattr(encoder, "transformer", None)
    return {"unet": unet, "text_encoder": text if hasattr(text, "text_model") else None}


def text_encoder_kind(model: nn.Module) -> str:
    """What the model's text encoder is, for messages."""
    encoder = getattr(model, "cond_stage_model", None)
    return "no text encoder" if encoder is None else type(encoder).__name__


def _unet_attention_map(unet: nn.Module) -> list[tuple[str, str]]:
    """(CompVis path, diffusers path) of each SpatialTransformer of the UNet."""
    from ..checkpoints.keys import unet_module_map
    from ..nn.attention import SpatialTransformer

    params = {"channel_mult": list(unet.channel_mult), "num_res_blocks": unet.num_res_blocks,
              "attention_resolutions": list(unet.attention_resolutions),
              "use_spatial_transformer": unet.use_spatial_transformer, "conv_resample": unet.conv_resample,
              "num_classes": unet.num_classes}
    modules = dict(unet.named_modules())
    return [(compvis, diffusers) for compvis, diffusers, _ in unet_module_map(params)
            if isinstance(modules.get(compvis), SpatialTransformer)]


def find_targets(model: nn.Module) -> dict[str, Target]:
    """Every layer of ``model`` a LoRA can change, by diffusers/PEFT name (UNet first, then the text encoder)."""
    parts = model_parts(model)
    targets: list[Target] = []
    unet = parts["unet"]
    for compvis, diffusers in _unet_attention_map(unet):
        transformer = unet.get_submodule(compvis)
        for conv in TRANSFORMER_CONVS:
            targets.append(Target(f"unet.{diffusers}.{conv}", "unet", f"{compvis}.{conv}",
                                  getattr(transformer, conv), transformer))
        for i, _ in enumerate(transformer.transformer_blocks):
            for layer in BLOCK_LAYERS:
                inner = f"transformer_blocks.{i}.{layer}"
                targets.append(Target(f"unet.{diffusers}.{inner}", "unet", f"{compvis}.{inner}",
                                      transformer.get_submodule(inner)))
    text = parts["text_encoder"]
    if text is not None:
        for i, _ in enumerate(text.text_model.encoder.layers):
            for layer in TEXT_LAYERS:
                path = f"text_model.encoder.layers.{i}.{layer}"
                targets.append(Target(f"text_encoder.{path}", "text_encoder", path, text.get_submodule(path)))
    return {t.name: t for t in targets}
