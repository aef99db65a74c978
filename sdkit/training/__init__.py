"""Training with Lightning: modules for every sdkit model, a resumable DataModule, callbacks, and the
``sdkit train`` run (CompVis main.py). See :mod:`sdkit.training.run` for the command line.

    sdkit train -b sdkit/configs/recipes/tiny-t2i/stage1.yaml --name tiny

Names are imported on first use, so ``sdkit --help`` does not pay for importing Lightning.
"""
from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "DataModule": "datamodule", "ResumableBatchSampler": "datamodule", "ShardedIterable": "datamodule",
    "collate": "datamodule", "LatentDiffusionModule": "diffusion", "AutoencoderKLModule": "autoencoders",
    "VQModelModule": "autoencoders", "CLIPModule": "clip", "SmallCLIP": "clip",
    "ImageLogger": "callbacks", "PerformanceMonitor": "callbacks", "ResilientCheckpointing": "callbacks",
    "AtomicCheckpointIO": "callbacks",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = sorted(_EXPORTS)
