"""Callbacks and checkpoint I/O of training runs (the CompVis main.py set, plus resilience).

- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file and moved into place, so a
  killed run never leaves a truncated ``last.ckpt``; unreadable checkpoints get an error that says what to do.
- :class:`ResilientCheckpointing`: SIGUSR1 writes ``last.ckpt`` (at the next optimizer-step boundary, on every
  rank together), an exception writes ``on_exception.ckpt`` before it propagates, the end of training writes
  ``last.ckpt``.
- :class:`ImageLogger`: sample grids under ``images/<split>/``, with the captions rendered beside the samples.
- :class:`PerformanceMonitor`: step and epoch time, peak memory (CUDA when present, process RSS otherwise).
"""
from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_file
from ..checkpoints import CheckpointError
from .common import add_state_dict_prefix

LAST = "last.ckpt"
ON_EXCEPTION = "on_exception.ckpt"


# ================================================================================================ checkpoint files


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """Raise CheckpointError unless ``path`` is a complete torch checkpoint (a zip with its central directory
    and a data.pkl record): a truncated file fails here, before anything is built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{str(path)!r} is not a complete checkpoint ({e}): the file is truncated or corrupt, e.g. copied or "
            f"written while a run was killed. sdkit writes checkpoints atomically, so the run folder's "
            f"checkpoints/{LAST} is the last good one: resume from the run folder or from that file."
        ) from None
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(f"{str(path)!r} is a zip file but not a torch checkpoint (no data.pkl inside)")
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file next to the target, fsync, then os.replace: all or nothing."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        check_checkpoint_file(path)
        try:
            checkpoint = torch.load(path, map_location=map_location or "cpu",
                                    weights_only=True if weights_only is None else weights_only)
        except Exception as e:  # a corrupt member, or content weights_only refuses
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {str(e).splitlines()[0]}") from e
        return add_state_dict_prefix(checkpoint)


# ================================================================================================ resilience


def save_local_checkpoint(trainer: L.Trainer, path: Path) -> bool:
    """Write this rank's full state without collective calls (safe when only one rank is failing).
    Only for strategies whose state is replicated on every rank (single device, DDP)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        return False
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
    return True


class ResilientCheckpointing(Callback):
    """SIGUSR1 → ``last.ckpt``; an exception → ``on_exception.ckpt``; end of training → ``last.ckpt``.

    A SIGUSR1 request is served at the next optimizer-step boundary, so the checkpoint resumes exactly (no
    half-accumulated gradients). Under DDP the ranks agree (an all-reduce at each step boundary) so a signal
    sent to any one rank is enough; all ranks then save together.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, signum: int | None = None, save_on_train_end: bool = True):
        self.ckpt_dir = Path(ckpt_dir)
        self.signum = signal.SIGUSR1 if signum is None else signum
        self.save_on_train_end = save_on_train_end
        self.requested = False
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        previous = getattr(self, "_previous_handler", None)
        if previous is not None:
            signal.signal(self.signum, previous)
            self._previous_handler = None

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # inside a gradient accumulation: not a resumable point
            return
        self._last_step = trainer.global_step
        requested = self.requested
        if trainer.world_size > 1:
            flag = torch.tensor([1.0 if requested else 0.0], device=pl_module.device)
            flag = trainer.strategy.reduce(flag, reduce_op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item() > 0)
        if requested:
            self.requested = False
            path = self.ckpt_dir / LAST
            trainer.save_checkpoint(path)
            rank_zero_info(f"signal received: saved {path} at step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_on_train_end:
            trainer.save_checkpoint(self.ckpt_dir / LAST)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.global_step == 0:   # nothing trained yet: a checkpoint would only hold the initial weights
            return
        path = self.ckpt_dir / ON_EXCEPTION
        try:
            saved = save_local_checkpoint(trainer, path)
        except Exception as e:  # never hide the original exception
            print(f"could not save {path} after {type(exception).__name__}: {e}", file=sys.stderr)
            return
        if saved:
            print(f"{type(exception).__name__} during training: saved {path} (step {trainer.global_step}). "
                  f"Resume from it with --resume {path}, or from the last regular checkpoint with "
                  f"--resume {self.ckpt_dir.parent}", file=sys.stderr)


# ================================================================================================ monitoring


def peak_memory_mb(device: torch.device | None = None) -> tuple[float, str]:
    """(peak MB, what was measured): CUDA peak allocation on a GPU, else this process's peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_peak_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


