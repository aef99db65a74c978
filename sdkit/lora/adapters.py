"""The low-rank update of one layer, and how it joins the layer's output without changing the model's weights.

A LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") replaces a layer's weight W
[out, in] by W + s·(α/r)·B·A, with A = ``down`` [r, in], B = ``up`` [out, r], α the file's ``alpha`` and s the
user's scale. Unmerged, the layer computes W·x + s·(α/r)·B·(A·x): the model's own weights stay as they are, so
its ``state_dict()`` keeps exactly the CompVis keys. sdkit adds the update with forward hooks on the model's own
modules, never with wrapper modules (peft's LoraLayer replaces each layer by a wrapper, which renames the
layer's weight to ``…base_layer.weight``):

- a Linear layer gets a forward hook that adds s·(α/r)·B·(A·x) to its output;
- a SpatialTransformer applies its 1x1 ``proj_in``/``proj_out`` convs as matrix products on the tokens (it never
  calls the conv modules, see ``sdkit.nn.attention``), so their update is added around the convs' neighbours:
  ``proj_in`` reads the ``norm`` output and feeds the first transformer block, ``proj_out`` reads the last block's
  output and is added to the transformer's output.

Merged, the update is added to the weight itself (W += s·(α/r)·B·A) and the hooks step aside; unmerging
subtracts the same product.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .targets import Target


class LoRALayer(nn.Module):
    """The update of one layer: ``down`` A [r, in], ``up`` B [out, r] and ``alpha`` (the update is α/r·B·A)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None):
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"a LoRA layer needs down [rank, in] and up [out, rank], got {tuple(down.shape)} "
                             f"and {tuple(up.shape)}")
        self.down = nn.Parameter(down.detach().clone().float())
        self.up = nn.Parameter(up.detach().clone().float())
        self.alpha = float(self.rank if alpha is None else alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """α/r·B·(A·x) on the last axis of ``x`` [..., in] -> [..., out]."""
        down = self.down.to(device=x.device, dtype=x.dtype)
        up = self.up.to(device=x.device, dtype=x.dtype)
        return F.linear(F.linear(x, down), up) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """α/r·B·A [out, in] in float32."""
        return (self.up.float() @ self.down.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, in={self.down.shape[1]}, out={self.up.shape[0]}"


Scale = Callable[[], float]   # the current factor s of a layer's update (0 while merged or switched off)


def attach(target: Target, layer: LoRALayer, scale: Scale) -> list:
    """Add ``scale() × layer(x)`` to ``target``'s output through forward hooks; returns the hook handles."""
    if not target.is_conv:
        def add_update(module, args, out):
            s = scale()
            return None if s == 0 else out + (s * layer(args[0])).to(out.dtype)
        return [target.module.register_forward_hook(add_update)]
    transformer = target.transformer
    if transformer is None:
        raise ValueError(f"{target.name}: sdkit applies LoRA to 1x1 convs only inside a SpatialTransformer")
    blocks = transformer.transformer_blocks
    seen: dict[str, torch.Tensor] = {}     # the conv's input tokens, between the two hooks of one forward pass
    if target.path.endswith("proj_in"):
        def keep_norm_output(module, args, out):
            if scale() != 0:
                seen["tokens"] = out.flatten(2).transpose(1, 2)            # [b, c, h, w] -> [b, h·w, c]
        def add_to_block_input(module, args):
            tokens = seen.pop("tokens", None)
            if tokens is None:
                return None
            x = args[0]
            return (x + (scale() * layer(tokens)).to(x.dtype), *args[1:])
        return [transformer.norm.register_forward_hook(keep_norm_output),
                blocks[0].register_forward_pre_hook(add_to_block_input)]

    def keep_block_output(module, args, out):
        if scale() != 0:
            seen["tokens"] = out                                           # [b, h·w, inner]
    def add_to_transformer_output(module, args, out):
        tokens = seen.pop("tokens", None)
        if tokens is None:
            return None
        update = (scale() * layer(tokens)).transpose(1, 2).reshape(out.shape)
        return out + update.to(out.dtype)
    return [blocks[-1].register_forward_hook(keep_block_output),
            transformer.register_forward_hook(add_to_transformer_output)]


@torch.no_grad()
def add_to_weight(target: Target, layer: LoRALayer, factor: float) -> None:
    """W += factor·α/r·B·A (merge with factor s, unmerge with -s); the product is computed the same way both
    times, so merge then unmerge gives W back up to float rounding of the two additions."""
    weight = target.module.weight
    update = (factor * layer.delta_weight()).to(device=weight.device, dtype=weight.dtype)
    weight.add_(update.view(weight.shape))
