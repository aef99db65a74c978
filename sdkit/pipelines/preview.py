"""Live previews of the current x̂₀ latent (``x0_pred`` of the pipelines' ``callback(step, total, x, x0_pred)``).

Two ways:

- ``method="vae"``: the real decode (exact, costs a VAE pass).
- ``method="linear"`` (default): an *approximation*: each latent pixel becomes one RGB pixel by a fixed linear
  map, at latent resolution (64×64 for SD v1), nearly free. For SD v1's VAE the map is the one fitted by
  Keturn for SD 1.4 (HF forum, "Decoding latents to RGB without upscaling"); for any other first stage it is
  fitted once per model by least squares on one decode of random latents, and cached on the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .decoding import vae_decode
from .images import to_pil

# Rows: latent channels 1-4 of SD v1 (scaled latents); columns: R, G, B in [-1, 1]. Approximate.
SD_V1_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208],
                                 [0.187, 0.286, 0.173],
                                 [-0.158, 0.189, 0.264],
                                 [-0.184, -0.271, -0.473]])


def is_sd_v1_first_stage(model) -> bool:
    return int(model.channels) == 4 and abs(float(model.scale_factor) - 0.18215) < 1e-6 and model.vae_factor == 8


@torch.no_grad()
def fit_latent_rgb(model, size: int = 16, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (weights [C, 3], bias [3]) from scaled latents to the decoded colour averaged over each
    latent pixel's f×f patch, on ``n`` random latents (unit variance, as scaled latents roughly are)."""
    channels = int(model.channels)
    z = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed)).to(model.device)
    rgb = F.avg_pool2d(vae_decode(model, z).float(), model.vae_factor)
    a = torch.cat([z.float(), torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, channels + 1)
    b = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(a.cpu().double(), b.cpu().double()).solution.float()
    return solution[:-1], solution[-1]


def latent_rgb(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear latent → RGB map of this model (SD v1's published one, or fitted once and cached)."""
    if is_sd_v1_first_stage(model):
        return SD_V1_LATENT_RGB, torch.zeros(3)
    cached = getattr(model, "_sdkit_latent_rgb", None)
    if cached is None:
        cached = fit_latent_rgb(model)
        model._sdkit_latent_rgb = cached
    return cached


@torch.no_grad()
def latent_preview(model, x0: torch.Tensor, method: str = "linear") -> list[Image.Image]:
    """PIL previews of scaled latents [B, C, h, w]: ``"linear"`` (approximate, latent resolution) or ``"vae"``."""
    if method == "vae":
        pixels = vae_decode(model, x0)
    elif method == "linear":
        weights, bias = latent_rgb(model)
        pixels = torch.einsum("bchw,cr->brhw", x0.float().cpu(), weights) + bias[None, :, None, None]
    else:
        raise ValueError(f"method must be 'linear' (fast, approximate) or 'vae' (exact decode), got {method!r}")
    return [to_pil(p) for p in pixels.clamp(-1, 1)]
