"""Any image-caption data as sdkit items: Hugging Face `datasets`, local imagefolders, streams.

    ds = ImageCaptionDataset.from_hf("user/some-dataset", image_column="image", caption_column="text")
    ds = ImageCaptionDataset.from_imagefolder("my_images/")      # metadata.jsonl: {"file_name", "text"}
    stream = IterableImageCaptionDataset(hf_streaming_dataset, rank=rank, world_size=world_size)

Every item is {"image": float tensor [3, H, W] in [-1, 1], "caption": str, "meta": dict of the other
columns}; `collate_examples` batches them (images stacked, captions and meta as lists).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .transforms import resize_center_crop, to_tensor


def _open_image(value) -> Image.Image:
    """An image cell in any of the forms `datasets` hands out: PIL, {"bytes", "path"}, a path, an array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io
        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"cannot read an image from a {type(value).__name__}; expected a PIL image, "
                    "a {'bytes', 'path'} dict, a file path or a uint8 array")


def _missing_column(kind: str, column: str, available) -> KeyError:
    return KeyError(f"the dataset has no {kind} column {column!r}; its columns are {list(available)}. "
                    f"Pass {kind}_column=<one of them>.")


def example_from_row(row: dict, image_column: str = "image", caption_column: str = "text",
                     size: int | None = None) -> dict:
    """One dataset row -> {"image", "caption", "meta"}. A list of captions gives its first."""
    for kind, column in (("image", image_column), ("caption", caption_column)):
        if column not in row:
            raise _missing_column(kind, column, row.keys())
    image = _open_image(row[image_column])
    if size is not None:
        # Resize in RGBA when there may be transparency (Pillow premultiplies alpha; it would resize P as NEAREST).
        image = resize_center_crop(image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA", "P") else "RGB"), size)
    caption = row[caption_column]
    if isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else ""
    meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)
            and isinstance(v, (str, int, float, bool, type(None)))}
    return {"image": to_tensor(image), "caption": str(caption), "meta": meta}


