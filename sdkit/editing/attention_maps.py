"""Which pixels each prompt word attends to: cross-attention maps per word, aggregated as DAAM does.

DAAM (Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention") reads a word's
map off the cross-attention layers: every layer's attention probabilities A[pixel, token] of the guided
(conditional) half of the batch, summed over heads, upsampled (bicubic) from the layer's resolution to the
image's, and accumulated over layers and sampling steps; a word's map is the sum over its tokens. Here the sum is
divided by the number of (layer, step, head) maps it holds, so a map is the mean share of attention a word's
tokens receive at each pixel (between 0 and 1 up to bicubic overshoot), comparable across words and prompts.

    maps = attention_maps(model, "a red circle and a blue square", seed=1, steps=20, guidance_scale=5)
    maps.image, maps["circle"], maps.as_dict()             # PIL image, [H, W] map, {word: map}
    plot_attention_maps(maps)                              # the image beside each word's map, one colour scale

The maps come from the ordinary ``txt2img`` run with an observing processor on the UNet's cross-attention
layers (``sdkit.nn.attention_processors``). The observer computes each layer's output with the same fused kernel
as the default processor, and the probabilities on the side, so installing it does not change the image. Since
upsampling is linear, each layer's maps are summed over steps and heads at its own resolution first and upsampled
once at the end (the same numbers up to float rounding, and a fraction of the work).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..nn.attention_processors import attention_processor
from ..pipelines.images import round_up
from .words import Word, prompt_words


class CrossAttentionAggregator:
    """A processor for the cross-attention layers that sums each layer's maps of the last ``num_images`` batch
    items (the conditional half under guidance, the whole batch without) over heads and calls.

    ``sums[layer]``: [num_images, pixels, tokens]; ``counts[layer]``: how many head maps went into it."""

    def __init__(self, num_images: int):
        self.num_images = num_images
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def bind(self, name: str, layer):
        def processor(attn, x, context=None, mask=None):
            q, k, v = attn.heads_qkv(x, context)
            bias = attn.score_bias(mask, q)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # the default's numbers
            self.observe(name, attn.probabilities(q, k, bias).detach())
            return attn.output(out, x)
        return processor

    def observe(self, name: str, probs: torch.Tensor) -> None:
        """Add one call's maps [batch, heads, pixels, tokens]."""
        batch, heads = probs.shape[:2]
        if batch not in (self.num_images, 2 * self.num_images):
            raise RuntimeError(f"attention maps for {self.num_images} images got a UNet batch of {batch}: run all "
                               "prompts in one batch (no batch_size option)")
        summed = probs[-self.num_images:].float().sum(dim=1)
        self.sums[name] = summed if name not in self.sums else self.sums[name] + summed
        self.counts[name] += heads

    def token_maps(self, latent_size: tuple[int, int], pixel_size: tuple[int, int]) -> torch.Tensor:
        """[num_images, tokens, H, W]: the mean over layers, calls and heads of each token's map, every layer
        upsampled from its grid (the ``latent_size`` grid halved per UNet level) to ``pixel_size``."""
        if not self.sums:
            raise RuntimeError("no cross-attention call was observed: does the model condition on text?")
        total, count = None, 0
        lat_h, lat_w = latent_size
        for name, summed in self.sums.items():
            pixels = summed.shape[1]
            factor = round(math.sqrt(lat_h * lat_w / pixels))
            h, w = lat_h // factor, lat_w // factor
            if h * w != pixels:
                raise RuntimeError(f"layer {name} has {pixels} query pixels, not a {lat_h}x{lat_w} grid / {factor}")
            grid = summed.transpose(1, 2).reshape(summed.shape[0], summed.shape[2], h, w)
            up = F.interpolate(grid, size=pixel_size, mode="bicubic", align_corners=False)
            total = up if total is None else total + up
            count += self.counts[name]
        return total / count


