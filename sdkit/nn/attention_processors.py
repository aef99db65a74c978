"""The one hook where attention can be observed or replaced: processors installed on the UNet's attention layers.

Every :class:`~sdkit.nn.attention.CrossAttention` computes its attention by calling ``layer.processor(layer, x,
context, mask)``. The default is the fused SDPA kernel. Install another one on the layers of a model::

    from sdkit.nn.attention_processors import AttentionRecorder, attention_processor
    recorder = AttentionRecorder()
    with attention_processor(model.unet, recorder, kind="cross"):     # restored on leaving the block
        model.apply_model(x, t, cond)
    recorder.maps["input_blocks.1.1.transformer_blocks.0.attn2"]      # [[batch, heads, pixels, tokens], ...]

``kind`` picks the layers: "cross" (``attn2``, queries from pixels over the text), "self" (``attn1``, pixels over
pixels) or "all". A processor is any callable ``(layer, x, context, mask) -> output``; an object with a
``bind(name, layer)`` method is asked for one callable per layer instead (so it knows which layer calls it). A
processor is a plain attribute, not a submodule, so it never changes the checkpoint's keys.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from .attention import CrossAttention, explicit_attention

KINDS = ("cross", "self", "all")
Processor = Callable[..., torch.Tensor]


def attention_layers(module: nn.Module, kind: str = "all") -> list[tuple[str, CrossAttention]]:
    """The (name, layer) pairs of the transformer blocks' attention layers in ``module``, in forward order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (cross = attn2, self = attn1), got {kind!r}")
    suffix = {"cross": ("attn2",), "self": ("attn1",), "all": ("attn1", "attn2")}[kind]
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, CrossAttention) and name.rsplit(".", 1)[-1] in suffix]


def set_attention_processor(module: nn.Module, processor, kind: str = "all") -> dict[str, Processor | None]:
    """Install ``processor`` (None: the default) on the chosen layers; returns what they had, for
    :func:`restore_attention_processors`."""
    previous = {}
    layers = attention_layers(module, kind)
    if not layers:
        raise ValueError(f"no {kind} attention layers (attn1/attn2 of transformer blocks) found in "
                         f"{type(module).__name__}")
    for name, layer in layers:
        previous[name] = layer.__dict__.get("processor")
        bound = processor.bind(name, layer) if hasattr(processor, "bind") else processor
        object.__setattr__(layer, "processor", bound)   # a plain attribute: never a submodule in the state dict
    return previous


def restore_attention_processors(module: nn.Module, previous: dict[str, Processor | None]) -> None:
    layers = dict(attention_layers(module, "all"))
    for name, processor in previous.items():
        if processor is None:
            layers[name].__dict__.pop("processor", None)
        else:
            object.__setattr__(layers[name], "processor", processor)


@contextlib.contextmanager
def attention_processor(module: nn.Module, processor, kind: str = "all"):
    """``processor`` on the chosen layers for the duration of the block; yields the processor."""
    previous = set_attention_processor(module, processor, kind)
    try:
        yield processor
    finally:
        restore_attention_processors(module, previous)


class ExplicitAttention:
    """Attention with an explicit softmax, and a place to look at or change it: ``edit(name, probs)`` gets each
    layer's maps [batch, heads, queries, keys] and returns the maps to use (the identity here). Subclasses record
    maps (:class:`AttentionRecorder`) or edit them (prompt-to-prompt)."""

    def edit(self, name: str, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def bind(self, name: str, layer: CrossAttention) -> Processor:
        def processor(attn, x, context=None, mask=None):
            q, k, v = attn.heads_qkv(x, context)
            probs = self.edit(name, attn.probabilities(q, k, attn.score_bias(mask, q)))
            return attn.output(probs @ v, x)
        return processor


class AttentionRecorder(ExplicitAttention):
    """Keeps every call's attention maps: ``maps[layer name]`` is a list, one [batch, heads, queries, keys]
    tensor per call. ``detach=False`` keeps their graph (for losses on the maps, e.g. the grounding loss)."""

    def __init__(self, detach: bool = True):
        self.detach = detach
        self.maps: dict[str, list[torch.Tensor]] = defaultdict(list)

    def edit(self, name: str, probs: torch.Tensor) -> torch.Tensor:
        self.maps[name].append(probs.detach() if self.detach else probs)
        return probs

    def clear(self) -> None:
        self.maps.clear()


__all__ = ["attention_layers", "set_attention_processor", "restore_attention_processors", "attention_processor",
           "ExplicitAttention", "AttentionRecorder", "explicit_attention"]