class ImageCaptionDataset(torch.utils.data.Dataset):
    """A map-style `datasets.Dataset` (or anything indexable that returns row dicts) read by column names.

    size: resize the shorter side to `size` and centre-crop (LANCZOS); None keeps each image's own size.
    """

    def __init__(self, hf_dataset, image_column: str = "image", caption_column: str = "text",
                 size: int | None = None):
        columns = getattr(hf_dataset, "column_names", None)
        if columns is not None:
            for kind, column in (("image", image_column), ("caption", caption_column)):
                if column not in columns:
                    raise _missing_column(kind, column, columns)
        self.hf, self.image_column, self.caption_column, self.size = hf_dataset, image_column, caption_column, size

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, index: int) -> dict:
        return example_from_row(self.hf[int(index)], self.image_column, self.caption_column, self.size)

    @classmethod
    def from_hf(cls, dataset_or_name_or_path, image_column: str = "image", caption_column: str = "text",
                split: str = "train", size: int | None = None, **load_kwargs) -> "ImageCaptionDataset":
        """From a `datasets.Dataset`/`DatasetDict`, a folder written by `save_to_disk`, an imagefolder
        with metadata.jsonl, or a Hub name (needs the network; extra keywords go to `load_dataset`)."""
        import datasets

        ds = dataset_or_name_or_path
        if isinstance(ds, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise TypeError("this is a streaming (iterable) dataset; wrap it in IterableImageCaptionDataset instead")
        if isinstance(ds, (str, os.PathLike)):
            path = Path(ds).expanduser()
            if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(str(path))
            elif path.is_dir() and (path / "metadata.jsonl").exists():
                return cls.from_imagefolder(path, caption_column=caption_column, size=size)
            elif path.exists():
                raise ValueError(f"{str(path)!r} is neither a folder written by Dataset.save_to_disk nor an "
                                 "imagefolder with metadata.jsonl")
            else:
                try:
                    ds = datasets.load_dataset(str(ds), split=split, **load_kwargs)
                except Exception as e:
                    raise RuntimeError(
                        f"could not load the dataset {str(ds)!r} with datasets.load_dataset ({type(e).__name__}: "
                        f"{e}). A Hub name needs the network (or a filled HF cache); a local path must exist."
                    ) from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"the dataset has no split {split!r}; its splits are {list(ds)}")
            ds = ds[split]
        return cls(ds, image_column, caption_column, size)

    @classmethod
    def from_imagefolder(cls, folder, caption_column: str = "text", size: int | None = None) -> "ImageCaptionDataset":
        """From a folder of images with a metadata.jsonl whose lines are {"file_name": ..., <caption_column>: ...}
        (the Hugging Face imagefolder layout; file names are relative to the folder)."""
        import datasets

        folder = Path(folder).expanduser()
        meta_file = folder / "metadata.jsonl"
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file} not found; an imagefolder needs a metadata.jsonl with one "
                                    f'{{"file_name": ..., "{caption_column}": ...}} object per line')
        rows = []
        for n, line in enumerate(meta_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for kind, column in (("image", "file_name"), ("caption", caption_column)):
                if column not in row:
                    raise KeyError(f"{meta_file} line {n} has no {column!r} key (the {kind} column); "
                                   f"its keys are {list(row)}" + ("" if kind == "image" else
                                                                  ". Pass caption_column=<one of them>."))
            image_path = folder / row["file_name"]
            if not image_path.exists():
                raise FileNotFoundError(f"{meta_file} line {n} names {row['file_name']!r}, which is not in {folder}")
            rows.append({"image": str(image_path), **{k: v for k, v in row.items() if k != "file_name"},
                         "file_name": row["file_name"]})
        if not rows:
            raise ValueError(f"{meta_file} lists no images")
        ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
        return cls(ds, "image", caption_column, size)


def save_imagefolder(dataset, folder, caption_column: str = "text") -> Path:
    """Write any sdkit item dataset as PNGs plus metadata.jsonl (readable by `from_imagefolder` and by
    `datasets.load_dataset("imagefolder", data_dir=folder)`)."""
    from .transforms import to_pil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(len(dataset))))
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i in range(len(dataset)):
            item = dataset[i]
            name = f"{i:0{digits}d}.png"
            to_pil(item["image"]).save(folder / name)
            f.write(json.dumps({"file_name": name, caption_column: item["caption"]}) + "\n")
    return folder


# ------------------------------------------------------------------------------------------- streaming
def rank_and_world_size() -> tuple[int, int]:
    """This process's (rank, world size): torch.distributed when initialised, else $RANK/$WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(iterable: Iterable, rank: int = 0, world_size: int = 1) -> Iterator:
    """The items of `iterable` that belong to this (rank, DataLoader worker).

    Item i goes to shard i mod (world_size x workers); this process's worker w of rank r takes shard
    r x workers + w. So across all ranks and workers every item is read exactly once (the stream is
    read in full by each, which is fine for the small, fast sources this kit streams)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    info = torch.utils.data.get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    n, k = world_size * workers, rank * workers + worker
    for i, item in enumerate(iterable):
        if i % n == k:
            yield item


class IterableImageCaptionDataset(torch.utils.data.IterableDataset):
    """A stream of rows (a streaming `datasets.IterableDataset`, or any re-iterable of row dicts) read by
    column names and sharded across DataLoader workers and distributed ranks (see `shard`).

    rank / world_size: None reads them from torch.distributed or $RANK / $WORLD_SIZE.
    """

    def __init__(self, source: Iterable, image_column: str = "image", caption_column: str = "text",
                 size: int | None = None, rank: int | None = None, world_size: int | None = None):
        self.source, self.image_column, self.caption_column, self.size = source, image_column, caption_column, size
        default_rank, default_world = rank_and_world_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size

    def __iter__(self) -> Iterator[dict]:
        for row in shard(self.source, self.rank, self.world_size):
            yield example_from_row(row, self.image_column, self.caption_column, self.size)


def collate_examples(batch: list[dict]) -> dict:
    """Batch sdkit items: tensors ("image", "lr_image", ...) stacked to [B, ...]; captions, meta and anything
    else as lists (meta differs per item, so the default collate cannot batch it)."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"{key!r} tensors in one batch must share a shape, got {sorted(shapes)}; "
                                 "pass size=... to the dataset")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
