"""Attention grounding: teach cross-attention where each word's object is (a TokenCompose-style token loss).

The laptop model draws one-group shape prompts right 99% of the time but pairs colours with shapes about at
chance in two-group prompts ("a red circle and a blue square" → a blue circle and a red square), although the
frozen text states carry the pairing (tools/probe_text_binding.py). The diffusion loss alone rewards the pairing
only weakly. The shapes dataset knows exactly where each group is, so the pairing can be taught directly: the
attention a group's colour word and shape word receive should fall on that group's pixels.

For every cross-attention layer, with A[pixel, token] the attention averaged over heads, and M the group's mask at
the layer's resolution, the token loss of a grounded token t is (1 - Σ_p A[p, t] M[p] / Σ_p A[p, t])², as in
TokenCompose (Wang et al., CVPR 2024, "TokenCompose: Text-to-Image Diffusion with Token-level Supervision").
A group's mask comes from the image itself: two groups of a scene always have different colours, and shapes are
drawn in exact dataset colours, so the pixels near the group's colour are its objects. Captions that are not
shape-dataset captions (emoji, or dropped for classifier-free guidance) are not grounded.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.shapes import ALL_SHAPES, COLOURS, parse_caption, plural
from ..nn.attention_processors import AttentionRecorder, attention_processor
from .common import batch_value, image_input

COLOUR_DISTANCE = 50.0   # RGB distance (0-255) under which a pixel is the group's colour; colours are ≥ 97 apart
MIN_COVERAGE = 0.05      # a cell of the attention grid belongs to a group when this much of it is the group's colour
SHAPE_WORDS = frozenset(ALL_SHAPES) | frozenset(plural(s) for s in ALL_SHAPES)   # the hexagon too: captions name it


@dataclass(frozen=True)
class GroundedGroup:
    """Token positions (in the text encoder's padded sequence) of one group's colour and shape words."""
    tokens: tuple[int, ...]
    colour: str


def grounded_groups(caption: str, tokenizer, max_length: int) -> list[GroundedGroup]:
    """The groups of a shapes caption with their colour- and shape-word tokens; [] for any other caption.

    ``tokenizer`` is the text encoder's (called as ``tokenizer([text], padding="longest", ...)``, which both the
    MiniLM WordPiece and the CLIP BPE tokenizers accept), so the positions are those of the encoder's states.
    Both tokenizers split text into words first, so a word's pieces are found by tokenizing it alone (CLIP cuts
    "triangles" into "tri" + "angles"). Groups come in caption order and so do their words: the k-th colour word
    (and shape word) is group k's; a background colour ("on a light blue background") comes after every group."""
    if not caption:
        return []
    try:
        groups = parse_caption(caption).groups
    except ValueError:
        return []
    colour_words, shape_words, position = [], [], 1          # position 0 is the start token
    for word in caption.lower().split():
        pieces = tuple(range(position, position + _piece_count(tokenizer, word)))
        position += len(pieces)
        if word in COLOURS:
            colour_words.append(pieces)
        elif word in SHAPE_WORDS:
            shape_words.append(pieces)
    if len(colour_words) < len(groups) or len(shape_words) != len(groups) or position >= max_length:
        return []      # not read as expected, or cut by the encoder's length limit: better not ground at all
    return [GroundedGroup(colour_words[k] + shape_words[k], g.colour) for k, g in enumerate(groups)]


# tokenizer -> {word: token count}; weak keys, so a new tokenizer never reuses a freed one's counts
_PIECE_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _piece_count(tokenizer, word: str) -> int:
    """How many tokens ``word`` becomes (captions reuse a few dozen words, so this is cached)."""
    counts = _PIECE_COUNTS.setdefault(tokenizer, {})
    if word not in counts:
        mask = tokenizer([word], max_length=64, truncation=True, padding="longest",
                         return_tensors="pt")["attention_mask"][0]
        counts[word] = int(mask.sum()) - 2                      # less the start and end tokens
    return counts[word]


