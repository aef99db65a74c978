"""Latents back to pixels: the plain VAE decode, and tiled decoding of a large latent with the memory of one tile.

Tiles are blended with feathered (linear ramp) weights over their overlaps, so each seam falls where both tiles
are far from their borders, and the result is a weighted average of the tiles' decodes. For a decoder whose
output depends only on nearby latents that is exactly the plain decode. SD's decoder is not quite local: its
receptive field is wide (a tile's border sees zero padding instead of its neighbours), GroupNorm takes statistics
over the whole input, and the mid-block attention looks everywhere; so tiles differ from the full decode a little,
mostly as slow colour shifts, and bigger tiles and overlaps bring them closer. (Normalising tiles with whole-image
GroupNorm statistics estimated in a first pass was tried and measured worse than tile-local statistics: the
estimates of the later layers are biased by the earlier layers' tile-local normalisation.)
"""
from __future__ import annotations

import torch



def vae_dtype(model) -> torch.dtype:
    return next(model.first_stage_model.parameters()).dtype


@torch.no_grad()
def vae_decode(model, z: torch.Tensor) -> torch.Tensor:
    """``decode_first_stage`` in the VAE's dtype (it checks for NaN/inf), back to float32."""
    return model.decode_first_stage(z.to(vae_dtype(model))).float()


def decode(model, z: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
    """Scaled latents -> pixels [B, 3, H, W] in about [-1, 1]; ``tile`` (latent pixels) decodes in tiles."""
    return decode_tiled(model, z, tile=tile, overlap=overlap) if tile else vae_decode(model, z)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size) with at least ``overlap`` shared pixels; the last tile ends at the edge."""
    if size <= tile:
        return [0]
    return sorted(set(range(0, size - tile, tile - overlap)) | {size - tile})


def feather(length: int, fade: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1-D blending weights of a tile: rising over ``fade`` pixels on a side shared with a neighbour, flat 1 on
    the image border. Never 0, so every pixel has weight."""
    w = torch.ones(length, dtype=torch.float64)
    fade = min(fade, length)
    if fade > 0:
        ramp = (torch.arange(fade, dtype=torch.float64) + 0.5) / fade
        if fade_start:
            w[:fade] = torch.minimum(w[:fade], ramp)
        if fade_end:
            w[length - fade:] = torch.minimum(w[length - fade:], ramp.flip(0))
    return w


@torch.no_grad()
def decode_tiled(model, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """Decode scaled latents [B, C, h, w] in overlapping ``tile``×``tile`` latent tiles blended with feathered
    weights over ``overlap`` latent pixels: pixels [B, 3, h·f, w·f] in about [-1, 1]. A latent that fits in one
    tile is decoded plainly. See the module notes for how close to the plain decode this is.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or not isinstance(overlap, int) \
            or not 0 <= overlap < tile:
        raise ValueError(f"need an integer tile ≥ 1 and 0 ≤ overlap < tile (latent pixels), got tile={tile!r}, "
                         f"overlap={overlap!r}")
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae_decode(model, z)
    f = model.vae_factor
    out = weight = None
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            part = vae_decode(model, z[..., y:y + tile, x:x + tile])
            th, tw = part.shape[-2:]
            wt = (feather(th, overlap * f, y > 0, y + tile < h)[:, None]
                  * feather(tw, overlap * f, x > 0, x + tile < w)[None, :]).to(part)
            if out is None:
                out = part.new_zeros(b, part.shape[1], h * f, w * f)
                weight = part.new_zeros(h * f, w * f)
            out[..., y * f:y * f + th, x * f:x * f + tw] += part * wt
            weight[y * f:y * f + th, x * f:x * f + tw] += wt
    return out / weight
