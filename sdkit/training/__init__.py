"""Training with Lightning: modules for every sdkit model, a resumable DataModule, callbacks, and the
``sdkit train`` run (CompVis main.py). See :mod:`sdkit.training.run` for the command line.

    sdkit train -b sdkit/configs/train-tiny-t2i.yaml --name tiny

Names are imported on first use, so ``sdkit --help`` does not pay for importing Lightning.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataModule": "datamodule", "ResumableBatchSampler": "datamodule", "ShardedIterable": "datamodule",
    "collate": "datamodule", "LatentDiffusionModule": "diffusion", "AutoencoderKLModule": "autoencoders",
    "VQModelModule": "autoencoders", "CLIPModule": "clip", "SmallCLIP": "clip",
    "ImageLogger": "callbacks", "PerformanceMonitor": "callbacks", "ResilientCheckpointing": "callbacks",
    "AtomicCheckpointIO": "callbacks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sdkit.training' has no attribute {name!r}")