def colour_mask(image: torch.Tensor, colour: str) -> torch.Tensor:
    """[H, W] float mask of the pixels of ``image`` ([3, H, W] in [-1, 1]) close to a dataset colour."""
    rgb = (image.float() + 1) * 127.5
    target = torch.tensor(COLOURS[colour], dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return ((rgb - target).norm(dim=0) < COLOUR_DISTANCE).float()


class GroundingTargets:
    """Where each grounded group of a batch is: item index, which tokens are its words, and its colour mask,
    pooled to each attention resolution on first use."""

    def __init__(self, images: torch.Tensor, groups: list[list[GroundedGroup]], n_tokens: int):
        pairs = [(i, g) for i, item_groups in enumerate(groups) for g in item_groups]
        self.items = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        self.words = torch.zeros(len(pairs), n_tokens)                     # [G, tokens] 1 on the group's words
        for row, (_, g) in enumerate(pairs):
            self.words[row, list(g.tokens)] = 1.0
        self.masks = (torch.stack([colour_mask(images[i], g.colour) for i, g in pairs])[:, None]
                      if pairs else None)                                  # [G, 1, H, W]
        self._cells: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def cells(self, side: int) -> torch.Tensor:
        """[G, side*side] 1 where a grid cell holds enough of the group's colour."""
        if side not in self._cells:
            pooled = F.adaptive_avg_pool2d(self.masks, side).flatten(1)
            self._cells[side] = (pooled > MIN_COVERAGE).float()
        return self._cells[side]


def token_loss(attention: torch.Tensor, targets: GroundingTargets) -> torch.Tensor:
    """Mean TokenCompose token loss of one layer's maps [B, heads, h*w, tokens] over the grounded tokens."""
    n = attention.shape[2]
    cells = targets.cells(int(round(n ** 0.5))).to(attention.device, attention.dtype)     # [G, h*w]
    maps = attention.mean(dim=1)[targets.items.to(attention.device)]                      # [G, h*w, tokens]
    inside = (maps * cells[:, :, None]).sum(1) / maps.sum(1).clamp(min=1e-8)              # [G, tokens]
    # a colour not in the image (cropped away) has nothing to ground to
    words = targets.words.to(attention.device, attention.dtype) * (cells.sum(1, keepdim=True) > 0)
    if not bool(words.any()):
        return attention.sum() * 0
    return (((1 - inside) ** 2) * words).sum() / words.sum()


def grounding_loss(maps: list[torch.Tensor], targets: GroundingTargets) -> torch.Tensor | None:
    """Token loss averaged over cross-attention layers' maps (None when the batch grounds nothing)."""
    if len(targets) == 0:
        return None
    return torch.stack([token_loss(attention, targets) for attention in maps]).mean()


class GroundingLoss:
    """The grounding loss as a training add-on of :class:`~sdkit.training.diffusion.LatentDiffusionModule`::

        model:
          training:
            addons:
              grounding: {target: sdkit.training.grounding.GroundingLoss, params: {weight: 0.5, max_timestep: 700}}

    It records the cross-attention maps of the training forward pass through the attention hook
    (``sdkit.nn.attention_processors``) and adds ``weight`` × the token loss of the batch's shape captions.
    ``max_timestep``: ground only the items whose timestep is below this. Near pure noise the image does not yet
    say where an object will be, so the loss cannot be met there and only pushes attention to guessed places
    (measured on the stage-7 model: the loss is 0.01-0.03 for t ≤ 600, 0.14 at 800, 0.34 at 950).
    """

    name = "grounding"

    def __init__(self, weight: float = 0.5, max_timestep: int | None = None):
        self.weight, self.max_timestep = float(weight), max_timestep

    def setup(self, module) -> None:
        """Refuse what the loss cannot work with: a model without text, or gradient checkpointing (the loss reads
        the maps of the forward pass, which checkpointing recomputes)."""
        checkpointed = any(getattr(m, "checkpoint", False) is True for m in module.ldm.model.modules())
        if not module.ldm.is_text_conditioned or checkpointed:
            raise ValueError(
                "the grounding loss needs a text-conditioned (crossattn) model trained without gradient "
                "checkpointing (it reads the attention maps of the forward pass); set gradient_checkpointing: "
                "false or remove the grounding add-on")

    @contextlib.contextmanager
    def watch(self, module, batch, t: torch.Tensor, drop: list[bool], cond: torch.Tensor):
        """Record the cross-attention of the forward pass run inside the block; yields a function that returns
        the loss (None when nothing in the batch is grounded)."""
        encoder = module.ldm.cond_stage_model
        captions = batch_value(batch, module.ldm.cond_stage_key)
        limit = self.max_timestep if self.max_timestep is not None else module.ldm.num_timesteps
        groups = [[] if drop[i] or int(t[i]) >= limit else grounded_groups(c, encoder.tokenizer, encoder.max_length)
                  for i, c in enumerate(captions)]
        targets = GroundingTargets(image_input(batch, module.ldm.first_stage_key), groups, cond.shape[1])
        recorder = AttentionRecorder(detach=False)
        with attention_processor(module.ldm.model, recorder, kind="cross"):
            yield lambda: grounding_loss([calls[-1] for calls in recorder.maps.values()], targets)
