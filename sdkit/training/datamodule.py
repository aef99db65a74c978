"""Data for training runs: a LightningDataModule built from config, with exact, resumable batch order.

    data:
      target: sdkit.training.DataModule
      params:
        batch_size: 32            # per device
        num_workers: 1
        train:                    # a dataset config, or a list of them (concatenated)
          target: sdkit.data.shapes.ShapesDataset
          params: {length: 20000, size: 64}
        validation:
          target: sdkit.data.shapes.ShapesDataset
          params: {length: 256, size: 64, split: validation}

Items are dicts (``{"image": [3,H,W] in [-1,1], "caption": str, "meta": dict}``); batches stack tensors, keep
strings and ``meta`` as lists, and add ``index``: each item's position in the dataset (the stream position for
iterable datasets). The training step derives every random draw of a sample from (seed, step, index), which
is what makes a 2-process DDP run equal a 1-process run and a resumed run equal an unbroken one.

Batch order is a pure function of (seed, number of batches consumed): epoch ``e`` is a permutation drawn from
(seed, e), cut into global batches of ``batch_size × world_size``; rank ``r`` takes the ``r``-th slice of each.
The number of consumed batches is saved in the checkpoint (``state_dict``), so a resumed run continues with the
exact next batch, with any number of workers.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..config import get_obj_from_str, instantiate_from_config


def collate(items: Sequence[dict]) -> dict:
    """Stack tensors (and numbers) that agree in shape; keep everything else (captions, meta) as lists."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor) and all(v.shape == first.shape for v in values):
            batch[key] = torch.stack(values)
        elif isinstance(first, np.ndarray) and all(v.shape == first.shape for v in values):
            batch[key] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (int, float, bool)) and not isinstance(first, str):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class IndexedDataset(Dataset):
    """Adds ``index`` (the item's position) to each item of a map-style dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"training datasets must return dicts (e.g. {{'image', 'caption'}}), "
                            f"{type(self.dataset).__name__}[{index}] returned {type(item).__name__}")
        return {**item, "index": index}


def epoch_permutation(length: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The item order of one epoch: a permutation drawn from (seed, epoch), or 0..length-1."""
    if not shuffle:
        return torch.arange(length)
    key = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
    return torch.randperm(length, generator=torch.Generator().manual_seed(key))


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of one rank, in an order fixed by (seed, epoch), starting wherever training left off.

    The global batch ``b`` of an epoch is ``perm[b·B·W : (b+1)·B·W]`` (B = per-rank batch size, W = world
    size) and rank ``r`` takes its ``r``-th slice of B items, so the W ranks together always see the same
    items as one process with batch B·W. ``position()`` returns the number of batches already consumed since
    the start of training (it comes from the DataModule); iteration resumes from there, inside its epoch.
    """

    def __init__(self, length: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, position: Callable[[], int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.position = position or (lambda: 0)
        global_batch = batch_size * world_size
        self.batches_per_epoch = length // global_batch if drop_last else math.ceil(length / global_batch)
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {length} items, fewer than one global batch of {global_batch} "
                             f"(batch_size {batch_size} × {world_size} processes); use a smaller batch_size")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Accepted for Lightning's sake; the epoch follows from ``position()``."""

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.position()
        epoch, start = divmod(consumed, self.batches_per_epoch)
        perm = epoch_permutation(self.length, self.seed, epoch, self.shuffle).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(start, self.batches_per_epoch):
            chunk = perm[b * global_batch:(b + 1) * global_batch]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if mine:
                yield mine


