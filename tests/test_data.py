"""sdkit.data: shapes (+ checker), emoji, HF/imagefolder/streaming datasets, transforms and degradation."""
import collections
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sdkit.data import emoji as emoji_mod
from sdkit.data import shapes_checker
from sdkit.data.emoji import EmojiDataset, emoji_name, list_emoji, load_emoji_dataset, make_caption, render_emoji
from sdkit.data.hf import (ImageCaptionDataset, IterableImageCaptionDataset, collate_examples, save_imagefolder,
                           shard)
from sdkit.data.shapes import (COLOURS, SHAPES, SIZES, Group, PlacedObject, Scene, ShapesDataset, caption,
                               is_heldout, parse_caption, render)
from sdkit.data.transforms import (Degradation, DegradedPairs, gaussian_blur, resize_center_crop, to_pil,
                                   to_tensor)


# ------------------------------------------------------------------------------------------------ shapes
def test_shapes_deterministic_by_index_and_seed():
    a, b = ShapesDataset(100, seed=3), ShapesDataset(100, seed=3)
    for i in (0, 7, 99):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["meta"] == y["meta"]
    other_seed, val = ShapesDataset(100, seed=4), ShapesDataset(100, seed=3, split="validation")
    assert [a[i]["caption"] for i in range(10)] != [other_seed[i]["caption"] for i in range(10)]
    assert [a[i]["caption"] for i in range(10)] != [val[i]["caption"] for i in range(10)]
    with pytest.raises(IndexError):
        a[100]
    # The caption style changes the words only, not the picture.
    varied = ShapesDataset(100, seed=3, caption_style="varied")
    assert torch.equal(varied[7]["image"], a[7]["image"]) and varied[7]["meta"] == a[7]["meta"]


def test_known_captions_and_parse():
    scene = Scene((Group("blue", "square", 2, "small", "left"),))
    assert caption(scene) == "two small blue squares on the left"
    assert caption(Scene((Group("orange", "star"),))) == "an orange star"
    two = Scene((Group("red", "cross", 3, "small", "top"), Group("green", "heart", position="bottom")), "cream")
    assert caption(two) == "three small red crosses at the top and a green heart at the bottom on a cream background"
    assert parse_caption("A red circle.") == Scene((Group("red", "circle"),))
    assert parse_caption("a picture of 2 yellow triangles in the middle") == \
        Scene((Group("yellow", "triangle", 2, "medium", "center"),))
    assert parse_caption("an image of 3 small black stars in the middle on a white background") == \
        Scene((Group("black", "star", 3, "small", "center"),))
    with pytest.raises(ValueError, match="cannot read"):
        parse_caption("a violet circle")
    with pytest.raises(ValueError, match="only fit when they are small"):
        parse_caption("three large red circles")


@pytest.mark.parametrize("style", ["canonical", "varied"])
def test_caption_matches_metadata(style):
    ds = ShapesDataset(400, seed=1, caption_style=style)
    seen_colours, seen_shapes = set(), set()
    for i in range(len(ds)):
        scene, objects, text = ds.example(i)
        assert parse_caption(text) == scene, text
        counts = collections.Counter((o.colour, o.shape) for o in objects)
        assert counts == collections.Counter({(g.colour, g.shape): g.count for g in scene.groups})
        seen_colours |= {g.colour for g in scene.groups}
        seen_shapes |= {g.shape for g in scene.groups}
    assert seen_colours == set(COLOURS) and seen_shapes == set(SHAPES)


