"""Procedural shapes: images whose captions are exactly true, for training and for checking prompt following.

A *scene* is what a caption says: one or two groups of objects (colour, shape, count, size, position) on a
light background. A *layout* is where each object lands; it is drawn from a random generator, so one scene
has many images. Everything is deterministic by (seed, split, index).

    ds = ShapesDataset(length=10_000, seed=0)          # item: {"image", "caption", "meta"}
    ds[3]["caption"]                                   # e.g. 'two small blue squares on the left'
    render(parse_caption("a red circle at the top"), size=64, seed=1)   # PIL image

Canonical caption grammar (what `caption(scene)` writes and `parse_caption` reads):

    scene   := group (" and " group)? background?
    group   := count [size] colour shape[s] [position]
    count   := "a" | "an" | "two" | "three"           ("one", "2", "3" are read too)
    size    := "small" | "large"                      (absent = medium)
    position:= "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    background := " on a <light gray|cream|light blue> background"   (absent = white)

The "varied" caption style adds phrasing the model should learn to ignore ("a picture of ...", digits for
counts, "in the middle", "on a white background"); `parse_caption` reads those too.

Shape vocabulary: SHAPES are the six shapes the shipped model learned; NEW_SHAPES (a hexagon) were added later to
measure how a model learns a concept it never saw. Every function reads and draws all of ALL_SHAPES, but sampling
(`ShapesDataset`, `sample_scene`) and the checker use the original six unless given `shapes=`, so their default
output is what it always was:

    ShapesDataset(length=8, shapes=["hexagon"], two_group_prob=0)[0]["caption"]   # e.g. 'a large red hexagon'

Validation split: a group's attribute combination (colour, shape, count, size, position) is *held out* when
a hash of it falls in the first `heldout_fraction` (default 10%) of the hash range. The train split never
contains a held-out combination; the validation split contains only held-out combinations, drawn from a
different random stream. So validation captions are never seen in training, while every colour, every shape
and every (colour, shape) pair is (each pair has 41 combinations, of which about 4 are held out).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .transforms import to_tensor

# Well separated in RGB (nearest pair about 97 apart) and far from every light background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (240, 120, 20),
    "yellow": (245, 215, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "pink": (245, 120, 190),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (228, 228, 228),
    "cream": (250, 243, 222),
    "light blue": (222, 235, 250),
}
# Chosen to stay distinct at 64x64 (and on a 16x16 latent grid): no two share an outline.
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
# Shapes added later, which the shipped model never saw: opt-in (`shapes=` of the dataset, sample_scene and the
# checker), so the default vocabulary, data streams and checker verdicts stay what the shipped model was built on.
NEW_SHAPES = ("hexagon",)
ALL_SHAPES = SHAPES + NEW_SHAPES
# Half the side of an object's bounding box, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.14, "large": 0.19}
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}

MARGIN = 0.03   # free space between an object and the image border
GAP = 0.06      # free space between two objects, so they stay separate connected components
# Where an object's centre may go for each position (x range, y range); None = from the object's own margin.
_CENTRE_BOXES = {
    "left": ((None, 0.34), (None, None)),
    "right": ((0.66, None), (None, None)),
    "top": ((None, None), (None, 0.34)),
    "bottom": ((None, None), (0.66, None)),
    "center": ((0.32, 0.68), (0.32, 0.68)),
    None: ((None, None), (None, None)),
}
# Positions of the two groups in a two-group scene: opposite sides, or both anywhere.
_POSITION_PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"), (None, None))


@dataclass(frozen=True)
class Group:
    """`count` objects of one colour, shape and size, placed in one region (None: anywhere)."""
    colour: str
    shape: str
    count: int = 1
    size: str = "medium"
    position: str | None = None

    def __post_init__(self):
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("shape", self.shape, ALL_SHAPES)
        _check_choice("count", self.count, COUNT_WORDS)
        _check_choice("size", self.size, SIZES)
        _check_choice("position", self.position, (*POSITIONS, None))
        if self.count == 3 and self.size != "small":
            raise ValueError(f"three objects only fit when they are small, got size {self.size!r}")
        if self.count > 1 and self.size == "large" and self.position == "center":
            raise ValueError("two large objects do not fit in the center; use small or medium ones")

    def key(self) -> str:
        return f"{self.colour}|{self.shape}|{self.count}|{self.size}|{self.position}"


@dataclass(frozen=True)
class Scene:
    """What a caption says: the groups of objects and the background colour name."""
    groups: tuple[Group, ...]
    background: str = "white"

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        _check_choice("background", self.background, BACKGROUNDS)
        if not 1 <= len(self.groups) <= 2:
            raise ValueError(f"a scene has one or two groups, got {len(self.groups)}")

    def to_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups], "background": self.background}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(Group(**g) for g in d["groups"]), d.get("background", "white"))


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: centre (cx, cy) and half-extent r, all as fractions of the image side."""
    colour: str
    shape: str
    cx: float
    cy: float
    r: float


