"""The Stable Diffusion safety checker, and the same mechanism on a small CLIP with your own concepts.

SD v1's `scripts/txt2img.py` screened every image with `CompVis/stable-diffusion-safety-checker`: a CLIP ViT-L/14
image embedding is compared (cosine similarity) with 17 fixed "concept" embeddings and 3 "special care" ones,
each with its own threshold. The rule, as in diffusers' `StableDiffusionSafetyChecker.forward`:

    special_score[k] = round(cos(image, special[k]) - special_threshold[k] + adjustment, 3)
                       adjustment starts at 0.0 and becomes 0.01 once a special concept scores > 0
    concept_score[c] = round(cos(image, concept[c]) - concept_threshold[c] + adjustment, 3)
    nsfw             = any(concept_score > 0)

so a special-care hit lowers every concept threshold by 0.01. (The thresholds are stored as
`concept_embeds_weights` / `special_care_embeds_weights`: the names are the checkpoint's, the values are thresholds.)

    checker = SafetyChecker.from_pretrained("stable-diffusion-v1-5/safety_checker")   # a local folder; no download
    result = checker.check(images)            # float [B, 3, H, W] in [0, 1], or PIL / numpy images
    result.nsfw, result.scores, result.images  # flags, concept scores [B, 17], images with flagged ones blacked out

Flagged images become a neutral placeholder: black (the default, as diffusers does) or `placeholder="blur"`,
a heavy blur. The original script showed a photo of Rick Astley instead; sdkit never substitutes a picture.
Pipelines switch the checker off with `safety_checker=None` (see `run_safety_checker`).

The small-scale checker, `SmallSafetyChecker.from_clip(clip, ["a photo of ..."])`, applies the same rule with
the concept embeddings taken from the text tower of a (small) CLIP and thresholds calibrated on labelled data.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .nn.clip_vision import CLIPVisionConfig, CLIPVisionModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_CARE_ADJUSTMENT = 0.01  # how much a special-care hit lowers every concept threshold
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class SafetyCheckerError(ValueError):
    """Safety-checker weights that are missing or do not fit; the message says what to do."""


# ----------------------------------------------------------------------------------------------------- images


def _to_chw(image: Any) -> torch.Tensor:
    """One image (PIL, numpy HWC, tensor CHW; uint8 or float in [0, 1]) -> float32 [3, H, W] in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"A numpy image must be [H, W, 3] (RGB), got shape {image.shape}.")
        image = torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1)  # a copy: arrays may be read-only
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"Expected PIL images, numpy arrays or tensors, got {type(image).__name__}.")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"A tensor image must be [3, H, W] (RGB), got shape {tuple(image.shape)}.")
    x = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    if not torch.isfinite(x).all():
        raise ValueError("An image contains NaN or inf values; the safety checker needs finite pixels in [0, 1].")
    return x.clamp(0, 1)


def _like(original: Any, chw: torch.Tensor) -> Any:
    """Turn a float [3, H, W] image back into the type, layout and dtype of `original`."""
    if isinstance(original, Image.Image):
        return Image.fromarray((chw.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
    if isinstance(original, np.ndarray):
        hwc = chw.permute(1, 2, 0).cpu().numpy()
        return (hwc * 255).round().astype(np.uint8) if original.dtype == np.uint8 else hwc.astype(original.dtype)
    if original.dtype == torch.uint8:
        return (chw * 255).round().to(torch.uint8, copy=True).to(original.device)
    return chw.to(original.device, original.dtype)


def _split(images: Any) -> tuple[list, Any]:
    """Images in any accepted form -> (list of single images, function that rebuilds the original form)."""
    if isinstance(images, Image.Image) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3):
        return [images], lambda items: items[0]
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images), lambda items: torch.stack(items)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), lambda items: np.stack(items)
    if isinstance(images, (list, tuple)):
        return list(images), list
    raise TypeError("Pass images as a float tensor [B, 3, H, W] in [0, 1], a numpy array [B, H, W, 3], "
                    f"a PIL image, or a list of them; got {type(images).__name__}.")


