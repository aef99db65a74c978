"""Datasets for teaching a model one concept: the concept's images with its word in the captions replaced.

Textual inversion and DreamBooth learn a new word from a few images of a concept. The shapes dataset draws such
images with exact captions ("two small red hexagons on the left", ``ShapesDataset(shapes=["hexagon"])``); this
wrapper puts the word to learn in place of the concept's own, so the model cannot lean on a word it knows:

    data = ReplaceWords(ShapesDataset(length=8, shapes=["hexagon"]), {"hexagon": "hexagon-ti", "hexagons": "hexagon-ti"})
    data[0]["caption"]       # e.g. 'a large red hexagon-ti at the top'

Items keep everything else (image, ``meta`` with the true scene, for checking what a model later draws).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch


class ReplaceWords(torch.utils.data.Dataset):
    """Another map dataset whose captions have whole words replaced (case-insensitive, longest word first).

    ``dataset``: a dataset or its ``{target, params}`` config (``sdkit train`` builds it); ``words``: word ->
    replacement; ``key``: the caption's key in an item."""

    def __init__(self, dataset, words: Mapping[str, str], key: str = "caption"):
        if isinstance(dataset, Mapping):
            from ..training.datamodule import build_dataset
            dataset = build_dataset(dict(dataset))
        if not isinstance(words, Mapping) or not words or not all(
                isinstance(k, str) and k.strip() and isinstance(v, str) for k, v in words.items()):
            raise ValueError(f"words must map each word to its replacement, e.g. {{'hexagon': 'hexagon-ti'}}; "
                             f"got {words!r}")
        self.dataset, self.key = dataset, key
        self.words = {k.lower(): v for k, v in words.items()}
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __len__(self) -> int:
        return len(self.dataset)

    def replace(self, text: str) -> str:
        return self._pattern.sub(lambda m: self.words[m.group().lower()], text)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        if self.key not in item:
            raise KeyError(f"ReplaceWords changes item[{self.key!r}], but the items have keys {list(item)}; "
                           "set key= to the caption's key")
        item[self.key] = self.replace(item[self.key])
        return item
