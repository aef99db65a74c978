"""DreamBooth's data (Ruiz et al., CVPR 2023): a few images of a subject under a rare identifier, mixed with class
images the model drew itself, so that fine-tuning teaches the subject without forgetting the rest (prior
preservation).

    class_images = ClassImages("logs/class-images/tiny-shapes", prompts=[...], count=64, model="tiny")
    data = PriorPreservation(instance, class_images, prior_weight=1.0)

- :class:`ClassImages` draws ``count`` images with ``model`` (a bundled config name, optionally ``ckpt``) for the
  class prompts, once: they are written to ``folder`` (atomically, with a manifest of how they were made) and read
  from there afterwards. A folder made with other settings is refused, not silently redrawn or mixed.
- :class:`PriorPreservation` is the training set. DreamBooth's loss is L_instance + λ·L_prior; sdkit's training
  step takes the mean diffusion loss of its batch, so λ is carried by how often class images come: an epoch holds
  each instance image ``instance_repeats`` times and λ times as many class images (cycling through them), and the
  epoch's mean loss is (L_instance + λ'·L_prior) / (1 + λ'), DreamBooth's loss up to a constant factor (the learning
  rate absorbs it), with λ' = ``effective_prior_weight``, λ rounded to a whole number of class slots.
  ``prior_weight=0`` trains on the instance images alone (DreamBooth without prior preservation).

Items are ``{"image", "caption", "prior"}`` (``prior``: a class image).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..atomic import atomic_folder
from .transforms import to_tensor

MANIFEST = "class_images.json"


def _built(dataset):
    """A dataset, or one built from its ``{target, params}`` config."""
    if isinstance(dataset, Mapping):
        from ..training.datamodule import build_dataset
        return build_dataset(dict(dataset))
    return dataset


class ClassImages(torch.utils.data.Dataset):
    """``count`` images the model drew for the class prompts, made once and cached in ``folder``.

    ``prompts``: a list of prompts, or a dataset (or its config) whose captions are taken in order; they are
    cycled when fewer than ``count``. Image i is drawn with seed ``seed + i``, ``steps`` steps of ``sampler`` at
    ``guidance_scale`` (no watermark), at the model's default size."""

    def __init__(self, folder: str | Path, prompts, count: int = 64, model: str = "tiny", ckpt: str | None = None,
                 steps: int = 20, guidance_scale: float = 5.0, sampler: str = "dpmpp_2m", seed: int = 0,
                 batch_size: int = 16):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a whole number >= 1, got {count!r}")
        self.folder = Path(folder)
        texts = self._prompts(prompts, count)
        self.settings = {"prompts": [texts[i % len(texts)] for i in range(count)], "model": model, "ckpt": ckpt,
                         "steps": steps, "guidance_scale": guidance_scale, "sampler": sampler, "seed": seed}
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            stored = json.loads(manifest.read_text())
            differ = sorted(k for k in self.settings if stored.get(k) != self.settings[k])
            if differ:
                raise ValueError(f"{self.folder} holds class images made with other settings ({', '.join(differ)} "
                                 "differ); delete the folder to draw them again, or give another folder")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise ValueError(f"{self.folder} exists without {MANIFEST}: it is not a class-image folder; give an "
                             "empty or new folder")
        else:
            self._draw(batch_size)
        self.files = [self.folder / f"{i:05d}.png" for i in range(count)]
        missing = [f.name for f in self.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder} lacks {len(missing)} class images ({missing[:3]}); delete the "
                                    "folder to draw them again")

    @staticmethod
    def _prompts(prompts, count: int) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts):
            return list(prompts)
        dataset = _built(prompts)
        if not isinstance(dataset, torch.utils.data.Dataset):
            raise TypeError("prompts must be a prompt, a list of prompts, or a dataset (config) with captions; got "
                            f"{type(prompts).__name__}")
        return [dataset[i]["caption"] for i in range(min(count, len(dataset)))]

    def _draw(self, batch_size: int) -> None:
        from ..checkpoints import load_model
        from ..pipelines import txt2img

        s = self.settings
        print(f"drawing {len(s['prompts'])} class images with {s['model']} into {self.folder} (once)")
        model = load_model(s["model"], s["ckpt"])
        with atomic_folder(self.folder) as tmp:
            for start in range(0, len(s["prompts"]), batch_size):
                prompts = s["prompts"][start:start + batch_size]
                images = txt2img(model, prompts, seed=s["seed"] + start, steps=s["steps"], sampler=s["sampler"],
                                 guidance_scale=s["guidance_scale"], progress=False).images
                for k, image in enumerate(images):
                    image.save(tmp / f"{start + k:05d}.png")
            (tmp / MANIFEST).write_text(json.dumps(s, indent=1))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.files[index]) as image:
            pixels = to_tensor(image.convert("RGB"))
        return {"image": pixels, "caption": self.settings["prompts"][index]}


class PriorPreservation(torch.utils.data.Dataset):
    """Instance images and class images in DreamBooth's proportion (see the module docstring).

    ``instance``, ``class_images``: datasets or their configs (items with "image" and "caption");
    ``prior_weight``: λ; ``instance_repeats``: copies of each instance image per epoch (default: enough that
    every class image comes at least once per epoch)."""

    def __init__(self, instance, class_images=None, prior_weight: float = 1.0, instance_repeats: int | None = None):
        self.instance = _built(instance)
        self.class_images = _built(class_images) if class_images is not None else None
        if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or \
                not 0 <= prior_weight < math.inf:
            raise ValueError(f"prior_weight must be a number >= 0, got {prior_weight!r}")
        if prior_weight > 0 and not self.class_images:
            raise ValueError("prior_weight > 0 needs class_images (e.g. sdkit.data.prior_preservation.ClassImages); "
                             "use prior_weight: 0 to train on the instance images alone")
        n = len(self.instance)
        if n == 0:
            raise ValueError("the instance dataset is empty")
        if instance_repeats is None:
            m = len(self.class_images) if prior_weight > 0 else 0
            instance_repeats = max(1, math.ceil(m / (prior_weight * n))) if m else 1
        self.instance_slots = n * int(instance_repeats)
        self.class_slots = round(prior_weight * self.instance_slots)
        self.effective_prior_weight = self.class_slots / self.instance_slots

    def __len__(self) -> int:
        return self.instance_slots + self.class_slots

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if index < self.instance_slots:
            item, prior = self.instance[index % len(self.instance)], False
        else:
            item, prior = self.class_images[(index - self.instance_slots) % len(self.class_images)], True
        return {"image": item["image"], "caption": item["caption"], "prior": prior}