def heavy_blur(chw: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """Down to `grid` pixels on the long side and back up: colours survive as blobs, no detail does."""
    h, w = chw.shape[-2:]
    small = (max(1, round(grid * h / max(h, w))), max(1, round(grid * w / max(h, w))))
    x = F.interpolate(chw[None], size=small, mode="area")
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def placeholder_for(chw: torch.Tensor, mode: str) -> torch.Tensor:
    """The neutral replacement of a flagged image: "black" (all zeros) or "blur" (`heavy_blur`)."""
    if mode == "black":
        return torch.zeros_like(chw)
    if mode == "blur":
        return heavy_blur(chw)
    raise ValueError(f"placeholder={mode!r}: use 'black' or 'blur'.")


def clip_preprocess(images: Sequence[torch.Tensor], size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIPImageProcessor (as configured for the safety checker) in torch: float [3, H, W] images -> [B, 3, size, size].

    Same steps as the reference, which received uint8 PIL images: quantise to uint8, resize the short side to
    `size` with antialiased bicubic (int() for the long side), centre-crop, rescale to [0, 1], normalise. The
    resize runs as Pillow's does: a horizontal pass, then a vertical one, each rounded and clipped to 0..255
    (without the clipping, bicubic overshoot alone moves noisy pixels by up to 19 levels). The result differs
    from Pillow's fixed-point arithmetic by one level in under 0.1% of pixels.
    """
    out = []
    for chw in images:
        h, w = chw.shape[-2:]
        new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
        pixels = (chw.clamp(0, 1) * 255).round()[None]
        for target in ((h, new_w), (new_h, new_w)):
            pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.round().clamp(0, 255)
        resized = pixels[0]
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out.append(resized[:, top:top + size, left:left + size] / 255)
    x = torch.stack(out)
    mean, std = torch.tensor(mean, device=x.device), torch.tensor(std, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


# ---------------------------------------------------------------------------------------------- the rule


@dataclasses.dataclass
class SafetyResult:
    """What a check found. `scores` > 0 is a hit (after rounding to 3 decimals, as the reference does)."""

    images: Any  # the input, same form, with flagged images replaced by the placeholder
    nsfw: list[bool]  # one flag per image
    scores: torch.Tensor | None  # [B, n_concepts] concept scores; None when the checker was off
    special_scores: torch.Tensor | None = None  # [B, n_special]
    distances: torch.Tensor | None = None  # [B, n_concepts] raw cosine similarities (before thresholds)
    concept_names: list[str] | None = None  # for checkers whose concepts have names (SmallSafetyChecker)
    checked: bool = True  # False when the checker was switched off

    @property
    def bad_concepts(self) -> list[list[int]]:
        """Indices of the concepts that fired, per image (diffusers' `bad_concepts`)."""
        if self.scores is None:
            return [[] for _ in self.nsfw]
        return [torch.nonzero(row > 0).flatten().tolist() for row in self.scores]

    @property
    def special_care(self) -> list[list[int]]:
        """Indices of the special-care concepts that fired, per image."""
        if self.special_scores is None:
            return [[] for _ in self.nsfw]
        return [torch.nonzero(row > 0).flatten().tolist() for row in self.special_scores]


def cosine_similarity_matrix(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> torch.Tensor:
    """[B, D] x [C, D] -> [B, C] cosine similarities (called "cosine distance" in diffusers), in float32."""
    return F.normalize(image_embeds.float()) @ F.normalize(concept_embeds.float()).T


def concept_scores(distances: torch.Tensor, thresholds: torch.Tensor, special_distances: torch.Tensor,
                   special_thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SD safety rule on cosine similarities -> (concept scores [B, C], special scores [B, S], nsfw [B]).

    Special concepts are scored in order and, as in diffusers' loop, the 0.01 adjustment already applies to the
    special concepts after the first one that fired (it changes reported special scores, never a flag).
    """
    adjustment = torch.zeros(distances.shape[0], device=distances.device)
    special_scores = torch.empty_like(special_distances)
    for k in range(special_distances.shape[1]):
        raw = special_distances[:, k] - special_thresholds[k].float() + adjustment
        special_scores[:, k] = torch.round(raw, decimals=3)
        adjustment = torch.where(special_scores[:, k] > 0, SPECIAL_CARE_ADJUSTMENT, adjustment)
    scores = torch.round(distances - thresholds.float() + adjustment[:, None], decimals=3)
    return scores, special_scores, (scores > 0).any(dim=1)


class ConceptChecker(nn.Module):
    """Concept embeddings + thresholds + the SD rule; subclasses say how an image becomes an embedding."""

    concept_names: list[str] | None = None

    def __init__(self, projection_dim: int = 768, n_concepts: int = 17, n_special: int = 3):
        super().__init__()
        # Parameters without gradients, as in diffusers, so named_parameters() and the key set match it.
        self.concept_embeds = nn.Parameter(torch.ones(n_concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(n_special, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(n_concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(n_special), requires_grad=False)

    def embed(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Float [3, H, W] images in [0, 1] -> image embeddings [B, projection_dim]."""
        raise NotImplementedError

    @torch.no_grad()
    def check(self, images: Any, placeholder: str = "black") -> SafetyResult:
        """Score the images; flagged ones are replaced by `placeholder` ("black" or "blur") in `result.images`."""
        placeholder_for(torch.zeros(3, 1, 1), placeholder)  # reject a bad mode before the expensive part
        items, rebuild = _split(images)
        chws = [_to_chw(item) for item in items]
        embeds = self.embed(chws)
        dist = cosine_similarity_matrix(embeds, self.concept_embeds)
        special = cosine_similarity_matrix(embeds, self.special_care_embeds)
        scores, special_scores, nsfw = concept_scores(dist, self.concept_embeds_weights, special,
                                                      self.special_care_embeds_weights)
        flags = nsfw.tolist()
        out = [_like(item, placeholder_for(chw, placeholder)) if flag else _copy(item)
               for item, chw, flag in zip(items, chws, flags)]
        return SafetyResult(rebuild(out), flags, scores.cpu(), special_scores.cpu(), dist.cpu(), self.concept_names)


def _copy(image: Any) -> Any:
    return image.copy() if isinstance(image, (Image.Image, np.ndarray)) else image.clone()


def run_safety_checker(checker: ConceptChecker | None | bool, images: Any, placeholder: str = "black") -> SafetyResult:
    """What pipelines call: `checker=None` or `False` switches the check off (images pass through, unflagged)."""
    if checker is None or checker is False:
        n = len(_split(images)[0])
        return SafetyResult(images, [False] * n, None, checked=False)
    if not isinstance(checker, ConceptChecker):
        raise TypeError(f"safety_checker must be a SafetyChecker, None or False; got {type(checker).__name__}.")
    return checker.check(images, placeholder=placeholder)


# ------------------------------------------------------------------------------------- the SD safety checker


class SafetyChecker(ConceptChecker):
    """SD v1's safety checker: CLIP vision tower -> `visual_projection` -> the concept rule.

    State-dict keys are those of the official weights (`vision_model.vision_model.*`, `visual_projection.weight`,
    `concept_embeds`, ...); files saved by diffusers on transformers 5 (`vision_model.*`) load too.
    """

    def __init__(self, vision_config: CLIPVisionConfig | None = None, projection_dim: int = 768,
                 n_concepts: int = 17, n_special: int = 3):
        super().__init__(projection_dim, n_concepts, n_special)
        self.vision_model = CLIPVisionModel(vision_config or CLIPVisionConfig())
        self.visual_projection = nn.Linear(self.vision_model.config.hidden_size, projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels [B, 3, 224, 224] -> projected image embeddings [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images in any accepted form -> the pixel values the vision tower takes (see `clip_preprocess`)."""
        items, _ = _split(images)
        device = self.visual_projection.weight.device
        return clip_preprocess([_to_chw(item).to(device) for item in items], self.vision_model.config.image_size)

    def embed(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self(self.preprocess(images))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "SafetyChecker":
        """Load official weights from a local diffusers-layout folder (`config.json` + `model.safetensors` or
        `pytorch_model.bin`), from a pipeline folder with a `safety_checker/` subfolder, or from a weights file.

        The architecture is read from the weights' shapes; config.json only supplies what shapes cannot tell
        (attention heads, activation, LayerNorm eps). Nothing is downloaded.
        """
        weights_file, config = _find_weights(Path(path))
        state = _read_state_dict(weights_file)
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            checker = cls(*_architecture(state, config))
        try:
            checker.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise SafetyCheckerError(f"{weights_file} does not fit the SD safety checker: {e}") from None
        return checker.to(device=device, dtype=dtype).eval()


def _find_weights(path: Path) -> tuple[Path, dict]:
    hint = ("Download the folder `safety_checker/` of an SD v1 diffusers repository (or "
            "CompVis/stable-diffusion-safety-checker) yourself and pass its path; sdkit never downloads. "
            "To run without the checker, pass safety_checker=None.")
    if path.is_file():
        config_file = path.parent / "config.json"
        return path, json.loads(config_file.read_text()) if config_file.exists() else {}
    if not path.exists():
        raise SafetyCheckerError(f"No safety-checker weights at {path}: the path does not exist. {hint}")
    for folder in (path, path / "safety_checker"):
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                config_file = folder / "config.json"
                return folder / name, json.loads(config_file.read_text()) if config_file.exists() else {}
    raise SafetyCheckerError(f"No safety-checker weights in {path}: expected one of {', '.join(WEIGHT_FILES)} "
                             f"there or in {path / 'safety_checker'}. {hint}")


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise SafetyCheckerError(f"Could not read {path} as plain tensors ({type(e).__name__}: {e}). "
                                 "Use the model.safetensors version of the weights.") from None
    return state.get("state_dict", state)


def _architecture(state: dict, config: dict) -> tuple[CLIPVisionConfig, int, int, int]:
    """(vision config, projection_dim, n_concepts, n_special) from the weight shapes, config.json for the rest."""
    vision = {**config.get("vision_config", {}), **(config.get("vision_config_dict") or {})}
    prefix = next((p for p in ("vision_model.vision_model.", "vision_model.")
                   if p + "embeddings.class_embedding" in state), None)
    if prefix is None or "visual_projection.weight" not in state or "concept_embeds" not in state:
        raise SafetyCheckerError("These weights are not an SD safety checker (no vision_model.*.class_embedding, "
                                 "visual_projection.weight or concept_embeds).")
    hidden = state[prefix + "embeddings.class_embedding"].shape[0]
    patch = state[prefix + "embeddings.patch_embedding.weight"].shape[-1]
    n_positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k[len(prefix + "encoder.layers."):].split(".")[0])
                     for k in state if k.startswith(prefix + "encoder.layers."))
    vision_config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=vision.get("num_attention_heads", hidden // 64),  # CLIP ViTs use 64-dim heads
        num_channels=state[prefix + "embeddings.patch_embedding.weight"].shape[1],
        image_size=patch * round((n_positions - 1) ** 0.5),
        patch_size=patch,
        hidden_act=vision.get("hidden_act", "quick_gelu"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
    )
    return (vision_config, state["visual_projection.weight"].shape[0], state["concept_embeds"].shape[0],
            state["special_care_embeds"].shape[0])


# ------------------------------------------------------------------------------------- the small checker


class ImageTextEncoder(Protocol):
    """A CLIP-like model: images and texts into one embedding space (only directions matter)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [B, 3, H, W] -> [B, D], in [0, 1] unless the model has an ``image_range`` attribute (the
        kit's SmallCLIP takes [-1, 1]). The model does its own resizing and normalisation."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> [N, D]."""


@dataclasses.dataclass
class ConceptReport:
    concept: str
    threshold: float
    precision: float  # of "this concept fired" against "labelled with this concept"
    recall: float
    positives: int
    negatives: int


class SmallSafetyChecker(ConceptChecker):
    """The SD rule on any CLIP-like model, with concepts written as text prompts.

    The checker does not own the CLIP model (its weights are not in this state dict); it keeps the concept
    embeddings and thresholds. Thresholds come from `calibrate` on labelled held-out images, or are given.
    There are no special-care concepts by default (pass `special_concepts` and `special_thresholds` to add them).
    """

    def __init__(self, clip_model: ImageTextEncoder, concepts: list[str], concept_embeds: torch.Tensor,
                 thresholds: Sequence[float] | None = None, special_concepts: Sequence[str] = (),
                 special_embeds: torch.Tensor | None = None, special_thresholds: Sequence[float] | None = None):
        super().__init__(concept_embeds.shape[1], len(concepts), len(special_concepts))
        self.__dict__["clip_model"] = clip_model  # outside the module tree on purpose: not ours to save or move
        self.concept_names = list(concepts)
        self.special_names = list(special_concepts)
        self.concept_embeds.data = concept_embeds.detach().float().clone()
        thresholds = [float("nan")] * len(concepts) if thresholds is None else thresholds
        self.concept_embeds_weights.data = _vector(thresholds, len(concepts), "thresholds")
        if special_concepts:
            if special_embeds is None or special_thresholds is None:
                raise ValueError("special_concepts need special_embeds and special_thresholds.")
            self.special_care_embeds.data = special_embeds.detach().float().clone()
            self.special_care_embeds_weights.data = _vector(special_thresholds, len(special_concepts),
                                                            "special_thresholds")

    @classmethod
    @torch.no_grad()
    def from_clip(cls, clip_model: ImageTextEncoder, concepts: list[str], thresholds: Sequence[float] | None = None,
                  special_concepts: Sequence[str] = (), special_thresholds: Sequence[float] | None = None
                  ) -> "SmallSafetyChecker":
        """Concept embeddings = `clip_model.encode_text(concepts)`. Without thresholds, call `calibrate` first."""
        if not concepts:
            raise ValueError("Give at least one concept prompt, e.g. ['a photo of a spider'].")
        special = clip_model.encode_text(list(special_concepts)) if special_concepts else None
        return cls(clip_model, concepts, clip_model.encode_text(list(concepts)), thresholds, special_concepts,
                   special, special_thresholds)

    def embed(self, images: list[torch.Tensor]) -> torch.Tensor:
        if any(self.concept_embeds_weights.isnan()):
            raise RuntimeError("This SmallSafetyChecker has no thresholds yet: call calibrate(images, labels) on "
                               "labelled held-out images, or pass thresholds= to from_clip.")
        return self._encode(images)

    def _encode(self, images: list[torch.Tensor]) -> torch.Tensor:
        low, high = getattr(self.clip_model, "image_range", (0.0, 1.0))  # checker images are in [0, 1]
        images = [x * (high - low) + low for x in images]
        if len({tuple(x.shape) for x in images}) == 1:
            return self.clip_model.encode_image(torch.stack(images))
        return torch.cat([self.clip_model.encode_image(x[None]) for x in images])  # mixed sizes: one at a time

    def labels_matrix(self, labels: Any, n_images: int) -> torch.Tensor:
        """Labels -> bool [N, C]. Each label is None (no concept), a concept name or index, or a list of them;
        or pass a bool array [N, C] directly."""
        if isinstance(labels, (torch.Tensor, np.ndarray)) and np.ndim(labels) == 2:
            matrix = torch.as_tensor(np.asarray(labels)).bool()
        else:
            matrix = torch.zeros(len(labels), len(self.concept_names), dtype=torch.bool)
            for i, label in enumerate(labels):
                for item in ([] if label is None else [label] if isinstance(label, (str, int)) else label):
                    matrix[i, self._index(item)] = True
        if matrix.shape != (n_images, len(self.concept_names)):
            raise ValueError(f"Got labels for {matrix.shape[0]} images x {matrix.shape[1]} concepts; expected "
                             f"{n_images} x {len(self.concept_names)}.")
        return matrix

    def _index(self, item: str | int) -> int:
        if isinstance(item, int) and 0 <= item < len(self.concept_names):
            return item
        if item in self.concept_names:
            return self.concept_names.index(item)
        raise ValueError(f"Unknown concept {item!r}; the concepts are {self.concept_names}.")

    @torch.no_grad()
    def calibrate(self, images: Any, labels: Any, target_precision: float = 0.95) -> list[ConceptReport]:
        """Set each concept's threshold from labelled images (use held-out ones, not your test set).

        For each concept: among the thresholds whose flags reach `target_precision` on these images, take the
        one with the highest recall, placed halfway between neighbouring similarities (the widest margin).
        When no threshold reaches the target, take the most precise one and warn.
        """
        items, _ = _split(images)
        dist = cosine_similarity_matrix(self._encode([_to_chw(x) for x in items]), self.concept_embeds)
        truth = self.labels_matrix(labels, len(items))
        reports = []
        for c, name in enumerate(self.concept_names):
            if not truth[:, c].any() or truth[:, c].all():
                raise ValueError(f"Calibrating {name!r} needs images with and without it; the labels have "
                                 f"{int(truth[:, c].sum())} of {len(items)} with it.")
            threshold, precision, recall = _pick_threshold(dist[:, c], truth[:, c], target_precision)
            if precision < target_precision or recall == 0:
                warnings.warn(f"Concept {name!r}: no threshold reaches precision {target_precision} on these images; "
                              f"using the most precise one ({precision:.3f}, recall {recall:.3f}).", stacklevel=2)
            self.concept_embeds_weights.data[c] = threshold
            reports.append(ConceptReport(name, threshold, precision, recall, int(truth[:, c].sum()),
                                         int((~truth[:, c]).sum())))
        return reports

    @torch.no_grad()
    def evaluate(self, images: Any, labels: Any) -> dict[str, dict[str, float]]:
        """Precision and recall per concept, and "any": an image flagged versus an image with any concept."""
        result = self.check(images)
        truth = self.labels_matrix(labels, len(result.nsfw))
        fired = result.scores > 0
        report = {name: _precision_recall(fired[:, c], truth[:, c]) for c, name in enumerate(self.concept_names)}
        report["any"] = _precision_recall(torch.tensor(result.nsfw), truth.any(dim=1))
        return report


def _vector(values: Sequence[float], n: int, what: str) -> torch.Tensor:
    vector = torch.as_tensor(values, dtype=torch.float32).flatten()
    if vector.numel() != n:
        raise ValueError(f"{what} has {vector.numel()} values for {n} concepts.")
    return vector


def _precision_recall(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    tp = int((predicted & truth).sum())
    flagged, positives = int(predicted.sum()), int(truth.sum())
    return {"precision": tp / flagged if flagged else 1.0, "recall": tp / positives if positives else 1.0,
            "flagged": flagged, "positives": positives}


def _pick_threshold(dist: torch.Tensor, truth: torch.Tensor, target: float) -> tuple[float, float, float]:
    values = torch.unique(dist)  # sorted
    candidates = torch.cat([values[:1] - 0.01, (values[1:] + values[:-1]) / 2, values[-1:] + 0.01])
    # The same decision as the checker: round(dist - threshold, 3) > 0 (no special-care adjustment here).
    fired = torch.round(dist[:, None] - candidates[None, :], decimals=3) > 0  # [N, K]
    tp = (fired & truth[:, None]).sum(0).float()
    precision = torch.where(fired.sum(0) > 0, tp / fired.sum(0).clamp(min=1), torch.ones_like(tp))
    recall = tp / truth.sum()
    ok = (precision >= target) & (recall > 0)
    # Lexicographic: best recall among the admissible (else best precision), then precision, then the
    # highest threshold. Equal counts at two candidates mean equal flag sets, so each choice is one midpoint.
    pool = ok & (recall == recall[ok].max()) if ok.any() else precision == precision.max()
    pool &= recall == recall[pool].max()
    pool &= precision == precision[pool].max()
    best = int(torch.nonzero(pool).flatten()[-1])
    return float(candidates[best]), float(precision[best]), float(recall[best])
