"""The safety checker against diffusers' StableDiffusionSafetyChecker (random weights, same inputs), its
preprocessing against transformers' CLIP image processor, and the small checker's calibration on a stand-in CLIP."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdkit.nn.clip_vision import CLIPVisionConfig
from sdkit.safety import SafetyChecker, SafetyCheckerError, SmallSafetyChecker, heavy_blur, run_safety_checker

diffusers_sc = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")
from transformers import CLIPConfig  # noqa: E402

try:  # transformers 5 without torchvision: the PIL processor, which is what SD v1's scripts ran
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor

SMALL_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=224, patch_size=14)
VIT_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14)


def reference_checker(vision: dict, projection_dim: int, seed: int = 0, spread: bool = True):
    """diffusers' checker with random weights; `spread` widens the init so images embed less alike."""
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)  # unused
    config = CLIPConfig(vision_config=vision, projection_dim=projection_dim, text_config=text)
    ref = diffusers_sc.StableDiffusionSafetyChecker(config).eval()
    if spread:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.normal_(1, 0.1)
                elif not name.startswith(("concept", "special")):
                    p.normal_(0, 0.1)
    return ref


def ours_from(ref, vision: dict, projection_dim: int) -> SafetyChecker:
    ours = SafetyChecker(CLIPVisionConfig(**vision), projection_dim=projection_dim).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def images(n: int, size=(256, 256), seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields plus noise: float [n, 3, H, W] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    return (smooth + 0.1 * torch.randn(n, 3, *size, generator=g)).clamp(0, 1)


def set_concepts(ref, embeds: torch.Tensor, plain: int | None = 1, special: int = 2, rounding: int = 0) -> None:
    """Concepts and thresholds built from the images' embeddings so that image `plain` hits concept 0 plainly;
    image `special` hits special concept 0 and, through the 0.01 adjustment, concept 1, whose score would be
    -0.005 without it; image `rounding` scores +0.0004 on concept 3, which rounds to 0: no hit. The other
    concepts are random directions with thresholds no image reaches."""
    e = F.normalize(embeds.float())
    off = e @ e.T - 2 * torch.eye(len(e))  # similarities to the other images
    g = torch.Generator().manual_seed(1)
    dim = e.shape[1]
    concepts, thresholds = torch.randn(17, dim, generator=g), torch.full((17,), 0.6)
    specials, special_thr = torch.randn(3, dim, generator=g), torch.full((3,), 0.6)
    if plain is not None:
        concepts[0], thresholds[0] = e[plain], (1 + off[:, plain].max()) / 2
    specials[0], special_thr[0] = e[special], (1 + off[:, special].max()) / 2
    concepts[1], thresholds[1] = e[special], (e[special] @ e[special]) + 0.005
    concepts[3], thresholds[3] = e[rounding], (e[rounding] @ e[rounding]) - 0.0004
    assert off[:, rounding].max() < thresholds[3] - 0.001, "test images embed too alike for the rounding case"
    with torch.no_grad():
        ref.concept_embeds.copy_(concepts)
        ref.concept_embeds_weights.copy_(thresholds)
        ref.special_care_embeds.copy_(specials)
        ref.special_care_embeds_weights.copy_(special_thr)


def diffusers_run(ref, clip_input: torch.Tensor, imgs):
    """diffusers' forward -> (images, flags, concept scores, special scores, image embeddings); the scores and
    embeddings are locals of its forward, read from its frame as it returns."""
    captured = {}

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "forward" and "has_nsfw_concepts" in frame.f_locals:
            captured.update(frame.f_locals)

    sys.setprofile(profiler)
    try:
        out, flags = ref(clip_input=clip_input, images=imgs)
    finally:
        sys.setprofile(None)
    result = captured["result"]
    scores = torch.tensor([[r["concept_scores"][c] for c in range(len(r["concept_scores"]))] for r in result])
    special = torch.tensor([[r["special_scores"][c] for c in range(len(r["special_scores"]))] for r in result])
    return out, [bool(f) for f in flags], scores.float(), special.float(), captured["image_embeds"]


def unrounded_scores(ref, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SD v1's rule before rounding, in float64: cosine - threshold, plus 0.01 once the image hit a special-care
    concept (a rounded special score > 0): on the special concepts after the first hit, and on every concept."""
    e = F.normalize(image_embeds.double())
    special = e @ F.normalize(ref.special_care_embeds.double()).T - ref.special_care_embeds_weights.double()
    hit = special.round(decimals=3) > 0
    special = special + 0.01 * ((hit.cumsum(dim=1) - hit.long()) > 0)  # a hit before this concept
    adjustment = 0.01 * hit.any(dim=1, keepdim=True)
    concept = e @ F.normalize(ref.concept_embeds.double()).T - ref.concept_embeds_weights.double() + adjustment
    return concept, special


def assert_rounded_scores_match(ours: torch.Tensor, ref: torch.Tensor, unrounded: torch.Tensor,
                                near: float = 1e-5) -> None:
    """Both sides round the scores to 3 decimals. Their unrounded scores differ by float error (the image
    embeddings by up to ~1e-6 relative after a ViT, dot products summed in another order), so a score that
    falls within `near` of a rounding boundary may land one step apart on some CPU. Everywhere else the rounded
    scores must be equal; a wrong rounding rule or a missing 0.01 adjustment breaks scores far from boundaries."""
    assert bool(((ref.double() - unrounded).abs() <= 5e-4 + 1e-5).all()), "the unrounded scores do not model ref"
    differ = (ours.double() - ref.double()).abs() > 1e-6
    at_boundary = ((unrounded * 1000 - (unrounded * 1000).floor() - 0.5).abs() < near * 1000)
    assert bool((~differ | at_boundary).all()), f"rounded scores differ away from a rounding boundary: {differ.sum()}"
    assert bool((((ours.double() - ref.double()).abs()[differ] - 1e-3).abs() < 1e-6).all()), "more than one step"


def pil_inputs(x: torch.Tensor) -> list[Image.Image]:
    """What SD v1's txt2img handed the feature extractor: uint8 PIL images, (x * 255).round()."""
    return [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in x]


# --------------------------------------------------------------------------------------------- parity


def test_rule_matches_diffusers_constructed_hits():
    ref = reference_checker(SMALL_VISION, 32)
    ours = ours_from(ref, SMALL_VISION, 32)
    x = images(4)
    pixels = ours.preprocess(x)
    with torch.no_grad():
        set_concepts(ref, ours(pixels))
    ours.load_state_dict(ref.state_dict(), strict=True)

    _, ref_flags, ref_scores, ref_special, ref_embeds = diffusers_run(ref, pixels, x.clone())
    result = ours.check(x)
    assert ref_flags == [False, True, True, False]
    assert result.nsfw == ref_flags
    concept, special = unrounded_scores(ref, ref_embeds)
    assert_rounded_scores_match(result.scores, ref_scores, concept)
    assert_rounded_scores_match(result.special_scores, ref_special, special)
    assert result.bad_concepts[1] == [0] and result.bad_concepts[2] == [1] and result.special_care[2] == [0]
    assert result.scores[0, 3] == 0 and result.scores[2, 1] == pytest.approx(0.005, abs=1e-6)


def test_rule_matches_diffusers_many_scores():
    """Random concepts near the images' embeddings: hundreds of scores on both sides of zero, all equal."""
    ref = reference_checker(SMALL_VISION, 32, seed=1)
    ours = ours_from(ref, SMALL_VISION, 32)
    x = images(12, size=(224, 224), seed=3)
    pixels = ours.preprocess(x)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        e = F.normalize(ours(pixels))
        ref.concept_embeds.copy_(e[torch.randint(0, 12, (17,), generator=g)] + 0.1 * torch.randn(17, 32, generator=g))
        ref.special_care_embeds.copy_(e[:3] + 0.2 * torch.randn(3, 32, generator=g))
        cos = e @ F.normalize(ref.concept_embeds).T
        levels = torch.rand(17, generator=g) * 0.15 + 0.85  # each concept hits about 1 image in 13
        ref.concept_embeds_weights.copy_(torch.quantile(cos, levels, dim=0).diagonal())
        ref.special_care_embeds_weights.copy_(torch.tensor([0.9, 0.95, 0.97]))
    ours.load_state_dict(ref.state_dict(), strict=True)
    _, ref_flags, ref_scores, ref_special, ref_embeds = diffusers_run(ref, pixels, x.clone())
    result = ours.check(x)
    assert 0 < sum(ref_flags) < 12, "the case should have both flagged and clean images"
    assert result.nsfw == ref_flags
    concept, special = unrounded_scores(ref, ref_embeds)
    assert_rounded_scores_match(result.scores, ref_scores, concept)
    assert_rounded_scores_match(result.special_scores, ref_special, special)


def test_tower_and_state_dict_layouts():
    ref = reference_checker(SMALL_VISION, 32, spread=False)
    ours = ours_from(ref, SMALL_VISION, 32)
    pixels = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = ref.visual_projection(ref.vision_model(pixels)[1])
        assert (ours(pixels) - expected).abs().max() < 1e-5

    # Our keys are the official file's (transformers 4.x layout): the reference keys with the inner
    # `vision_model.` level and the persistent position_ids. diffusers loads that layout with nothing missing.
    ref_keys = set(ref.state_dict())
    official = {k.replace("vision_model.", "vision_model.vision_model.", 1) for k in ref_keys}
    official.add("vision_model.vision_model.embeddings.position_ids")
    assert set(ours.state_dict()) == official
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith("vision_model")} == {
        "concept_embeds": (17, 32), "special_care_embeds": (3, 32), "concept_embeds_weights": (17,),
        "special_care_embeds_weights": (3,), "visual_projection.weight": (32, 64)}


def test_from_pretrained_both_layouts(tmp_path):
    from safetensors.torch import save_file

    ref = reference_checker(SMALL_VISION, 32, spread=False)
    ref.save_pretrained(tmp_path / "new")  # transformers 5 layout (vision_model.embeddings...)
    ours = SafetyChecker.from_pretrained(tmp_path / "new")
    assert ours.vision_model.config == CLIPVisionConfig(**SMALL_VISION)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref.visual_projection(ref.vision_model(pixels)[1])
        assert (ours(pixels) - expected).abs().max() < 1e-5

    # Official layout (as our state_dict writes it), as pytorch_model.bin inside a pipeline's safety_checker/.
    (tmp_path / "pipe" / "safety_checker").mkdir(parents=True)
    torch.save(ours.state_dict(), tmp_path / "pipe" / "safety_checker" / "pytorch_model.bin")
    (tmp_path / "pipe" / "safety_checker" / "config.json").write_text(
        json.dumps({"projection_dim": 32, "vision_config": {"num_attention_heads": 4}}))
    again = SafetyChecker.from_pretrained(tmp_path / "pipe")
    with torch.no_grad():
        assert torch.equal(again(pixels), ours(pixels))

    # ... which diffusers reads as it reads the official weights, with no key left over or missing.
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "new" / "model.safetensors"))
    reloaded, info = diffusers_sc.StableDiffusionSafetyChecker.from_pretrained(tmp_path / "new",
                                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (reloaded.visual_projection(reloaded.vision_model(pixels)[1]) - expected).abs().max() < 1e-5


def test_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(SafetyCheckerError, match="never downloads.*safety_checker=None"):
        SafetyChecker.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(SafetyCheckerError, match="No safety-checker weights in"):
        SafetyChecker.from_pretrained(tmp_path)


@pytest.mark.parametrize("size", [(512, 512), (64, 64), (200, 300), (300, 200), (225, 224)])
def test_preprocessing_matches_clip_image_processor(size):
    x = images(2, size=size, seed=5)
    expected = torch.as_tensor(np.asarray(CLIPImageProcessor(size=224, crop_size=224)(
        pil_inputs(x), return_tensors="np")["pixel_values"]))
    ours = SafetyChecker(CLIPVisionConfig(**SMALL_VISION), projection_dim=32).preprocess(x)
    assert ours.shape == expected.shape == (2, 3, 224, 224)
    diff = (ours - expected).abs()
    # Pillow resamples in fixed point: a few pixels differ by one level of 255, hardly any by two.
    level = 1 / 255 / torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    assert (diff <= 2 * level + 1e-5).all()
    assert (diff > level + 1e-5).float().mean() < 1e-4 and (diff > 1e-5).float().mean() < 0.01


def test_end_to_end_flags_match_diffusers_pipeline_path():
    """Ours on float images vs diffusers on CLIPImageProcessor(PIL images): same flags, scores within 0.001."""
    ref = reference_checker(SMALL_VISION, 32, seed=2)
    x = images(4, size=(320, 256), seed=7)
    clip_input = torch.as_tensor(np.asarray(CLIPImageProcessor(size=224, crop_size=224)(
        pil_inputs(x), return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        set_concepts(ref, ref.visual_projection(ref.vision_model(clip_input)[1]))
    ours = ours_from(ref, SMALL_VISION, 32)
    numpy_images = x.permute(0, 2, 3, 1).numpy().copy()  # txt2img's layout: float HWC
    out, ref_flags, ref_scores, _, _ = diffusers_run(ref, clip_input, numpy_images.copy())
    result = ours.check(numpy_images)
    assert result.nsfw == ref_flags and sum(ref_flags) == 2
    # Constructed scores sit 0.0004-0.005 from zero; a 1/255 resampling difference moves them by far less.
    assert (result.scores - ref_scores).abs().max() <= 1e-3
    assert np.array_equal(result.images, out)  # both black out the flagged ones


# ------------------------------------------------------------------------------------ placeholder, switch


def flagged_checker() -> tuple[SafetyChecker, torch.Tensor]:
    ref = reference_checker(SMALL_VISION, 32, seed=4)
    ours = ours_from(ref, SMALL_VISION, 32)
    x = images(4, size=(64, 64), seed=9)
    with torch.no_grad():
        set_concepts(ref, ours(ours.preprocess(x)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, x


def test_placeholders_and_input_forms():
    checker, x = flagged_checker()
    original = x.clone()
    black = checker.check(x)
    assert black.nsfw == [False, True, True, False]
    assert torch.equal(x, original), "the input must not be modified in place"
    assert torch.equal(black.images[1], torch.zeros(3, 64, 64)) and torch.equal(black.images[0], x[0])

    blurred = checker.check(x, placeholder="blur").images
    assert torch.equal(blurred[3], x[3])
    def detail(img):  # mean high-pass magnitude: the image minus its 3x3 local mean
        return (img - F.avg_pool2d(img[None], 3, 1, 1, count_include_pad=False)[0]).abs().mean()

    assert detail(blurred[1]) < 0.05 * detail(x[1])  # no detail survives
    assert (blurred[1].mean((1, 2)) - x[1].mean((1, 2))).abs().max() < 0.02  # the colours do
    assert torch.equal(heavy_blur(x[1]), blurred[1])

    pils = [Image.fromarray(a) for a in (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]
    result = checker.check(pils)
    assert result.nsfw == black.nsfw and all(isinstance(im, Image.Image) for im in result.images)
    assert np.asarray(result.images[2]).max() == 0 and np.array_equal(np.asarray(result.images[0]), np.asarray(pils[0]))
    uint8 = np.stack([np.asarray(p) for p in pils])
    result = checker.check(uint8)
    assert result.images.dtype == np.uint8 and result.images.shape == uint8.shape and result.images[1].max() == 0

    with pytest.raises(ValueError, match="placeholder='joke'"):
        checker.check(x, placeholder="joke")
    with pytest.raises(ValueError, match="NaN"):
        checker.check(torch.full((1, 3, 8, 8), float("nan")))


@pytest.mark.parametrize("off", [None, False])
def test_switched_off(off):
    x = images(2, size=(32, 32))
    result = run_safety_checker(off, x)
    assert result.images is x and result.nsfw == [False, False] and not result.checked and result.scores is None
    checker, y = flagged_checker()
    assert run_safety_checker(checker, y).nsfw == [False, True, True, False]


@pytest.mark.slow
def test_full_size_vit_l14_parity():
    """CLIP ViT-L/14 with random weights: strict load of diffusers' state dict, same embeddings, scores, flags."""
    ref = reference_checker(VIT_L_14, 768, spread=False)
    with torch.device("meta"):
        ours = SafetyChecker()  # the defaults are SD's: ViT-L/14, 768-dim projection, 17 + 3 concepts
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    assert ours.concept_embeds.shape == (17, 768) and ours.special_care_embeds.shape == (3, 768)
    assert sum(p.numel() for p in ours.vision_model.parameters()) == 303_179_776
    x = images(2, size=(256, 256), seed=11)
    pixels = ours.preprocess(x)
    with torch.no_grad():
        embeds = ours(pixels)
        set_concepts(ref, embeds, plain=None, special=0, rounding=1)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("vision")}, strict=False)
    _, ref_flags, ref_scores, ref_special, ref_embeds = diffusers_run(ref, pixels, x.clone())
    result = ours.check(x)
    print(f"ViT-L/14 embedding max abs diff {(embeds - ref_embeds).abs().max():.2e}")
    assert (embeds - ref_embeds).abs().max() < 1e-4
    assert ref_flags == [True, False] and result.nsfw == ref_flags  # via special care; rounded to 0
    concept, special = unrounded_scores(ref, ref_embeds)
    assert_rounded_scores_match(result.scores, ref_scores, concept)
    assert_rounded_scores_match(result.special_scores, ref_special, special)


# ------------------------------------------------------------------------------ the small-scale checker

PALETTE = {"red": (215, 30, 35), "orange": (240, 125, 25), "yellow": (240, 215, 45), "green": (45, 160, 60),
           "teal": (30, 150, 150), "blue": (45, 80, 215), "purple": (140, 55, 180), "pink": (240, 125, 190)}
BACKGROUNDS = ((255, 255, 255), (230, 230, 230), (250, 243, 222), (222, 235, 250))


class ColourCLIP:
    """A stand-in for the kit's small CLIP (not trained yet): image embedding = soft colour histogram over
    the palette plus "background"; text embedding = the palette colour named in the prompt."""

    names = ["background", *PALETTE]
    colours = torch.tensor([(242, 240, 240), *PALETTE.values()], dtype=torch.float32)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3) * 255
        weights = torch.softmax(-torch.cdist(pixels, self.colours[None].expand(len(images), -1, -1)) ** 2
                                / (2 * 45.0**2), dim=-1)
        return weights.mean(dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), len(self.names))
        for i, text in enumerate(texts):
            hits = [j for j, name in enumerate(self.names) if name in text.split()]
            assert hits, f"the stand-in CLIP knows no colour in {text!r}"
            out[i, hits] = 1.0
        return out


def scenes(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, list[set[str]]]:
    """Images with 1-3 discs/squares of random palette colours (jittered) on light backgrounds, and the
    colours each contains. Small objects of a flagged colour and large ones of its neighbours make it hard."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out, labels = [], []
    for _ in range(n):
        img = np.empty((size, size, 3))
        img[:] = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        present = set()
        for _ in range(rng.integers(1, 4)):
            name = rng.choice(list(PALETTE))
            colour = np.clip(np.array(PALETTE[name]) + rng.normal(0, 18, 3), 0, 255)
            cx, cy, r = rng.uniform(4, size - 4), rng.uniform(4, size - 4), rng.uniform(1.5, 8)
            mask = (np.hypot(xx - cx, yy - cy) < r) if rng.random() < 0.5 else \
                ((abs(xx - cx) < r) & (abs(yy - cy) < r))
            if mask.sum() >= 4:
                img[mask] = colour
                present.add(str(name))
        img += rng.normal(0, 6, img.shape)
        out.append(torch.from_numpy(np.clip(img, 0, 255) / 255).permute(2, 0, 1).float())
        labels.append(present)
    return torch.stack(out), labels


def test_small_checker_rule_closed_form():
    clip = ColourCLIP()
    checker = SmallSafetyChecker.from_clip(clip, ["a red object", "a blue object"], thresholds=[0.5, 0.5])
    red = torch.tensor([215, 30, 35]).view(3, 1, 1).expand(3, 8, 8) / 255
    hist = clip.encode_image(red[None])[0]
    expected = round(float(hist[1] / hist.norm()) - 0.5, 3)  # cosine with the one-hot "red" direction
    result = checker.check(red[None])
    assert result.scores[0, 0].item() == pytest.approx(expected, abs=1e-6) and result.nsfw == [expected > 0]
    assert result.concept_names == ["a red object", "a blue object"]
    uncalibrated = SmallSafetyChecker.from_clip(clip, ["a red object"])
    with pytest.raises(RuntimeError, match="call calibrate"):
        uncalibrated.check(red[None])


def test_small_checker_calibration_on_held_out_images():
    concepts = {"red": "a photo of something red", "blue": "a blue object"}
    checker = SmallSafetyChecker.from_clip(ColourCLIP(), list(concepts.values()))
    to_labels = lambda sets: [[concepts[c] for c in s if c in concepts] or None for s in sets]  # noqa: E731

    calib_x, calib_sets = scenes(240, seed=0)
    reports = checker.calibrate(calib_x, to_labels(calib_sets), target_precision=0.9)
    test_x, test_sets = scenes(240, seed=1)  # held out: never seen by calibrate
    result = checker.check(test_x)

    lines = []
    for c, (colour, prompt) in enumerate(concepts.items()):
        truth = torch.tensor([colour in s for s in test_sets])
        fired = result.scores[:, c] > 0
        tp = int((fired & truth).sum())
        precision, recall = tp / max(int(fired.sum()), 1), tp / int(truth.sum())
        lines.append(f"{prompt!r}: threshold {reports[c].threshold:.3f}, calibration P {reports[c].precision:.2f} "
                     f"R {reports[c].recall:.2f}; held-out P {precision:.2f} R {recall:.2f} "
                     f"({int(truth.sum())} positives)")
        assert reports[c].precision >= 0.9
        assert precision >= 0.8 and recall >= 0.5, lines[-1]
        # the threshold lies between the typical negative and positive similarities
        sims = result.distances[:, c]
        assert sims[~truth].median() < reports[c].threshold < sims[truth].median()
    any_truth = torch.tensor([bool(s & set(concepts)) for s in test_sets])
    tp = int((torch.tensor(result.nsfw) & any_truth).sum())
    overall = (tp / max(sum(result.nsfw), 1), tp / int(any_truth.sum()))
    lines.append(f"any flagged concept: held-out P {overall[0]:.2f} R {overall[1]:.2f}")
    print("\n" + "\n".join(lines))
    report = checker.evaluate(test_x, to_labels(test_sets))
    assert (report["any"]["precision"], report["any"]["recall"]) == pytest.approx(overall)
    with pytest.raises(ValueError, match="needs images with and without"):
        checker.calibrate(calib_x, [None] * len(calib_x))


def test_small_checker_gives_the_kit_small_clip_its_input_range():
    """Checker images are in [0, 1]; the kit's SmallCLIP takes [-1, 1] (its `image_range`): the checker rescales."""
    from sdkit.training.clip import SmallCLIP

    torch.manual_seed(0)
    clip = SmallCLIP(embed_dim=16, vision={"width": 8, "channel_mult": [1, 2], "blocks": 1}).eval()
    images = torch.rand(3, 3, 64, 64)
    checker = SmallSafetyChecker.from_clip(clip, ["a red heart", "a flag"], thresholds=[0.0, 0.0])
    result = checker.check(images)
    with torch.no_grad():
        expected = clip.encode_image(images * 2 - 1) @ clip.encode_text(["a red heart", "a flag"]).T
    assert torch.allclose(result.distances, expected, atol=1e-5)
