"""Image-caption data for training and checking sdkit models.

- `shapes`: procedural shapes with exact captions and metadata (`ShapesDataset`, `render`, `parse_caption`),
  and `shapes_checker.check`, which tells whether an image shows a caption's colours, shapes, counts, places;
- `emoji`: Twemoji and OpenMoji art with CLDR names, cached as a Hugging Face dataset (`EmojiDataset`);
- `hf`: any `datasets` image-text dataset or imagefolder by column names, streams sharded over workers and
  ranks, and `collate_examples` for DataLoaders;
- `transforms`: tensor conversion, resizing and cropping, and the upscaler's `Degradation`.

Every dataset item is {"image": float tensor [3, H, W] in [-1, 1], "caption": str, "meta": dict}.
"""
from .emoji import EmojiDataset, list_emoji, load_emoji_dataset, render_emoji
from .hf import (ImageCaptionDataset, IterableImageCaptionDataset, collate_examples, rank_and_world_size,
                 save_imagefolder, shard)
from .shapes import Group, Scene, ShapesDataset, caption, parse_caption, render
from .transforms import Degradation, DegradedPairs, resize_center_crop, to_pil, to_tensor

__all__ = ["EmojiDataset", "list_emoji", "load_emoji_dataset", "render_emoji",
           "ImageCaptionDataset", "IterableImageCaptionDataset", "collate_examples", "rank_and_world_size",
           "save_imagefolder", "shard",
           "Group", "Scene", "ShapesDataset", "caption", "parse_caption", "render",
           "Degradation", "DegradedPairs", "resize_center_crop", "to_pil", "to_tensor"]