@dataclass
class AttentionMaps:
    """The attention maps of one generated image: ``maps[i]`` [H, W] belongs to ``words[i]`` (the prompt's
    whitespace-separated words, in order, with their token positions); ``token_maps`` [tokens, H, W] has every
    token's map (position 0: the start token)."""
    image: object
    prompt: str
    words: list[Word]
    maps: torch.Tensor
    token_maps: torch.Tensor
    seed: int | None = None
    latent: torch.Tensor | None = field(default=None, repr=False)

    def __getitem__(self, word: str | int) -> torch.Tensor:
        """The map of a word (its first occurrence) or of the word at an index."""
        if isinstance(word, int):
            return self.maps[word]
        for i, w in enumerate(self.words):
            if w.text.lower() == word.lower():
                return self.maps[i]
        raise KeyError(f"{word!r} is not a word of the prompt {self.prompt!r}; its words: "
                       f"{[w.text for w in self.words]}")

    def as_dict(self) -> dict[str, torch.Tensor]:
        """{word: map}; a repeated word's entry is the sum of its occurrences' maps."""
        out: dict[str, torch.Tensor] = {}
        for w, m in zip(self.words, self.maps):
            out[w.text] = out[w.text] + m if w.text in out else m
        return out


def word_maps(token_maps: torch.Tensor, words: Sequence[Word]) -> torch.Tensor:
    """[words, H, W]: each word's map, the sum of its tokens' maps."""
    return torch.stack([token_maps[list(w.tokens)].sum(0) for w in words])


def attention_maps(model, prompt: str | Sequence[str], *, seed: int | Sequence[int] | None = None,
                   steps: int = 20, guidance_scale: float = 7.5, height: int | None = None,
                   width: int | None = None, **options) -> AttentionMaps | list[AttentionMaps]:
    """Generate with ``txt2img`` and return each word's attention map beside the image (a list for a list of
    prompts, all sampled in one batch). ``options`` go to ``txt2img`` (sampler, negative_prompt, x_T, ...)."""
    from ..pipelines.text_to_image import txt2img

    if "batch_size" in options:
        raise ValueError("attention_maps samples all prompts in one batch; call it once per chunk of prompts "
                         "instead of passing batch_size")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    words = [prompt_words(model, p) for p in prompts]                   # refuses an over-long prompt first
    aggregator = CrossAttentionAggregator(len(prompts))
    with attention_processor(model.unet, aggregator, kind="cross"):
        result = txt2img(model, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale,
                         height=height, width=width, **options)
    height, width = result.images[0].height, result.images[0].width
    factor, multiple = model.vae_factor, model.unet_multiple
    latent = (round_up(height // factor, multiple), round_up(width // factor, multiple))   # txt2img's sampling size
    tokens = aggregator.token_maps(latent, (latent[0] * factor, latent[1] * factor))[..., :height, :width]
    out = [AttentionMaps(image, p, w, word_maps(t, w), t, s, z)
           for image, p, w, t, s, z in zip(result.images, prompts, words, tokens, result.seeds, result.latents)]
    return out[0] if isinstance(prompt, str) else out


def plot_attention_maps(maps: AttentionMaps, words: Sequence[str | int] | None = None, columns: int = 6,
                        cell: float = 2.0, cmap: str = "inferno"):
    """A matplotlib figure: the image, then each word's map (default: every word of the prompt), all on one
    colour scale from 0 to the largest value shown, with a colour bar. Returns the figure."""
    import matplotlib.pyplot as plt

    chosen = list(range(len(maps.words))) if words is None else list(words)
    panels = [(maps.words[w].text if isinstance(w, int) else w, maps[w]) for w in chosen]
    vmax = max(float(m.max()) for _, m in panels) if panels else 1.0
    n = len(panels) + 1
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 0.6, cell * rows), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(maps.image)
    axes[0].set_title("image", fontsize=9)
    shown = None
    for ax, (word, m) in zip(axes[1:], panels):
        shown = ax.imshow(m.clamp(min=0).numpy(), cmap=cmap, vmin=0.0, vmax=vmax)
        ax.set_title(word, fontsize=9)
    for ax in axes:
        ax.axis("off")
    if shown is not None:
        fig.colorbar(shown, ax=axes.tolist(), shrink=0.8, label="share of attention")
    return fig


__all__ = ["AttentionMaps", "CrossAttentionAggregator", "attention_maps", "plot_attention_maps", "word_maps"]