class ShardedIterable(IterableDataset):
    """An iterable dataset (e.g. a streaming Hugging Face dataset) split across ranks and workers.

    Stream item ``i`` belongs to rank ``i mod W``; inside a rank, batch ``j`` is built by worker ``j mod K``
    (the DataLoader takes batches from its K workers in turn), so the batch order does not depend on K.
    Items get ``index`` = their stream position. ``skip_batches`` (set when resuming) drops the first batches
    of the rank's stream without building them.
    """

    def __init__(self, source, batch_size: int, rank: int = 0, world_size: int = 1):
        self.source, self.batch_size, self.rank, self.world_size = source, batch_size, rank, world_size
        self.skip_batches = 0

    def _rows(self) -> tuple[Iterator, Callable[[Any], dict]]:
        """The unsharded stream and the function that turns a row into an item. sdkit.data.hf's
        IterableImageCaptionDataset shards itself (per item, by worker); its raw rows are read instead and
        converted the same way, so that sharding happens once, here, and skipped rows are never decoded."""
        from ..data.hf import IterableImageCaptionDataset, example_from_row

        src = self.source
        if isinstance(src, IterableImageCaptionDataset):
            return iter(src.source), lambda row: example_from_row(row, src.image_column, src.caption_column, src.size)
        return iter(src), lambda item: item

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rows, convert = self._rows()
        mine = (pair for pair in enumerate(rows) if pair[0] % self.world_size == self.rank)
        for rank_pos, (index, row) in enumerate(mine):
            batch_no = rank_pos // self.batch_size
            if batch_no < self.skip_batches or (batch_no - self.skip_batches) % workers != worker:
                continue
            item = convert(row)
            if not isinstance(item, dict):
                raise TypeError(f"training datasets must yield dicts, got {type(item).__name__}")
            yield {**item, "index": index}


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning recognises as resumable (it has state_dict/load_state_dict). The position itself
    lives in the DataModule; this only reports it (so Lightning does not warn about mid-epoch resumption) and
    calls ``before_iter`` when an epoch's iteration starts, in the main process, before workers start."""

    position: Callable[[], int] = staticmethod(lambda: 0)
    before_iter: Callable[[], None] | None = None

    def __iter__(self):
        if self.before_iter is not None:
            self.before_iter()
        return super().__iter__()

    def state_dict(self) -> dict:
        return {"batches_consumed": int(self.position())}

    def load_state_dict(self, state: dict) -> None:
        pass


def _as_container(cfg: Any) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _is_target(value: Any) -> bool:
    return isinstance(value, dict) and "target" in value and set(value) <= {"target", "params"}


def build_dataset(cfg: Any):
    """A dataset from a ``{target, params}`` config, or a ConcatDataset from a list of them. Parameters that
    are themselves ``{target, params}`` configs (or lists of them) are built first, so wrappers compose:
    ``{target: sdkit.data.transforms.DegradedPairs, params: {base: {target: ...EmojiDataset, ...}}}``."""
    cfg = _as_container(cfg)
    if isinstance(cfg, (list, tuple)):
        parts = [build_dataset(c) for c in cfg]
        if any(isinstance(p, IterableDataset) for p in parts):
            raise ValueError("a list of datasets is concatenated, which needs map-style datasets; "
                             "combine iterable datasets yourself")
        return ConcatDataset(parts)
    if isinstance(cfg, Dataset):
        return cfg
    if not _is_target(cfg):
        raise ValueError(f"a dataset config needs a 'target' (and optional 'params'), got {cfg!r}")
    params = {}
    for key, value in (cfg.get("params") or {}).items():
        if _is_target(value):
            value = build_dataset(value) if "Dataset" in value["target"] or key in ("base", "dataset") \
                else instantiate_from_config(value)
        elif isinstance(value, list) and value and all(_is_target(v) for v in value):
            value = [build_dataset(v) for v in value]
        params[key] = value
    return _resolve(cfg["target"])(**params)


def _resolve(target: str):
    """``module.Name`` or ``module.Class.constructor`` (e.g. sdkit.data.hf.ImageCaptionDataset.from_hf)."""
    try:
        return get_obj_from_str(target)
    except ImportError:
        owner, _, attr = target.rpartition(".")
        try:
            return getattr(get_obj_from_str(owner), attr)
        except (ImportError, AttributeError, ValueError):
            pass
        raise