def _check_choice(what, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(allowed)}")


# ----------------------------------------------------------------------------------------------- outlines
@lru_cache(maxsize=None)
def _outline(shape: str) -> tuple[tuple[float, float], ...] | None:
    """Polygon of a shape with its bounding box exactly [-1, 1]^2 (y down); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "cross":   # a plus sign with arms 40% of the extent wide
        w = 0.4
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    elif shape == "star":    # five points, inner radius half the outer: fat enough to survive 64x64
        pts = [((1.0 if k % 2 == 0 else 0.5) * math.sin(k * math.pi / 5),
                -(1.0 if k % 2 == 0 else 0.5) * math.cos(k * math.pi / 5)) for k in range(10)]
    elif shape == "hexagon":   # pointy top and bottom, upright sides: a regular hexagon stretched to the box
        pts = [(0, -1), (1, -0.5), (1, 0.5), (0, 1), (-1, 0.5), (-1, -0.5)]
    elif shape == "heart":   # the classic parametric heart curve
        ts = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        pts = list(zip(16 * np.sin(ts) ** 3,
                       -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {list(ALL_SHAPES)}")
    xy = np.asarray(pts, dtype=np.float64)
    lo, hi = xy.min(0), xy.max(0)
    xy = (xy - lo) / (hi - lo) * 2 - 1   # stretch to the [-1, 1] box, so its centre is the box centre
    return tuple(map(tuple, xy))


def draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape centred at pixel (cx, cy) with half-extent r pixels (no antialiasing: supersample)."""
    outline = _outline(shape)
    if outline is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in outline], fill=fill)


# ----------------------------------------------------------------------------------------------- layout
def layout(scene: Scene, rng: np.random.Generator, max_restarts: int = 200) -> tuple[PlacedObject, ...]:
    """Place every object of `scene`: inside its group's region, inside the image, apart from the others."""
    for _ in range(max_restarts):
        placed: list[PlacedObject] = []
        ok = True
        for g in scene.groups:
            r = SIZES[g.size]
            (x0, x1), (y0, y1) = _CENTRE_BOXES[g.position]
            lo, hi = r + MARGIN, 1 - r - MARGIN
            x0, x1 = (lo if x0 is None else max(lo, x0)), (hi if x1 is None else min(hi, x1))
            y0, y1 = (lo if y0 is None else max(lo, y0)), (hi if y1 is None else min(hi, y1))
            for _ in range(g.count):
                for _ in range(100):
                    cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
                    # Bounding boxes apart (not just centres): squares' corners reach past a circle.
                    if all(max(abs(cx - p.cx), abs(cy - p.cy)) >= r + p.r + GAP for p in placed):
                        placed.append(PlacedObject(g.colour, g.shape, float(cx), float(cy), r))
                        break
                else:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return tuple(placed)
    raise ValueError(f"could not place the objects of {scene} without overlap; use fewer or smaller objects")


def render(scene: Scene | str, size: int = 64, seed: int = 0,
           objects: Sequence[PlacedObject] | None = None, supersample: int = 4) -> Image.Image:
    """Draw a scene (or a caption in the canonical grammar) as an RGB image of `size` x `size`.

    The layout comes from `seed` unless `objects` gives it. Shapes are drawn at `supersample` times the size
    and box-filtered down, which antialiases them exactly."""
    if isinstance(scene, str):
        scene = parse_caption(scene)
    if objects is None:
        objects = layout(scene, np.random.default_rng(seed))
    big = size * supersample
    im = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    for o in objects:
        draw_object(draw, o.shape, o.cx * big, o.cy * big, o.r * big, COLOURS[o.colour])
    return im.reduce(supersample) if supersample > 1 else im


# ----------------------------------------------------------------------------------------------- captions
def plural(shape: str) -> str:
    """The plural of a shape name as captions write it ("crosses"); the grounding loss looks for these words too."""
    return shape + ("es" if shape.endswith("s") else "s")


