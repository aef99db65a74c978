"""Training add-ons that bring weights of their own (LoRA, textual inversion): only those weights train.

A small add-on defined here adds a learned per-channel bias to the UNet's output through a forward hook, so the
protocol is tested without any LoRA code. Oracles: the base model's weights before the run (they must come back
bit-identical: a frozen parameter is never written), the add-on's weights before the run (they must move), and
the CompVis key list of the model (the checkpoint's state dict must stay exactly that).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sdkit.training import run as run_mod
from sdkit.training.diffusion import ADDON_STATE_KEY, LatentDiffusionModule

ROOT = Path(__file__).resolve().parents[1]


class OutputBias:
    """A training add-on with its own weights: a learned bias added to the UNet's ε output."""

    name = "output_bias"
    weight = 0.0

    def __init__(self, channels: int = 4):
        self.channels = channels

    def setup(self, module) -> None:
        holder = nn.Module()
        holder.bias = nn.Parameter(torch.zeros(self.channels))
        module.addon_modules[self.name] = holder
        module.ldm.model.diffusion_model.register_forward_hook(
            lambda _m, _args, out: out + module.addon_modules[self.name].bias.view(1, -1, 1, 1))

    def trainable_parameters(self, module) -> list[nn.Parameter]:
        return [module.addon_modules[self.name].bias]

    @contextlib.contextmanager
    def watch(self, module, batch, t, drop, cond):
        yield lambda: None


def tiny_config() -> dict:
    config = OmegaConf.load(ROOT / "sdkit" / "configs" / "tiny-test.yaml").model
    config.params.use_ema = True     # the frozen base must not move through the EMA either
    return {"target": config.target, "params": config.params}


def test_an_addon_with_weights_trains_only_them():
    torch.manual_seed(0)
    module = LatentDiffusionModule(tiny_config(), addons={"bias": {"target": "test_training_addons.OutputBias"}})
    bias = module.addon_modules["output_bias"].bias
    assert module.trainable_parameters() == [bias]
    assert not any(p.requires_grad for p in module.ldm.parameters())
    # the model's own state dict is untouched by the add-on; the Lightning module holds the add-on's weights
    assert all(not k.startswith("addon_modules") for k in module.ldm.state_dict())
    assert "addon_modules.output_bias.bias" in module.state_dict()
    # without add-ons nothing changes: the whole UNet trains
    plain = LatentDiffusionModule(tiny_config())
    assert len(plain.trainable_parameters()) == len(list(plain.ldm.model.parameters()))


def test_a_run_with_an_addon_keeps_the_base_weights_and_checkpoints_the_addon(tmp_path):
    torch.set_num_threads(1)
    cfg = {
        "model": {"params": {"use_ema": True, "first_stage_key": "image", "cond_stage_key": "caption",
                             "image_size": 4},
                  "base_learning_rate": 1.0e-2,
                  "training": {"addons": {"bias": {"target": "test_training_addons.OutputBias"}}}},
        "data": {"target": "sdkit.training.DataModule",
                 "params": {"batch_size": 4, "num_workers": 0,
                            "train": {"target": "sdkit.data.shapes.ShapesDataset",
                                      "params": {"length": 8, "size": 8}}}},
        "lightning": {"trainer": {"max_steps": 3, "accelerator": "cpu", "enable_progress_bar": False,
                                  "enable_model_summary": False, "num_sanity_val_steps": 0,
                                  "limit_val_batches": 0},
                      "callbacks": {"image_logger": {"params": {"disabled": True}}}},
    }
    torch.manual_seed(1)
    base = LatentDiffusionModule(tiny_config()).ldm.state_dict()
    torch.save(base, tmp_path / "base.ckpt")
    cfg["model"]["training"]["init_from"] = str(tmp_path / "base.ckpt")
    config = tmp_path / "addon.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    logdir = tmp_path / "logs"
    args = ["-b", "tiny-test", "-b", str(config), "--name", "addon", "-l", str(logdir), "--scale_lr", "false"]
    assert run_mod.main(args) == 0
    (run_dir,) = logdir.iterdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    # the base: bit-identical weights and EMA copies to the ones the run started from
    state = checkpoint["state_dict"]
    assert set(state) == set(base)                         # the CompVis keys, no add-on key among them
    assert [k for k in base if not k.endswith("num_updates") and not torch.equal(state[k], base[k])] == []
    # the add-on's weights trained (lr 1e-2: Adam's first step moves each weight by the rate) and are kept
    trained = checkpoint[ADDON_STATE_KEY]["addon_modules.output_bias.bias"]
    assert trained.abs().max() > 5e-3
    # a module built again and given the checkpoint gets them back (what --resume does)
    again = LatentDiffusionModule(tiny_config(), addons=[OutputBias()])
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.equal(again.addon_modules["output_bias"].bias.detach(), trained)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
