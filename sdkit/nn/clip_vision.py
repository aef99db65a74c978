"""CLIP ViT vision tower, the image half of the SD v1 safety checker (CLIP ViT-L/14 by default).

Written out here, not taken from transformers, for the same reason as the text tower in `text.py` (the layer
stack both towers share is `clip_transformer.py`): the checkpoint keys are the contract. The official
safety-checker weights were saved with transformers 4.x, where `CLIPVisionModel` wraps a `CLIPVisionTransformer`
under `.vision_model`, so the keys read `vision_model.vision_model.embeddings.patch_embedding.weight`.
transformers 5 dropped that inner level (`vision_model.embeddings...`). `CLIPVisionModel` here keeps the 4.x
layout and also loads the 5.x one.

    tower = CLIPVisionModel(CLIPVisionConfig())            # ViT-L/14, 224x224 input
    out = tower(pixel_values)                              # pixel_values: CLIP-normalised [B, 3, 224, 224]
    out.pooler_output                                      # [B, 1024]: post_layernorm of the class token
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import torch
from torch import nn

from .clip_transformer import CLIPEncoder


@dataclasses.dataclass
class CLIPVisionConfig:
    """Shape of a CLIP vision tower. The defaults are openai/clip-vit-large-patch14's vision_config."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches plus the class token

    @classmethod
    def from_dict(cls, values: dict) -> "CLIPVisionConfig":
        """Build from a transformers-style `vision_config` dict; unknown keys (dropout, init ranges) are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, 1 + patches, D], before post_layernorm
    pooler_output: torch.Tensor  # [B, D]: post_layernorm(class token)


class CLIPVisionEmbeddings(nn.Module):
    """Class token + non-overlapping patches (a strided conv without bias) + learned positions."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_positions, dim)
        # Persistent, as in the transformers 4.x that saved the official weights, so the key sets are equal.
        self.register_buffer("position_ids", torch.arange(config.num_positions)[None], persistent=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.config.num_channels, size, size):
            raise ValueError(
                f"The CLIP vision tower takes pixel_values of shape [B, {self.config.num_channels}, {size}, {size}], "
                f"got {tuple(pixel_values.shape)}. Resize and centre-crop first (SafetyChecker.preprocess does)."
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, N, D], row-major over the patch grid
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(self.position_ids)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # position_ids is the constant 0..N-1; files saved by newer transformers leave it out.
        key = prefix + "position_ids"
        correct = torch.arange(self.position_ids.shape[1])[None]  # on CPU even when the module is on "meta"
        stored = state_dict.get(key)
        if stored is not None and (stored.shape != correct.shape or not torch.equal(stored.cpu().long(), correct)):
            warnings.warn(f"{key} in this checkpoint is not 0..{correct.shape[1] - 1}; using the correct "
                          "positions instead.", stacklevel=2)
        state_dict[key] = correct
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPVisionTransformer(nn.Module):
    """Embeddings -> pre_layrnorm (sic, the name in every CLIP checkpoint) -> layers; pooled = post_layernorm(cls)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return CLIPVisionOutput(x, self.post_layernorm(x[:, 0]))


class CLIPVisionModel(nn.Module):
    """transformers 4.x `CLIPVisionModel`: the transformer under `.vision_model` (the official checkpoint layout)."""

    def __init__(self, config: CLIPVisionConfig | None = None):
        super().__init__()
        self.config = config or CLIPVisionConfig()
        self.vision_model = CLIPVisionTransformer(self.config)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        return self.vision_model(pixel_values)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # transformers 5 layout (no inner `vision_model.`): move those keys one level down.
        inner = prefix + "vision_model."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