def _group_phrase(g: Group, digits: bool = False, middle: bool = False) -> str:
    count = str(g.count) if digits and g.count > 1 else COUNT_WORDS[g.count]
    size = "" if g.size == "medium" else g.size + " "
    if g.count == 1 and count == "a" and (size or g.colour)[0] in "aeiou":
        count = "an"
    words = f"{count} {size}{g.colour} {plural(g.shape) if g.count > 1 else g.shape}"
    if g.position is not None:
        words += " " + ("in the middle" if middle and g.position == "center" else POSITION_PHRASES[g.position])
    return words


def caption(scene: Scene, style: str | Callable = "canonical", rng: np.random.Generator | None = None) -> str:
    """Describe a scene in words. `style`: "canonical" (one fixed phrasing), "varied" (random phrasing
    drawn from `rng`, all readable by `parse_caption`), or a function (scene, rng) -> str."""
    if callable(style):
        return style(scene, rng)
    if style == "canonical":
        text = " and ".join(_group_phrase(g) for g in scene.groups)
        return text + ("" if scene.background == "white" else f" on a {scene.background} background")
    if style == "varied":
        rng = rng if rng is not None else np.random.default_rng(0)
        digits, middle = rng.random() < 0.3, rng.random() < 0.3
        text = " and ".join(_group_phrase(g, digits, middle) for g in scene.groups)
        prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
        if scene.background != "white" or rng.random() < 0.2:
            text += f" on a {scene.background} background"
        return prefix + text
    raise ValueError(f"unknown caption style {style!r}; use 'canonical', 'varied' or a function (scene, rng) -> str")


_PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ", "a simple drawing of ")
_NUMBERS = {"a": 1, "an": 1, "one": 1, "1": 1, "two": 2, "2": 2, "three": 3, "3": 3}
_PHRASE_TO_POSITION = {**{v: k for k, v in POSITION_PHRASES.items()}, "in the middle": "center"}
_GROUP_RE = re.compile(
    r"^(?P<count>{})\s+(?:(?P<size>small|medium|large)\s+)?(?P<colour>{})\s+(?P<shape>{})(?:e?s)?"
    r"(?:\s+(?P<position>{}))?$".format(
        "|".join(_NUMBERS), "|".join(COLOURS), "|".join(ALL_SHAPES), "|".join(_PHRASE_TO_POSITION)))
_BACKGROUND_RE = re.compile(r"\s+on an?\s+(?P<bg>{})\s+background$".format("|".join(BACKGROUNDS)))


def parse_caption(text: str) -> Scene:
    """Read a caption in the grammar of this module's docstring back into a Scene."""
    s = " ".join(text.lower().strip().rstrip(".").split())
    for prefix in sorted(set(_PREFIXES), key=len, reverse=True):
        if prefix and s.startswith(prefix):
            s = s[len(prefix):]
            break
    background = "white"
    m = _BACKGROUND_RE.search(s)
    if m:
        background, s = m.group("bg"), s[:m.start()]
    groups = []
    for part in s.split(" and "):
        g = _GROUP_RE.match(part.strip())
        if g is None:
            raise ValueError(
                f"cannot read {part!r} in caption {text!r}; expected e.g. 'two small red circles on the left': "
                f"count (a/two/three), optional size (small/large), colour {list(COLOURS)}, "
                f"shape {list(ALL_SHAPES)}, optional position {list(POSITION_PHRASES.values())}")
        groups.append(Group(colour=g.group("colour"), shape=g.group("shape"), count=_NUMBERS[g.group("count")],
                            size=g.group("size") or "medium",
                            position=_PHRASE_TO_POSITION.get(g.group("position"))))
    return Scene(tuple(groups), background)


# ----------------------------------------------------------------------------------------------- sampling
def is_heldout(group: Group, fraction: float = 0.1) -> bool:
    """Whether a group's attribute combination belongs to the validation split (a fixed hash rule)."""
    h = int.from_bytes(hashlib.sha256(group.key().encode()).digest()[:8], "big")
    return h < fraction * 2 ** 64


COUNT_PROBS = {1: 0.6, 2: 0.25, 3: 0.15}   # single objects dominate: colour and shape matter most