class DataModule(L.LightningDataModule):
    """Train/validation/test datasets from configs (CompVis ``DataModuleFromConfig`` parameter names).

    Args:
        batch_size: per-device batch size (the global batch is batch_size × devices × accumulation).
        train, validation, test: dataset configs ``{target, params}`` or lists of them (concatenated).
        num_workers: DataLoader worker processes (0 = load in the training process).
        seed: the shuffling seed; the run's ``--seed`` is used when not given.
        shuffle: shuffle the training set each epoch.
        val_batch_size: batch size for validation/test (default: batch_size).
    """

    def __init__(self, batch_size: int, train: Any = None, validation: Any = None, test: Any = None,
                 num_workers: int = 0, seed: int | None = None, shuffle: bool = True,
                 val_batch_size: int | None = None, wrap: bool = False, **unused: Any):
        super().__init__()
        if unused:
            raise ValueError(f"DataModule got unknown parameters {sorted(unused)}; it takes batch_size, train, "
                             f"validation, test, num_workers, seed, shuffle, val_batch_size, wrap")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.params.{name} must be a positive integer (samples per device and step), "
                                 f"got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.params.num_workers must be an integer ≥ 0, got {num_workers!r}")
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.val_batch_size = val_batch_size or batch_size
        self.dataset_configs = {"train": train, "validation": validation, "test": test}
        self.datasets: dict[str, Any] = {}
        self.batches_consumed = 0  # training batches seen by this rank since the start of training

    # -- datasets ---------------------------------------------------------------------------------------------
    def dataset(self, split: str):
        """The dataset of a split, built on first use."""
        if split not in self.datasets:
            cfg = self.dataset_configs[split]
            if cfg is None:
                raise ValueError(f"the data config has no {split!r} dataset")
            self.datasets[split] = build_dataset(cfg)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        for split, cfg in self.dataset_configs.items():
            if cfg is not None:
                self.dataset(split)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        return int(getattr(module, "seed", 0) or 0)

    # -- loaders ----------------------------------------------------------------------------------------------
    def loader(self, split: str, train: bool) -> DataLoader:
        """A DataLoader for this rank; ``train`` turns on shuffling, dropping the last partial batch and the
        resumable position."""
        dataset = self.dataset(split)
        rank, world = self._rank_world()
        batch_size = self.batch_size if train else self.val_batch_size
        common = dict(num_workers=self.num_workers, collate_fn=collate, persistent_workers=False)
        if isinstance(dataset, IterableDataset):
            sharded = ShardedIterable(dataset, batch_size, rank, world)
            loader = ResumableDataLoader(sharded, batch_size=batch_size, **common)
            if train:
                loader.before_iter = lambda: self._start_stream(sharded)
        else:
            sampler = ResumableBatchSampler(
                len(dataset), batch_size, rank=rank, world_size=world, seed=self._seed(),
                shuffle=self.shuffle and train, drop_last=train,
                position=(lambda: self.batches_consumed) if train else None)
            loader = ResumableDataLoader(IndexedDataset(dataset), batch_sampler=sampler, **common)
        if train:
            loader.position = lambda: self.batches_consumed
        return loader

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self):
        return self.loader("validation", train=False) if self.dataset_configs["validation"] is not None else []

    def test_dataloader(self):
        return self.loader("test", train=False) if self.dataset_configs["test"] is not None else []

    # -- position ---------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this once per batch the training loop takes (prefetched batches are not counted yet),
        # before the training step: the count is what a checkpoint saved after this step must resume from.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.batches_consumed += 1
        return batch

    def _start_stream(self, sharded: ShardedIterable) -> None:
        """An iterable dataset restarts from its beginning every epoch; after a resume, skip what was used."""
        if self._resuming:
            sharded.skip_batches = self.batches_consumed - self._stream_start
            self._resuming = False
        else:
            self._stream_start = self.batches_consumed
            sharded.skip_batches = 0

    _resuming = False
    _stream_start = 0

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed, "stream_start": self._stream_start}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state.get("batches_consumed", 0))
        self._stream_start = int(state.get("stream_start", 0))
        self._resuming = True