class PerformanceMonitor(Callback):
    """Logs ``perf/step_time_s`` each step, and ``perf/epoch_time_s`` and ``perf/peak_memory_mb`` each epoch
    (the CompVis CUDACallback, also on CPU)."""

    def __init__(self, log_steps: bool = True):
        self.log_steps = log_steps
        self._epoch_start = self._step_start = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            torch.cuda.synchronize(pl_module.device)
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.log_steps and self._step_start is not None:
            pl_module.log("perf/step_time_s", time.perf_counter() - self._step_start, on_step=True,
                          on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        epoch_time = time.perf_counter() - self._epoch_start
        peak, what = peak_memory_mb(pl_module.device)
        pl_module.log("perf/epoch_time_s", epoch_time, on_epoch=True, sync_dist=True, batch_size=1)
        pl_module.log("perf/peak_memory_mb", peak, on_epoch=True, sync_dist=True, batch_size=1)
        rank_zero_info(f"epoch {trainer.current_epoch}: {epoch_time:.1f} s, {what} {peak:.0f} MB")


# ================================================================================================ images


def make_grid(images: torch.Tensor, nrow: int = 4, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] → one [C, H', W'] grid, row-major (what torchvision.utils.make_grid does)."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [0, 1] → an RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array[..., :3])


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def caption_tile(text: str, height: int, width: int) -> torch.Tensor:
    """The caption drawn in black on white, word-wrapped into a [3, height, width] tile in [0, 1]."""
    tile = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    y = 2
    for line in _wrap(text, draw, font, width - 4):
        draw.text((2, y), line, fill="black", font=font)
        y += 12
    return torch.from_numpy(np.asarray(tile).copy()).permute(2, 0, 1).float() / 255


def caption_grid(images: dict[str, torch.Tensor], captions: list[str] | None, padding: int = 2,
                 min_height: int = 64) -> torch.Tensor:
    """One row per item: [caption | inputs | reconstruction | samples ...] (images in [0, 1]). Small images are
    enlarged (nearest neighbour) to at least ``min_height`` pixels so that they and the captions stay legible."""
    columns = list(images.values())
    n, _, h, w = columns[0].shape
    factor = max(1, math.ceil(min_height / h))
    h, w = h * factor, w * factor
    rows = []
    for i in range(n):
        row = [caption_tile(captions[i], h, 3 * w)] if captions else []
        for col in columns:
            image = col[i].float().cpu()
            image = image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, 1, 1)
            row.append(image.repeat_interleave(factor, 1).repeat_interleave(factor, 2))
        pad = torch.ones(3, h, padding)
        joined = [row[0]]
        for part in row[1:]:
            joined += [pad, part]
        rows.append(torch.cat(joined, dim=2))
    sep = torch.ones(3, padding, rows[0].shape[2])
    out = [rows[0]]
    for r in rows[1:]:
        out += [sep, r]
    return torch.cat(out, dim=1)


class ImageLogger(Callback):
    """Calls ``pl_module.log_images(batch, split=...)`` every ``batch_frequency`` steps (and at steps 1, 2, 4, ...
    when ``increase_log_steps``) and writes ``images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png``
    (CompVis names) plus ``grid_...png``: one row per item with its caption rendered beside the images.
    Validation images come from the first validation batch of each validation run.
    """

    def __init__(self, batch_frequency: int = 750, max_images: int = 4, clamp: bool = True,
                 increase_log_steps: bool = True, rescale: bool = True, disabled: bool = False,
                 log_first_step: bool = False, log_images_kwargs: dict | None = None,
                 images_dir: str | os.PathLike | None = None):
        self.batch_freq, self.max_images, self.clamp, self.rescale = batch_frequency, max_images, clamp, rescale
        self.disabled, self.log_first_step = disabled, log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.log_steps = [2**n for n in range(int(math.log2(max(batch_frequency, 1))) + 1)] \
            if increase_log_steps else [batch_frequency]

    def _due(self, step: int) -> bool:
        if step <= 0 and not self.log_first_step:
            return False
        if step % self.batch_freq == 0:
            return True
        if step in self.log_steps:
            self.log_steps.remove(step)
            return True
        return False

    @rank_zero_only
    def log_img(self, trainer, pl_module, batch, batch_idx: int, split: str) -> None:
        if not callable(getattr(pl_module, "log_images", None)) or self.max_images <= 0:
            return
        from .strategies import is_fsdp

        if is_fsdp(trainer):  # sampling on rank 0 alone would wait forever for the other ranks' shards
            if not getattr(self, "_warned", False):
                print("ImageLogger: not available under FSDP (sample from a saved checkpoint instead)")
                self._warned = True
            return
        was_training = pl_module.training
        if was_training:
            pl_module.eval()
        try:
            with torch.no_grad():
                log = pl_module.log_images(batch, N=self.max_images, split=split, **self.log_images_kwargs)
        finally:
            if was_training:
                pl_module.train()
        self.write(log, split, trainer.global_step, trainer.current_epoch, batch_idx, trainer.default_root_dir)

    def write(self, log: dict, split: str, step: int, epoch: int, batch_idx: int, root: str) -> None:
        folder = (self.images_dir or Path(root) / "images") / split
        folder.mkdir(parents=True, exist_ok=True)
        captions = log.get("captions")
        images = {}
        for key, value in log.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 4:
                continue
            x = value[: self.max_images].detach().float().cpu()
            if self.clamp:
                x = x.clamp(-1, 1)
            if self.rescale:
                x = (x + 1) / 2
            images[key] = x
            to_pil(make_grid(x, nrow=4)).save(folder / f"{key}_gs-{step:06}_e-{epoch:06}_b-{batch_idx:06}.png")
        if images and len({tuple(v.shape[2:]) for v in images.values()}) == 1:
            grid = caption_grid(images, captions[: self.max_images] if captions else None)
            to_pil(grid).save(folder / f"grid_gs-{step:06}_e-{epoch:06}_b-{batch_idx:06}.png")
        elif images:  # e.g. upscaler: low-res conditioning beside high-res samples, one grid per size
            for size in {tuple(v.shape[2:]) for v in images.values()}:
                same = {k: v for k, v in images.items() if tuple(v.shape[2:]) == size}
                grid = caption_grid(same, captions[: self.max_images] if captions else None)
                to_pil(grid).save(folder / f"grid{size[0]}_gs-{step:06}_e-{epoch:06}_b-{batch_idx:06}.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.disabled and self._due(trainer.global_step) and trainer.global_step != getattr(self, "_done", -1):
            self._done = trainer.global_step  # once per step, also under gradient accumulation
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.disabled and batch_idx == 0 and trainer.global_step > 0 and not trainer.sanity_checking:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")