def check_shapes(shapes: Sequence[str] | None) -> tuple[str, ...]:
    """A shape vocabulary as a tuple (None: the original SHAPES); refuses unknown, repeated or no shapes."""
    if shapes is None:
        return SHAPES
    if isinstance(shapes, str):
        raise TypeError(f"shapes={shapes!r} must be a list of shape names, e.g. [{shapes!r}]")
    shapes = tuple(shapes)
    if not shapes or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes={list(shapes)} must name at least one shape, each once; choose from {list(ALL_SHAPES)}")
    for shape in shapes:
        _check_choice("shape", shape, ALL_SHAPES)
    return shapes


def _sample_group(rng, position, max_count, heldout, fraction, shapes) -> Group:
    """A random group at `position` with at most `max_count` objects, held out or not as asked."""
    counts = list(COUNT_PROBS)[:max_count]
    probs = np.array([COUNT_PROBS[c] for c in counts])
    while True:
        count = int(rng.choice(counts, p=probs / probs.sum()))
        if count == 3:
            size = "small"
        elif count == 2 and position == "center":
            size = str(rng.choice(["small", "medium"]))
        else:
            size = str(rng.choice(list(SIZES)))
        g = Group(str(rng.choice(list(COLOURS))), str(rng.choice(shapes)), count, size, position)
        if is_heldout(g, fraction) == heldout:
            return g


def sample_scene(rng: np.random.Generator, split: str = "train", heldout_fraction: float = 0.1,
                 two_group_prob: float = 0.3, shapes: Sequence[str] | None = None) -> Scene:
    """Draw a random scene of the given split (see the module docstring for the split rule), with shapes from
    `shapes` (default: the original SHAPES; e.g. ALL_SHAPES or ["hexagon"] for the shapes added later)."""
    _check_choice("split", split, ("train", "validation"))
    shapes = check_shapes(shapes)
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction}")
    heldout = split == "validation"
    background = "white" if rng.random() < 0.5 else str(rng.choice(list(BACKGROUNDS)[1:]))
    if rng.random() >= two_group_prob:
        position = None if rng.random() < 0.3 else str(rng.choice(POSITIONS))
        return Scene((_sample_group(rng, position, 3, heldout, heldout_fraction, shapes),), background)
    pa, pb = _POSITION_PAIRS[rng.integers(len(_POSITION_PAIRS))]
    a = _sample_group(rng, pa, 2, heldout, heldout_fraction, shapes)
    while True:   # distinct colours, at most three objects in all
        b = _sample_group(rng, pb, 3 - a.count, heldout, heldout_fraction, shapes)
        if b.colour != a.colour:
            return Scene((a, b), background)


_SPLIT_STREAM = {"train": 0, "validation": 1}


class ShapesDataset(torch.utils.data.Dataset):
    """A torch-style map dataset of procedural shape images.

    Item i is {"image": float tensor [3, size, size] in [-1, 1], "caption": str, "meta": dict} where meta holds
    the scene (exact attributes), the placed objects, and (index, seed, split). Deterministic: the same
    (seed, split, index) always gives the same item, in any process. `shapes`: the shape vocabulary drawn from
    (default: the original SHAPES, which the shipped model was trained on; ["hexagon"] gives scenes of the new
    shape only, ALL_SHAPES mixes all).
    """

    def __init__(self, length: int = 10_000, size: int = 64, seed: int = 0, split: str = "train",
                 caption_style: str | Callable = "canonical", heldout_fraction: float = 0.1,
                 two_group_prob: float = 0.3, shapes: Sequence[str] | None = None):
        _check_choice("split", split, _SPLIT_STREAM)
        self.shapes = check_shapes(shapes)
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction}")
        self.length, self.size, self.seed, self.split = length, size, seed, split
        self.caption_style, self.heldout_fraction, self.two_group_prob = caption_style, heldout_fraction, two_group_prob

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> tuple[Scene, tuple[PlacedObject, ...], str]:
        """The scene, layout and caption of item `index`, without drawing it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])
        scene = sample_scene(rng, self.split, self.heldout_fraction, self.two_group_prob, self.shapes)
        objects = layout(scene, rng)
        return scene, objects, caption(scene, self.caption_style, rng)

    def __getitem__(self, index: int) -> dict:
        scene, objects, text = self.example(index)
        image = render(scene, self.size, objects=objects)
        meta = {"scene": scene.to_dict(), "objects": [asdict(o) for o in objects],
                "index": index, "seed": self.seed, "split": self.split}
        return {"image": to_tensor(image), "caption": text, "meta": meta}