def test_render_sizes_and_colours():
    scene = Scene((Group("blue", "square", size="large"),), "light gray")
    obj = [PlacedObject("blue", "square", 0.5, 0.5, SIZES["large"])]
    for size in (16, 64, 100, 256):
        im = render(scene, size, objects=obj)
        assert im.size == (size, size) and im.mode == "RGB"
        px = np.asarray(im)
        assert tuple(px[size // 2, size // 2]) == COLOURS["blue"]      # inside the square
        assert tuple(px[1, 1]) == (228, 228, 228)                       # the light gray background
    item = ShapesDataset(5, size=32)[2]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert render("a red circle", 48, seed=5).size == (48, 48)


def test_validation_split_holds_out_combinations():
    train, val = ShapesDataset(600, split="train"), ShapesDataset(300, split="validation")
    train_groups = {g for i in range(len(train)) for g in train.example(i)[0].groups}
    val_groups = {g for i in range(len(val)) for g in val.example(i)[0].groups}
    assert not any(is_heldout(g) for g in train_groups) and all(is_heldout(g) for g in val_groups)
    assert train_groups.isdisjoint(val_groups) and len(val_groups) > 50
    # Every (colour, shape) pair keeps most of its combinations for training.
    for colour in COLOURS:
        for shape in SHAPES:
            combos = [Group(colour, shape, c, s, p) for c in (1, 2, 3) for s in SIZES
                      for p in ("left", "right", "top", "bottom", "center", None)
                      if not (c == 3 and s != "small") and not (c > 1 and s == "large" and p == "center")]
            assert len(combos) == 41 and sum(not is_heldout(g) for g in combos) >= 30


# ------------------------------------------------------------------------------------------------ checker
def _degrade_mildly(image, rng):
    """Blur (Pillow, radius up to 1 px) and Gaussian noise (std up to 3% of the range): what a decoder might leave."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1))), dtype=np.float64)
    noisy = blurred + rng.normal(0, 255 * 0.03 * rng.uniform(), blurred.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def test_checker_accuracy_on_own_renders():
    """A real measurement: 500 varied scenes (1-3 objects, every attribute), mildly blurred and noised."""
    ds = ShapesDataset(500, seed=11)
    rng = np.random.default_rng(0)
    right, rejected = collections.Counter(), collections.Counter()
    for i in range(len(ds)):
        scene, objects, _ = ds.example(i)
        comps = shapes_checker.find_objects(_degrade_mildly(render(scene, 64, objects=objects), rng))
        result = shapes_checker.compare(comps, scene)
        for k in ("colour", "shape", "colour_and_shape", "count", "position", "size"):
            right[k] += getattr(result, k)
        # Wrong specs: the first group's colour (or shape) swapped for one that is not in the picture.
        first = scene.groups[0]
        other_colour = rng.choice([c for c in COLOURS if c not in {x.colour for x in scene.groups}])
        other_shape = rng.choice([s for s in SHAPES if s not in {x.shape for x in scene.groups}])
        for what, wrong in (("colour", Group(str(other_colour), first.shape, first.count, first.size, first.position)),
                            ("shape", Group(first.colour, str(other_shape), first.count, first.size, first.position))):
            rejected[what] += not shapes_checker.compare(comps, Scene((wrong,) + scene.groups[1:])).colour_and_shape
    accuracy = {k: v / len(ds) for k, v in right.items()}
    rejection = {k: v / len(ds) for k, v in rejected.items()}
    print("checker accuracy", accuracy, "rejection", rejection)
    assert min(accuracy.values()) >= 0.98, accuracy
    assert min(rejection.values()) >= 0.98, rejection


def test_checker_on_blank_and_misplaced_images():
    blank = Image.new("RGB", (64, 64), "white")
    assert shapes_checker.find_objects(blank) == []
    assert not shapes_checker.check(blank, "a red circle").colour
    im = render("a large green heart on the left", 64, seed=0)
    assert shapes_checker.check(im, "a large green heart on the left").correct
    wrong_place = shapes_checker.check(im, "a large green heart on the right")
    assert wrong_place.colour_and_shape and not wrong_place.position
    assert not shapes_checker.check(im, "two large green hearts on the left").count
    assert not shapes_checker.check(im, "a small green heart on the left").size


# ------------------------------------------------------------------------------------------------ emoji
@pytest.mark.parametrize("style", ["twemoji", "openmoji"])
def test_emoji_counts_and_names(style):
    entries = list_emoji(style)
    assert len(entries) > 1500
    assert all(not emoji_mod.SKIN_TONES.intersection(e.emoji) for e in entries)
    assert len(list_emoji(style, include_skin_tones=True)) > len(entries) + 1000
    by_emoji = {e.emoji: e for e in entries}
    assert by_emoji["\U0001F600"].name == "grinning face" and by_emoji["\U0001F600"].codepoints == "1f600"
    assert by_emoji["\U0001F1EF\U0001F1F5"].name == "flag of Japan"
    assert by_emoji["\U0001F98A"].name == "fox"
    keys = [[ord(c) for c in e.emoji] for e in entries]
    assert keys == sorted(keys)


def test_emoji_captions():
    assert emoji_name("\U0001F600") == "grinning face"
    assert make_caption("grinning face", "twemoji") == "a grinning face, twemoji style"
    assert make_caption("angry face", "openmoji") == "an angry face, openmoji style"
    assert make_caption("fox", "twemoji", "{name} ({style})") == "fox (twemoji)"
    with pytest.raises(ValueError, match="unknown field"):
        make_caption("fox", "twemoji", "{nmae}")


@pytest.mark.parametrize("style,size", [("twemoji", 64), ("openmoji", 64), ("openmoji", 256)])
def test_emoji_render(style, size):
    im = render_emoji("\U0001F600", style, size)
    assert im.size == (size, size) and im.mode == "RGB"
    px = np.asarray(im).astype(int)
    assert tuple(px[0, 0]) == (255, 255, 255)                         # transparent corner -> white
    r, g, b = px[size // 4, size // 2]                                 # upper middle of the face: yellow
    assert r > 200 and g > 150 and b < 120


def test_emoji_dataset_cache_and_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("SDKIT_CACHE", str(tmp_path))
    ds = EmojiDataset("twemoji", size=32, split="all", limit=60)
    assert (tmp_path / "emoji-twemoji-32-first60" / "sdkit_build.json").exists()
    assert len(ds) == 60 and ds[0]["image"].shape == (3, 32, 32)
    first = [e.emoji for e in list_emoji("twemoji")[:60]]
    assert [ds[i]["meta"]["emoji"] for i in range(60)] == first
    assert ds[0]["caption"] == make_caption(emoji_name(first[0]), "twemoji")

    # Second load: from the cache, nothing re-rendered.
    def no_render(*args, **kwargs):
        raise AssertionError("re-rendered although the dataset was cached")
    monkeypatch.setattr(emoji_mod, "render_emoji", no_render)
    again = EmojiDataset("twemoji", size=32, split="all", limit=60)
    assert torch.equal(again[5]["image"], ds[5]["image"])
    train = EmojiDataset("twemoji", size=32, split="train", limit=60, validation_fraction=0.2)
    val = EmojiDataset("twemoji", size=32, split="validation", limit=60, validation_fraction=0.2)
    names_t = {train[i]["meta"]["name"] for i in range(len(train))}
    names_v = {val[i]["meta"]["name"] for i in range(len(val))}
    assert names_t.isdisjoint(names_v) and len(names_t) + len(names_v) == 60 and 3 <= len(names_v) <= 25
    hf = val.to_hf_dataset()
    assert hf["caption"] == [val[i]["caption"] for i in range(len(val))]
    assert hf[0]["image"].size == (32, 32)


def test_emoji_cache_dir_argument(tmp_path):
    ds = load_emoji_dataset("openmoji", 24, limit=5, cache_dir=tmp_path)
    assert len(ds) == 5 and (tmp_path / "emoji-openmoji-24-first5").is_dir()
    assert set(ds.column_names) == {"image", "emoji", "name", "codepoints", "style"}


# ------------------------------------------------------------------------------------------------ hf
def _tiny_hf(n=5):
    import datasets
    images = [Image.new("RGB", (20, 12), (10 * i, 100, 200)) for i in range(n)]
    return datasets.Dataset.from_dict({"img": images, "caption": [f"item {i}" for i in range(n)],
                                       "label": list(range(n))},
                                      features=datasets.Features({"img": datasets.Image(),
                                                                  "caption": datasets.Value("string"),
                                                                  "label": datasets.Value("int64")}))


def test_from_hf_columns_and_errors(tmp_path):
    import datasets
    hf = _tiny_hf()
    ds = ImageCaptionDataset.from_hf(hf, image_column="img", caption_column="caption", size=8)
    item = ds[3]
    assert item["caption"] == "item 3" and item["meta"] == {"label": 3} and item["image"].shape == (3, 8, 8)
    assert torch.allclose(item["image"][:, 4, 4], torch.tensor([30, 100, 200]) / 127.5 - 1, atol=1e-6)
    with pytest.raises(KeyError, match=r"no caption column 'text'.*\['img', 'caption', 'label'\]"):
        ImageCaptionDataset.from_hf(hf, image_column="img")
    with pytest.raises(KeyError, match="no split 'test'"):
        ImageCaptionDataset.from_hf(datasets.DatasetDict({"train": hf}), "img", "caption", split="test")
    hf.save_to_disk(str(tmp_path / "saved"))
    loaded = ImageCaptionDataset.from_hf(tmp_path / "saved", "img", "caption")
    assert loaded[1]["caption"] == "item 1" and loaded[1]["image"].shape == (3, 12, 20)


def test_imagefolder_round_trip(tmp_path):
    shapes = ShapesDataset(6, size=32, seed=2)
    save_imagefolder(shapes, tmp_path / "folder")
    back = ImageCaptionDataset.from_imagefolder(tmp_path / "folder")
    assert len(back) == 6
    for i in range(6):
        assert back[i]["caption"] == shapes[i]["caption"]
        assert torch.equal(back[i]["image"], shapes[i]["image"])    # PNG of uint8 pixels is lossless
    lines = (tmp_path / "folder" / "metadata.jsonl").read_text().splitlines()
    (tmp_path / "folder" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": json.loads(l)["file_name"], "prompt": "x"}) for l in lines))
    with pytest.raises(KeyError, match=r"no 'text' key.*\['file_name', 'prompt'\]"):
        ImageCaptionDataset.from_imagefolder(tmp_path / "folder")


def test_sharding_covers_each_item_once():
    rows = [{"image": np.full((4, 4, 3), i, np.uint8), "text": f"row {i}"} for i in range(23)]
    assert sorted(x for r in range(3) for x in shard(range(23), r, 3)) == list(range(23))
    seen = []
    for rank in range(2):
        ds = IterableImageCaptionDataset(rows, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_examples)
        for batch in loader:
            seen += batch["caption"]
            assert batch["image"].shape[1:] == (3, 4, 4)
    assert sorted(seen) == sorted(r["text"] for r in rows)           # every row exactly once
    with pytest.raises(ValueError, match="rank 2 is outside"):
        list(shard(range(3), 2, 2))


# ------------------------------------------------------------------------------------------------ transforms
def test_tensor_conversions():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 5, 7) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(np.asarray(to_pil(x)), arr)
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert torch.equal(to_tensor(rgba), torch.ones(3, 2, 2))         # transparent -> white
    assert resize_center_crop(Image.new("RGB", (90, 30)), 16).size == (16, 16)


def test_gaussian_blur_impulse_response():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1
    y = gaussian_blur(x, 1.0)
    k = torch.exp(-0.5 * torch.arange(-3, 4.0) ** 2)
    k = k / k.sum()
    assert torch.allclose(y[0, 0, 4:11, 4:11], torch.outer(k, k), atol=1e-7)
    assert torch.allclose(gaussian_blur(torch.full((1, 3, 8, 8), 0.3), 2.0), torch.full((1, 3, 8, 8), 0.3))


def test_degradation_deterministic_and_sizes():
    hr = ShapesDataset(3, size=64)[1]["image"]
    deg = Degradation(scale=4, blur_prob=1, noise_prob=1, jpeg_prob=1)
    a, pa = deg(hr, torch.Generator().manual_seed(5), return_params=True)
    b, pb = deg(hr, torch.Generator().manual_seed(5), return_params=True)
    c = deg(hr, 6)                                                     # an int seed works too
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and pa == pb and not torch.equal(a, c)
    assert pa["blur_sigma"] > 0 and pa["noise_std"] >= 0 and 40 <= pa["jpeg_quality"] <= 95
    assert deg(hr.unsqueeze(0).repeat(2, 1, 1, 1), torch.Generator().manual_seed(5)).shape == (2, 3, 16, 16)
    clean = Degradation(scale=2, blur_prob=0, noise_prob=0, jpeg_prob=0, downscale_modes=("area",))
    assert torch.allclose(clean(hr), torch.nn.functional.avg_pool2d(hr[None], 2)[0], atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by the scale"):
        deg(torch.zeros(3, 30, 30))
    pairs = DegradedPairs(ShapesDataset(4, size=64), deg, seed=1)
    p1, p2 = pairs[2], pairs[2]
    assert p1["lr_image"].shape == (3, 16, 16) and p1["image"].shape == (3, 64, 64)
    assert torch.equal(p1["lr_image"], p2["lr_image"]) and "degradation" in p1["meta"]
    batch = collate_examples([pairs[0], pairs[1]])
    assert batch["lr_image"].shape == (2, 3, 16, 16) and len(batch["caption"]) == 2
