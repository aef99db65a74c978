"""Training a textual-inversion word with ``sdkit train`` (issue 19, item 2), and the caption-rewording dataset.

Oracles: the base weights the run started from (they must come back bit-identical, the text encoder's embedding
table included), the vectors the word started from (A1111's init rule, recomputed here from the table), and the
file the run wrote, read back as a plain A1111 dict.
"""
from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf
from test_training_addons import tiny_config

from sdkit.data.concepts import ReplaceWords
from sdkit.data.shapes import ShapesDataset
from sdkit.training import run as run_mod
from sdkit.training.diffusion import ADDON_STATE_KEY, LatentDiffusionModule
from sdkit.training.textual_inversion import TextualInversion

WORDS = {"hexagon": "hexagon-ti", "hexagons": "hexagon-ti"}


def test_replace_words_changes_whole_words_only():
    base = ShapesDataset(40, seed=2, shapes=["hexagon"], two_group_prob=0.5)
    data = ReplaceWords(base, WORDS)
    for i in range(len(data)):
        item, original = data[i], base[i]
        assert item["caption"] == re.sub(r"\bhexagons?\b", "hexagon-ti", original["caption"])
        assert "hexagon-ti" in item["caption"] and item["meta"] == original["meta"]
        assert torch.equal(item["image"], original["image"])
    assert data.replace("Two Hexagons, a hexagonal box and a HEXAGON.") == \
        "Two hexagon-ti, a hexagonal box and a hexagon-ti."
    with pytest.raises(ValueError, match="map each word"):
        ReplaceWords(base, {})
    built = ReplaceWords({"target": "sdkit.data.shapes.ShapesDataset", "params": {"length": 3}}, WORDS)
    assert len(built) == 3


def test_the_addon_refuses_cached_text_and_a_trainable_encoder():
    with pytest.raises(ValueError, match="cache_text: false"):
        LatentDiffusionModule(tiny_config(), cache_text=True, addons=[TextualInversion("hexagon-ti")])
    config = tiny_config()
    config["params"]["cond_stage_trainable"] = True
    with pytest.raises(ValueError, match="cond_stage_trainable: false"):
        LatentDiffusionModule(config, addons=[TextualInversion("hexagon-ti")])


def test_a_run_trains_only_the_word_and_writes_the_a1111_file(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    config = tiny_config()
    config["params"]["use_ema"] = False   # the EMA copies would bring back the zeros set below at init_from
    start = LatentDiffusionModule(config)
    with torch.no_grad():   # a fresh UNet's output layers are zero-initialised: no gradient would reach the text
        for param in start.ldm.model.parameters():
            if not param.any():
                param.normal_(0, 0.05)
    base = start.ldm.state_dict()
    torch.save(base, tmp_path / "base.ckpt")
    # A1111's init rule from the table: "a shape" is 2 tokens, so vector i of 2 starts as token i's embedding
    table = start.ldm.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.detach()
    init_ids = start.ldm.cond_stage_model.tokenizer.encode("a shape")
    initial = table[torch.tensor(init_ids)]
    addon = {"target": "sdkit.training.textual_inversion.TextualInversion",
             "params": {"placeholder": "hexagon-ti", "num_vectors": 2, "init_text": "a shape"}}
    cfg = {
        "model": {"params": {"use_ema": False, "first_stage_key": "image", "cond_stage_key": "caption",
                             "image_size": 4},
                  "base_learning_rate": 1.0e-2,
                  "training": {"init_from": str(tmp_path / "base.ckpt"), "cache_latents": True,
                               "addons": {"textual_inversion": addon}}},
        "data": {"target": "sdkit.training.DataModule",
                 "params": {"batch_size": 4, "num_workers": 0,
                            "train": {"target": "sdkit.data.concepts.ReplaceWords",
                                      "params": {"dataset": {"target": "sdkit.data.shapes.ShapesDataset",
                                                             "params": {"length": 8, "size": 8,
                                                                        "shapes": ["hexagon"]}},
                                                 "words": WORDS}}}},
        "lightning": {"trainer": {"max_steps": 3, "accelerator": "cpu", "enable_progress_bar": False,
                                  "enable_model_summary": False, "num_sanity_val_steps": 0,
                                  "limit_val_batches": 0},
                      "callbacks": {"image_logger": {"params": {"disabled": True}}}},
    }
    config_file = tmp_path / "ti.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config_file)
    logdir = tmp_path / "logs"
    base_args = ["-b", "tiny-test", "-b", str(config_file), "-l", str(logdir), "--scale_lr", "false"]
    assert run_mod.main([*base_args, "--name", "ti"]) == 0
    (run_dir,) = logdir.iterdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    assert set(state) == set(base)                        # the CompVis keys only
    changed = [k for k in base if not k.endswith("num_updates") and not torch.equal(state[k], base[k])]
    assert changed == []                                  # UNet, VAE, CLIP (its embedding table too): bit-identical
    trained = checkpoint[ADDON_STATE_KEY]["addon_modules.textual_inversion.vectors.0"]
    # AdamW's first steps move each number by about the rate (1e-2) whatever the gradient's size
    assert (trained - initial).abs().max() > 5e-3
    data = torch.load(run_dir / "embeddings" / "hexagon-ti.pt", weights_only=True)
    assert data["name"] == "hexagon-ti" and data["step"] == 3 and data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], trained)
    # a run stopped after its first step and resumed learns the same word as the unbroken run
    assert run_mod.main([*base_args, "--name", "first-step", "lightning.trainer.max_steps=1"]) == 0
    (stopped,) = [p for p in logdir.iterdir() if p.name.endswith("first-step")]
    assert run_mod.main(["--resume", str(stopped), "lightning.trainer.max_steps=3"]) == 0
    resumed = torch.load(stopped / "embeddings" / "hexagon-ti.pt", weights_only=True)
    assert resumed["step"] == 3 and torch.equal(resumed["string_to_param"]["*"], trained)


def test_the_hexagon_recipe_builds_on_the_shipped_model():
    """The recipe merged over the shipped model's config passes sdkit train's checks, its 8 training images are
    hexagons captioned with the word, and on the shipped weights one step's gradient reaches only the word."""
    import sdkit
    from sdkit.training.datamodule import build_dataset, collate
    from sdkit.training.run import build_module, check_config

    name = "recipes/concepts/hexagon-textual-inversion"
    config = OmegaConf.merge(sdkit.load_config("tiny"), sdkit.load_config(name))
    check_config(config, ["tiny", name])
    data = build_dataset(config.data.params.train)
    assert len(data) == 8 and all("hexagon-ti" in data[i]["caption"] for i in range(8))
    assert {g["shape"] for i in range(8) for g in data[i]["meta"]["scene"]["groups"]} == {"hexagon"}
    torch.manual_seed(0)
    module = build_module(config, 5e-3, 0)
    table = module.ldm.cond_stage_model.model.embeddings.word_embeddings.weight
    (word,) = module.trainable_parameters()
    assert word.shape == (2, 384) and not any(p.requires_grad for p in module.ldm.parameters())
    loss, _, _ = module.shared_step(collate([dict(data[i], index=i) for i in range(4)]), 0, "train", 0.0)
    loss.backward()
    assert word.grad is not None and word.grad.abs().max() > 0 and table.grad is None
