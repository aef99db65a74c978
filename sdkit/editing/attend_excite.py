"""Attend-and-Excite (Chefer et al. 2023): steer the latent during the first steps of sampling so that every subject
word of the prompt gets a strong cross-attention region of its own; or, with a binding loss (after SynGen, Rassin et
al. 2023), so that each colour word's region is its shape word's.

A prompt with two objects often loses one ("a red circle and a blue square" → two circles, or one object with
both colours): the neglected word's cross-attention stays weak everywhere. Attend-and-Excite measures that on the
fly. At each of the first ``excite_steps`` steps:

1. one conditional UNet pass with gradients records the cross-attention maps; they are averaged over heads and
   the layers of one resolution (the finest, by default), restricted to the prompt's own tokens without the
   start token, scaled by 100 and soft-maxed over tokens (so words compete for each pixel);
2. each subject word's map is smoothed by a 3×3 Gaussian (σ = 0.5) and its maximum taken; the loss is
   max over subjects of (1 − that maximum): the most neglected subject;
3. the latent takes a gradient step, z ← z − α_i ∇_z loss, with α_i = ``step_size`` · √(linspace(1, 0.5)[i]);
   at a few steps (the paper's iterative refinement: at 0%, 20% and 40% of the run) the step is repeated until
   every subject's maximum reaches 0.05, 0.5 and 0.8 (at most ``max_refinement`` times);
4. the guided step is then taken from the updated latent.

The paper's settings for SD (50 steps, excitation in the first 25, refinement at steps 0, 10 and 20, α = 20) are
kept as fractions of the run. The excited steps are DDIM steps on the chosen sampler's own grid (DDIM is the
first-order member of every sampler family here); the rest of the run is the chosen sampler from that point
(``start_step``), so ``step_size=0`` gives the same run without excitation, the fair "before".

    result = attend_and_excite(model, "a red circle and a blue square", seed=0, guidance_scale=5, steps=20)
    result.images[0]

Measured on the shipped tiny model (benchmarks/attend_excite.py, 40 held-out two-group prompts, same seeds,
guidance 5, 20 steps): it does not help. Colour+shape 67.5% with excitation (renormalised maps, 16×16, α = 20),
75.0% and 72.5% with the colour and shape words as subjects and α = 10 (16×16 and 8×8 maps), against 77.5% for
the same run without it (80.0% for plain txt2img); the paper's ×100 softmax did worse still on
the 12 prompts used to choose (41.7% against 66.7%). This model was trained with an attention grounding loss, so
its subject words already own their regions; pushing one word's maximum up mostly moves objects around. Its errors
are binding errors (colours swapped between objects), and the same latent steps on :func:`binding_loss`
(``objective="bind"``: each colour word's map pulled onto its shape word's, the groups' maps apart; SynGen-like)
do help: 85.0% against 77.5% on the same 40 prompts and seeds (7 fixed, 4 broken), step size 60 on the 16×16
maps, chosen on other prompts.

Subjects: the words to excite, or for the shapes dataset's captions "shape" (each group's shape word, the
default) or "colour+shape" (its colour word and its shape word). A word of several tokens counts with the sum of
its tokens' attention.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import checks
from ..data.shapes import COLOURS, SHAPES, plural
from ..nn.attention_processors import AttentionRecorder, attention_processor
from ..pipelines.plan import prepare
from ..samplers import GRID_FAMILY
from ..samplers.denoisers import denoiser, model_eps_fn
from ..samplers.grids import ddim_timesteps, sigma_grid
from .inversion import ddim_step
from .words import prompt_words

SHAPE_WORDS = frozenset(SHAPES) | frozenset(plural(s) for s in SHAPES)
REFINEMENT = {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}   # fraction of the run → max attention every subject must reach
SOFTMAX_SCALE = 100.0                            # the paper's temperature: attention × 100 before the softmax


# ------------------------------------------------------------------------------------------------ subjects
def subject_tokens(model, prompt: str, subjects: str | Sequence[str] = "shape") -> list[tuple[int, ...]]:
    """The token positions of each subject word of ``prompt`` (one tuple per word)."""
    words = prompt_words(model, prompt)
    if isinstance(subjects, str):
        if subjects not in ("shape", "colour+shape"):
            raise ValueError(f"subjects must be 'shape', 'colour+shape' (for shapes captions) or a list of words "
                             f"of the prompt, got {subjects!r}")
        wanted = SHAPE_WORDS | (frozenset(COLOURS) if subjects == "colour+shape" else frozenset())
        found = [w.tokens for w in words if w.text.lower().strip(",.") in wanted]
        if not found:
            raise ValueError(f"the prompt {prompt!r} has no {subjects} words of the shapes dataset; pass "
                             "subjects=[...] with the words to excite")
        return found
    texts = [w.text.lower().strip(",.") for w in words]
    found = []
    for subject in subjects:
        if subject.lower() not in texts:
            raise ValueError(f"subject {subject!r} is not a word of the prompt {prompt!r} (its words: {texts})")
        found.append(words[texts.index(subject.lower())].tokens)
    return found


def colour_shape_pairs(model, prompt: str) -> list[tuple[int, ...]]:
    """For shapes captions: the token positions of each group's colour word and shape word, as a flat list
    [colour₁, shape₁, colour₂, shape₂, …] (:func:`binding_loss`'s pairs). A colour word not followed by a shape
    word before the next colour word (the background's, "on a blue background") belongs to no pair."""
    pairs, colour = [], None
    for word in prompt_words(model, prompt):
        text = word.text.lower().strip(",.")
        if text in COLOURS:
            colour = word.tokens
        elif text in SHAPE_WORDS and colour is not None:
            pairs += [colour, word.tokens]
            colour = None
    if not pairs:
        raise ValueError(f"the prompt {prompt!r} has no colour word followed by a shape word of the shapes dataset")
    return pairs


# ------------------------------------------------------------------------------------------------ the loss
def gaussian_kernel(sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return (g[:, None] * g[None, :] / g.sum() ** 2).float()


def subject_maxima(maps: torch.Tensor, prompt_length: int, subjects: Sequence[tuple[int, ...]],
                   sigma: float = 0.5, normalise: str = "softmax") -> torch.Tensor:
    """For one image: the cross-attention ``maps`` [pixels, tokens] (heads and layers averaged) → the smoothed
    maximum of each subject's map [len(subjects)]. Tokens 1 … prompt_length − 2 (the prompt's words, without the
    start and end tokens and padding) compete for each pixel: through the paper's softmax of the attention × 100
    (``normalise="softmax"``), or with the attention renormalised over them (``"renormalise"``: what the pixel
    would give the words if the other tokens were masked out; free of the paper's scale, which was set for SD's
    maps, where the start token takes most of the attention)."""
    side = round(math.sqrt(maps.shape[0]))
    words = maps[:, 1:prompt_length - 1]                                                   # [pixels, words]
    if normalise == "softmax":
        words = torch.softmax(words * SOFTMAX_SCALE, dim=-1)
    elif normalise == "renormalise":
        words = words / words.sum(-1, keepdim=True).clamp(min=1e-12)
    else:
        raise ValueError(f"normalise must be 'softmax' (the paper's) or 'renormalise', got {normalise!r}")
    per_subject = torch.stack([words[:, [t - 1 for t in tokens]].sum(-1) for tokens in subjects])
    images = per_subject.reshape(len(subjects), 1, side, side)
    smoothed = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), gaussian_kernel(sigma).to(images)[None, None])
    return smoothed.flatten(1).max(dim=1).values


def binding_loss(maps: torch.Tensor, prompt_length: int, subjects: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """For one image: a binding loss in the spirit of SynGen (Rassin et al. 2023) on the cross-attention ``maps``
    [pixels, tokens]. ``subjects`` come in (modifier, noun) pairs: [colour₁, shape₁, colour₂, shape₂, …]. Each
    word's map, renormalised over the prompt's words, is made a distribution over pixels; two words overlap by
    Σ min(P, Q) ∈ [0, 1]. The loss is the mean non-overlap of each pair's two words plus the mean overlap of words
    of different pairs: low when each colour sits on its own shape and the groups keep apart. In [0, 2]."""
    if len(subjects) % 2:
        raise ValueError(f"binding needs (modifier, noun) pairs of subject words, got {len(subjects)} words")
    words = maps[:, 1:prompt_length - 1]
    words = words / words.sum(-1, keepdim=True).clamp(min=1e-12)
    per_word = torch.stack([words[:, [t - 1 for t in tokens]].sum(-1) for tokens in subjects])      # [words, pixels]
    spatial = per_word / per_word.sum(-1, keepdim=True).clamp(min=1e-12)

    def overlap(a: int, b: int) -> torch.Tensor:
        return torch.minimum(spatial[a], spatial[b]).sum()

    pairs = len(subjects) // 2
    apart = [overlap(a, b) for a in range(len(subjects)) for b in range(a + 1, len(subjects)) if a // 2 != b // 2]
    together = torch.stack([1 - overlap(2 * g, 2 * g + 1) for g in range(pairs)]).mean()
    return together + (torch.stack(apart).mean() if apart else together.new_zeros(()))


def averaged_maps(recorder: AttentionRecorder, side: int | None) -> torch.Tensor:
    """[B, pixels, tokens]: the recorded cross-attention averaged over heads and over the layers at ``side``×``side``
    (None: the finest resolution recorded)."""
    calls = [m for maps in recorder.maps.values() for m in maps]
    pixels = max(m.shape[2] for m in calls) if side is None else side * side
    chosen = [m.mean(dim=1) for m in calls if m.shape[2] == pixels]
    if not chosen:
        sides = sorted({round(math.sqrt(m.shape[2])) for m in calls})
        raise ValueError(f"no cross-attention at {side}×{side}; this model has it at {sides}")
    return torch.stack(chosen).mean(0)


# ------------------------------------------------------------------------------------------------ the grid
def sampler_grid(plan) -> tuple[list[float], list[float]]:
    """(model timestep of each step, ᾱ at each step's start) of the plan's sampler."""
    family = GRID_FAMILY[plan.sampler]
    ac = plan.model.alphas_cumprod
    if family == "ddim":
        ts = ddim_timesteps(plan.steps, plan.options.get("spacing", "compvis"), len(ac), plan.options.get("timesteps"))
    elif family in ("k", "dpm"):
        ts = sigma_grid(ac, plan.steps, plan.options.get("spacing", "compvis"), bool(plan.options.get("karras")),
                        family, grid=plan.options.get("grid"))[1].numpy()
    else:
        raise ValueError(f"attend_and_excite needs a sampler on a timestep or σ grid; {plan.sampler!r} walks the "
                         "DPM-Solver library's own time grid: use dpmpp_2m, ddim, euler, …")
    levels = plan.levels()
    return [float(t) for t in np.asarray(ts)], [float(a) for a in levels]


# ------------------------------------------------------------------------------------------------ the verb
def excite_losses(model, x: torch.Tensor, t: float, cond: torch.Tensor, prompt_lengths: Sequence[int],
                  subjects: Sequence[Sequence[tuple[int, ...]]], resolution: int | None,
                  normalise: str = "softmax", objective: str = "excite"):
    """Each image's loss and its gradient with respect to ``x``: for ``objective="excite"`` the most neglected
    subject's 1 − max attention (Attend-and-Excite), for ``"bind"`` :func:`binding_loss`."""
    x = x.detach().requires_grad_(True)
    times = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    recorder = AttentionRecorder(detach=False)
    with torch.enable_grad(), attention_processor(model.unet, recorder, kind="cross"):
        model_eps_fn(model)(x, times, cond)
        maps = averaged_maps(recorder, resolution)
        if objective == "bind":
            losses = torch.stack([binding_loss(maps[b], prompt_lengths[b], subjects[b]) for b in range(x.shape[0])])
        else:
            losses = torch.stack([(1 - subject_maxima(maps[b], prompt_lengths[b], subjects[b],
                                                      normalise=normalise)).max()
                                  for b in range(x.shape[0])])
        (grad,) = torch.autograd.grad(losses.sum(), [x])
    return losses.detach(), grad


def excite(model, x: torch.Tensor, t: float, cond: torch.Tensor, prompt_lengths: Sequence[int],
           subjects: Sequence[Sequence[tuple[int, ...]]], step_size: float, target: float | None = None,
           max_refinement: int = 20, resolution: int | None = None,
           normalise: str = "softmax", objective: str = "excite") -> tuple[torch.Tensor, torch.Tensor]:
    """One step's excitation of the batch ``x``: with a ``target``, first the iterative refinement (gradient steps
    on the images whose loss is above it, at most ``max_refinement``), then one gradient step on every image.
    Returns (x, each image's loss before that last step)."""
    def moved(x, losses, grad, which):
        return x - step_size * grad * which.to(grad).view(-1, *[1] * (x.ndim - 1))

    if target is not None and step_size > 0:
        for _ in range(max_refinement):
            losses, grad = excite_losses(model, x, t, cond, prompt_lengths, subjects, resolution, normalise,
                                         objective)
            above = losses > target
            if not bool(above.any()):
                break
            x = moved(x, losses, grad, above)
    losses, grad = excite_losses(model, x, t, cond, prompt_lengths, subjects, resolution, normalise, objective)
    return moved(x, losses, grad, losses > 0).detach(), losses


def attend_and_excite(model, prompt: str | Sequence[str], *, subjects: str | Sequence = "shape",
                      excite_steps: int | None = None, step_size: float = 20.0,
                      refinement: dict[float, float] | None = None, max_refinement: int = 20,
                      resolution: int | None = None, normalise: str = "softmax", objective: str = "excite",
                      negative_prompt: str | Sequence[str] = "",
                      num_images: int | None = None, height: int | None = None, width: int | None = None,
                      steps: int = 20, sampler: str = "dpmpp_2m", guidance_scale: float = 7.5, seed=None,
                      batch_size: int | None = None, progress: bool = True, record: list | None = None, **options):
    """txt2img with Attend-and-Excite during the first ``excite_steps`` steps (default: half the run).

    ``subjects``: "shape", "colour+shape" or a list of words (one list per prompt for several prompts);
    ``step_size``: α (0 = no excitation, the same run otherwise); ``refinement``: {fraction of the run: max
    attention every subject must reach} (default the paper's {0: 0.05, 0.2: 0.5, 0.4: 0.8}; {} = none);
    ``resolution``: the side of the attention maps used (default the finest); ``normalise``: how the words
    compete for a pixel (:func:`subject_maxima`); ``objective``: "excite" (the paper's loss) or "bind"
    (:func:`binding_loss`: subjects as (modifier, noun) pairs of words, by default each group's colour and shape
    word, :func:`colour_shape_pairs`; no refinement). ``record``: a list that gets each excited step's per-image
    losses. Other options as :func:`sdkit.txt2img`. Returns a PipelineResult."""
    if objective not in ("excite", "bind"):
        raise ValueError(f"objective must be 'excite' (Attend-and-Excite) or 'bind' (binding_loss), got {objective!r}")
    height = model.default_image_size if height is None else height
    width = model.default_image_size if width is None else width
    checks.number(step_size, "step_size", low=0.0)
    checks.integer(max_refinement, "max_refinement", low=0)
    factor, multiple = model.vae_factor, model.unet_multiple
    if height % (factor * multiple) or width % (factor * multiple):
        raise ValueError(f"height and width must be multiples of {factor * multiple} for attend_and_excite "
                         f"(got {height}×{width})")
    plan = prepare(model, prompt, negative_prompt, num_images, steps=steps, sampler=sampler,
                   guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, progress=progress,
                   canvas=(height, width), verb="attend_and_excite", **options)
    ts, levels = sampler_grid(plan)
    n = len(ts)
    excite_steps = n // 2 if excite_steps is None else checks.integer(
        excite_steps, "excite_steps", low=0, high=n - 1, hint=f" (this grid has {n} steps; at least one is left "
                                                                "to the sampler)")
    if refinement is None:
        refinement = {} if objective == "bind" else REFINEMENT
    targets = {round(fraction * n): 1.0 - reached for fraction, reached in refinement.items()}
    scales = np.sqrt(np.linspace(1.0, 0.5, n))
    per_prompt = subjects if not isinstance(subjects, str) and subjects and not isinstance(subjects[0], str) \
        else [subjects] * plan.num_images
    if len(per_prompt) != plan.num_images:
        raise ValueError(f"give one list of subjects per image ({plan.num_images}), got {len(per_prompt)}")
    if objective == "bind" and isinstance(subjects, str):       # the default: each group's colour and shape
        tokens = [colour_shape_pairs(model, p) for p in plan.prompts]
    else:
        tokens = [subject_tokens(model, p, s) for p, s in zip(plan.prompts, per_prompt)]
    lengths = [2 + sum(len(w.tokens) for w in prompt_words(model, p)) for p in plan.prompts]
    shape = (int(model.channels), height // factor, width // factor)
    latents, pixels = [], []
    for batch in plan.batches():
        x = batch.noise(shape, model.device)
        cond, uncond = plan.cond[batch.part], None if plan.uncond is None else plan.uncond[batch.part]
        guided = denoiser(model, cond, uncond, plan.guidance_scale)
        for i in range(excite_steps):
            if step_size or record is not None:
                x, losses = excite(model, x, ts[i], cond, lengths[batch.part], tokens[batch.part],
                                   step_size * float(scales[i]), targets.get(i), max_refinement, resolution, normalise,
                                   objective)
                if record is not None:
                    record.append((i, losses))
            with torch.no_grad():
                t = torch.full((x.shape[0],), ts[i], dtype=torch.float32, device=x.device)
                x = ddim_step(x, guided(x, t), levels[i], levels[i + 1])
        z = plan.sample(batch, x, start_step=excite_steps)
        latents.append(z)
        pixels.append(plan.decode(z))
    return plan.result(pixels, latents, verb="attend_and_excite", excite_steps=excite_steps, step_size=step_size)


__all__ = ["attend_and_excite", "subject_tokens", "subject_maxima", "binding_loss", "colour_shape_pairs",
           "averaged_maps", "excite", "excite_losses", "sampler_grid", "gaussian_kernel"]
