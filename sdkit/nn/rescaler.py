"""SpatialRescaler: the LDM "condition encoder" for image-like conditions (super-resolution, layouts, masks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INTERPOLATION_MODES = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(nn.Module):
    """Resize `n_stages` times by `multiplier` (F.interpolate), then optionally map channels with a 1x1 conv.

    Same parameters and state-dict key (`channel_mapper.weight`) as CompVis ldm.modules.encoders.modules.
    """

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"n_stages must be 0 or more, got {n_stages}.")
        if method not in INTERPOLATION_MODES:
            raise ValueError(f"method={method!r} is not an interpolation mode; use one of {INTERPOLATION_MODES}.")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
