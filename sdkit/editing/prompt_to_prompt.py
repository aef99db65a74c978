"""Prompt-to-prompt: edit an image by editing its prompt, keeping the picture (Hertz et al. 2022, "Prompt-to-Prompt
Image Editing with Cross Attention Control").

Where a word lands in the image is decided by its cross-attention maps, early in sampling. So the source prompt
and the edited prompt are sampled together, from the same noise, in one batch; at every attention call of the
first steps, the edited branch's maps are replaced by the source branch's maps of the same call:

- **word swap** ("a red circle" → "a blue circle"): the edited prompt's tokens take the maps of the source tokens
  they stand for (the swapped word takes the replaced word's), so the new word is drawn where the old one was;
- **refinement** ("a red circle" → "a red circle on the left"): shared words take the source's maps, added
  words keep their own (tokens aligned word by word, ``sdkit.editing.words.token_alignment``);
- **re-weighting** (``reweight={"red": 2.0}``): the injected maps of a word's tokens are scaled, which
  strengthens or weakens its effect (as in the paper, applied while maps are injected).

Cross-attention maps are injected for the first ``cross_replace_steps`` (a fraction of the steps, 0.8 by
default), self-attention maps for the first ``self_replace_steps`` (0.4) in layers of at most 16×16 pixels (as the
paper does: the self-attention of the coarse layers carries the layout, the fine ones the detail the edit should be
free to change). Only the conditional half of the guided batch is edited, as in the paper's code; the unconditional
branch runs as usual. A step is a step of the sampler (``callback`` counts them), whatever its number of UNet calls.

A real image inverted to a starting latent ``x_T`` (``sdkit.editing.inversion``) is edited the same way: pass
``x_T``, and for null-text inversion its per-step unconditional embeddings as ``uncond_embeddings``; they replace
the empty prompt's text states in the cross-attention layers, step by step (the UNet uses the text only there).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import checks
from ..nn.attention_processors import ExplicitAttention, attention_processor
from .words import TokenAlignment, prompt_words, token_alignment

SELF_MAX_PIXELS = 16 * 16   # self-attention maps are injected only in layers this small (the paper's choice)


class StepClock:
    """The sampler's step, read off its callback (``callback(step, total, x, x0)`` runs after each step)."""

    def __init__(self, total: int, callback=None):
        self.step, self.total, self.callback = 0, total, callback

    def __call__(self, step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        self.step, self.total = step + 1, total
        if self.callback is not None:
            self.callback(step, total, x, x0)

    def before(self, fraction: float) -> bool:
        """Whether the current step is among the first ``fraction`` of the steps."""
        return self.step < int(fraction * self.total)


class PromptToPromptEditor(ExplicitAttention):
    """The attention processor of prompt-to-prompt, for a batch of ``pairs`` (source, edited) prompt pairs laid
    out as [sources..., edited...] (and under guidance [unconditional half, conditional half]).

    ``alignments``: one per pair; ``weights`` [pairs, tokens]: the re-weighting of the edited tokens' maps;
    ``uncond_embeddings``: None, or one unconditional text state per step ([1 or pairs, tokens, width])."""

    def __init__(self, pairs: int, alignments: Sequence[TokenAlignment], weights: torch.Tensor, clock: StepClock,
                 cross_replace_steps: float, self_replace_steps: float,
                 uncond_embeddings: Sequence[torch.Tensor] | None = None):
        self.pairs, self.clock = pairs, clock
        self.mapper = torch.stack([a.mapper for a in alignments])             # [pairs, tokens, tokens]
        self.taken = torch.stack([a.taken for a in alignments])[:, None, None, :]
        self.weights = weights[:, None, None, :]
        self.cross_replace_steps, self.self_replace_steps = cross_replace_steps, self_replace_steps
        self.uncond_embeddings = uncond_embeddings

    def bind(self, name, layer):
        edit = super().bind(name, layer)
        if not name.endswith("attn2") or self.uncond_embeddings is None:
            return edit

        def processor(attn, x, context=None, mask=None):
            return edit(attn, x, self.null_context(context), mask)
        return processor

    def null_context(self, context: torch.Tensor) -> torch.Tensor:
        """The text states with the unconditional half replaced by this step's embedding."""
        step, n = self.clock.step, 2 * self.pairs
        if step >= len(self.uncond_embeddings):
            raise RuntimeError(f"uncond_embeddings has {len(self.uncond_embeddings)} entries (one per step), but "
                               f"the sampler is at step {step + 1}; pass as many steps as the embeddings were made "
                               "for")
        if context.shape[0] != 2 * n:
            raise RuntimeError(f"uncond_embeddings need the guided batch of {2 * n}, got {context.shape[0]}")
        null = self.uncond_embeddings[step].to(context)
        null = null.expand(n, *null.shape[1:]) if null.shape[0] == 1 else torch.cat([null, null])
        return torch.cat([null, context[n:]])

    def edit(self, name: str, probs: torch.Tensor) -> torch.Tensor:
        n = self.pairs
        if probs.shape[0] not in (2 * n, 4 * n):
            raise RuntimeError(f"prompt-to-prompt for {n} pair(s) got a UNet batch of {probs.shape[0]}: all "
                               "prompts must run in one batch (no batch_size option)")
        source, edited = probs[-2 * n:-n], probs[-n:]
        if name.endswith("attn2"):
            if not self.clock.before(self.cross_replace_steps):
                return probs
            moved = torch.einsum("bhqw,bwn->bhqn", source, self.mapper.to(probs))
            taken = self.taken.to(probs)
            new = (taken * moved + (1 - taken) * edited) * self.weights.to(probs)
        else:
            if not self.clock.before(self.self_replace_steps) or probs.shape[2] > SELF_MAX_PIXELS:
                return probs
            new = source
        return torch.cat([probs[:-n], new])


@dataclass
class PromptToPromptResult:
    """``source[i]`` and ``edited[i]``: the images of pair i, from the same noise; ``result``: the pipeline
    result of the whole batch (sources first, then edits: latents, seeds, parameters)."""
    source: list
    edited: list
    result: object
    alignments: list[TokenAlignment]


def reweight_tokens(model, prompts: Sequence[str], reweight: dict[str, float] | None) -> torch.Tensor:
    """[pairs, tokens]: 1 everywhere, ``reweight[word]`` on the tokens of each occurrence of ``word``."""
    length = model.cond_stage_model.max_length
    weights = torch.ones(len(prompts), length)
    for word, scale in (reweight or {}).items():
        checks.number(scale, f"reweight[{word!r}]", hint=" (a factor for the word's attention, e.g. 2.0 or 0.5)")
        found = False
        for i, prompt in enumerate(prompts):
            for w in prompt_words(model, prompt):
                if w.text.lower() == str(word).lower():
                    weights[i, list(w.tokens)] = float(scale)
                    found = True
        if not found:
            raise ValueError(f"reweight names {word!r}, which is not a word of the edited prompt(s) {list(prompts)}")
    return weights


def prompt_to_prompt(model, source_prompt: str | Sequence[str], edited_prompt: str | Sequence[str], *,
                     seed: int | Sequence[int] | None = None, steps: int = 20, guidance_scale: float = 7.5,
                     cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
                     reweight: dict[str, float] | None = None, x_T: torch.Tensor | None = None,
                     uncond_embeddings: Sequence[torch.Tensor] | None = None, callback=None,
                     **options) -> PromptToPromptResult:
    """Sample ``source_prompt`` and ``edited_prompt`` (a string each, or lists of equal length: one pair per
    entry, all in one batch) from the same noise, the edited branch taking the source's attention maps.

    ``seed``: pair i's seed (an int: seed + i); ``x_T``: the starting latent instead ([1 or pairs, C, h, w],
    e.g. from inversion); ``uncond_embeddings``: one unconditional text state per sampling step (null-text
    inversion), replacing the negative prompt's. ``cross_replace_steps``, ``self_replace_steps``: the fractions of
    the steps that inject cross- and self-attention maps (0 turns injection off); ``reweight``: {word of the
    edited prompt: factor}. ``options`` go to ``txt2img`` (sampler, height, width, negative_prompt, ...)."""
    from ..pipelines.plan import resolve_seeds
    from ..pipelines.text_to_image import txt2img

    single = isinstance(source_prompt, str)
    sources = [source_prompt] if single else list(source_prompt)
    edits = [edited_prompt] if isinstance(edited_prompt, str) else list(edited_prompt)
    if len(sources) != len(edits) or not sources:
        raise ValueError(f"give one edited prompt per source prompt: got {len(sources)} source(s) and "
                         f"{len(edits)} edited prompt(s)")
    if "batch_size" in options or "num_images" in options:
        raise ValueError("prompt_to_prompt samples every pair in one batch; it takes no batch_size or num_images")
    for name, value in (("cross_replace_steps", cross_replace_steps), ("self_replace_steps", self_replace_steps)):
        checks.number(value, name, low=0.0, high=1.0, hint=" (the fraction of the sampling steps that inject maps)")
    n = len(sources)
    alignments = [token_alignment(model, s, e) for s, e in zip(sources, edits)]
    weights = reweight_tokens(model, edits, reweight)
    if uncond_embeddings is not None:
        uncond_embeddings = check_uncond_embeddings(model, uncond_embeddings, n, guidance_scale)
    if x_T is not None and x_T.ndim == 4 and x_T.shape[0] == n > 1:
        x_T = torch.cat([x_T, x_T])                          # each pair's source and edit start alike
    seeds = resolve_seeds(seed, n)
    clock = StepClock(steps, callback)
    editor = PromptToPromptEditor(n, alignments, weights, clock, cross_replace_steps, self_replace_steps,
                                  uncond_embeddings)
    with attention_processor(model.unet, editor, kind="all"):
        result = txt2img(model, sources + edits, seed=seeds + seeds, steps=steps, guidance_scale=guidance_scale,
                         x_T=x_T, callback=clock, **options)
    return PromptToPromptResult(result.images[:n], result.images[n:], result, alignments)


def check_uncond_embeddings(model, embeddings, pairs: int, guidance_scale: float) -> list[torch.Tensor]:
    """A list of [1 or pairs, tokens, width] tensors shaped like the model's encoded prompts; refused without
    guidance (there is no unconditional branch then)."""
    if guidance_scale == 1.0:
        raise ValueError("uncond_embeddings replace the unconditional branch of guidance, which guidance_scale=1 "
                         "skips; use the guidance scale they were made for")
    if isinstance(embeddings, torch.Tensor) or not len(embeddings):
        raise TypeError("uncond_embeddings must be a list with one tensor [1, tokens, width] per sampling step")
    with torch.no_grad():
        shape = tuple(model.get_learned_conditioning([""]).shape[1:])
    out = []
    for i, e in enumerate(embeddings):
        if not isinstance(e, torch.Tensor) or e.ndim != 3 or tuple(e.shape[1:]) != shape or \
                e.shape[0] not in (1, pairs):
            got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"uncond_embeddings[{i}] is {got}; each must be [1 or {pairs}, {shape[0]}, {shape[1]}] "
                             "(the text states of this model's encoder)")
        checks.finite(e, f"uncond_embeddings[{i}]")
        out.append(e.detach())
    return out


__all__ = ["PromptToPromptEditor", "PromptToPromptResult", "StepClock", "check_uncond_embeddings",
           "prompt_to_prompt", "reweight_tokens"]
