"""Training a LoRA with ``sdkit train``: an add-on of :class:`~sdkit.training.diffusion.LatentDiffusionModule`.

    model:
      training:
        init_from: data/tiny.safetensors         # the base model (frozen)
        addons:
          lora: {target: sdkit.lora.training.LoRATraining, params: {rank: 8}}

At setup the add-on puts a new LoRA on the model (``sdkit.lora.create_lora``: A random, B zero, so training starts
from the base model) or continues one from a file (``init_lora``), and registers its layers with the Lightning
module; the module then optimises only them and leaves the base weights as they were (see ``addons`` in
``LatentDiffusionModule``). Every checkpoint and the end of the run write the LoRA file, kohya layout by default,
to ``<run>/lora/<filename>`` plus a copy named by the step (``lora-step000500.safetensors``): the file
``sdkit generate --lora`` and diffusers' ``load_lora_weights`` read. Images logged during the run are sampled with
the LoRA on.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .apply import LoRA, create_lora, load_lora
from .targets import ATTENTION_PROJECTIONS


class LoRATraining:
    """Train a LoRA on the frozen model.

    Args:
        rank, alpha: the LoRA's rank r and α (default α = r: the update is B·A).
        layers: UNet layers by the end of their names (default the attention projections of attn1 and attn2).
        text_encoder_layers: CLIP text layers to train as well (needs ``cache_text: false``; not for MiniLM).
        init_lora: a LoRA file to continue training from (its rank and layers; ``rank``/``layers`` are ignored).
        seed: seed of A's random start.
        layout: "kohya" or "diffusers", the layout of the written file; dtype: "float16" or "float32".
        filename: name of the file in ``<run>/lora/``.
    """

    name = "lora"
    weight = 0.0      # the LoRA trains on the diffusion loss itself: no extra loss

    def __init__(self, rank: int = 4, alpha: float | None = None, layers=ATTENTION_PROJECTIONS,
                 text_encoder_layers=(), init_lora: str | None = None, seed: int = 0, layout: str = "kohya",
                 dtype: str = "float16", filename: str = "lora.safetensors"):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if not str(filename).endswith(".safetensors"):
            raise ValueError(f"filename must end in .safetensors, got {filename!r}")
        self.rank, self.alpha, self.seed = int(rank), alpha, int(seed)
        self.layers, self.text_encoder_layers = tuple(layers), tuple(text_encoder_layers)
        self.init_lora, self.layout, self.dtype, self.filename = init_lora, layout, getattr(torch, dtype), filename
        self.lora: LoRA | None = None

    def setup(self, module) -> None:
        if self.text_encoder_layers and module.cache_text:
            raise ValueError("training text-encoder LoRA layers needs the text states computed at every step: set "
                             "model.training.cache_text: false (cached states carry no gradient)")
        if self.init_lora:
            self.lora = load_lora(module.ldm, self.init_lora)
        else:
            self.lora = create_lora(module.ldm, self.rank, self.alpha, layers=self.layers,
                                    text_encoder_layers=self.text_encoder_layers, seed=self.seed)
        module.addon_modules[self.name] = self.lora.layers

    def trainable_parameters(self, module) -> list[torch.nn.Parameter]:
        return list(self.lora.parameters())

    @contextlib.contextmanager
    def watch(self, module, batch, t, drop, cond):
        yield lambda: None

    # ------------------------------------------------------------------ the file
    def folder(self, module) -> Path | None:
        trainer = getattr(module, "_trainer", None)
        return None if trainer is None else Path(trainer.default_root_dir) / "lora"

    def write(self, module) -> Path | None:
        """Write the LoRA file (rank zero only); returns its path."""
        folder = self.folder(module)
        if folder is None or not module.trainer.is_global_zero:
            return None
        path = self.lora.save(folder / self.filename, self.layout, self.dtype)
        step = Path(self.filename).stem + f"-step{module.global_step:06d}.safetensors"
        self.lora.save(folder / step, self.layout, self.dtype)
        return path

    def on_save_checkpoint(self, module, checkpoint: dict) -> None:
        self.write(module)

    def on_fit_end(self, module) -> None:
        path = self.write(module)
        if path is not None:
            print(f"LoRA: {path} ({path.stat().st_size / 1e6:.2f} MB, rank {self.lora.rank}, "
                  f"{len(self.lora.targets)} layers)")
