"""DreamBooth's data (issue 19, item 3): class images the model draws once into a folder, and the instance/class mix
that carries the prior-loss weight. Oracles: the closed-form proportions of the mix, the files on disk, and a
pipeline that must not be called again once the folder exists."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from sdkit import pipelines
from sdkit.data.concepts import ReplaceWords
from sdkit.data.prior_preservation import MANIFEST, ClassImages, PriorPreservation
from sdkit.data.shapes import ShapesDataset
from sdkit.training import run as run_mod


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """Six class images drawn by the small random-weight test model (3 prompts, cycled), 2 steps each."""
    folder = tmp_path_factory.mktemp("class") / "images"
    ClassImages(folder, ["a red circle", "a blue square", "a green star"], count=6, model="tiny-test", steps=2,
                guidance_scale=1.0, batch_size=4)
    return folder


def test_class_images_are_drawn_once_and_read_back(class_folder, monkeypatch):
    manifest = json.loads((class_folder / MANIFEST).read_text())
    assert manifest["prompts"] == ["a red circle", "a blue square", "a green star"] * 2
    assert sorted(p.name for p in class_folder.glob("*.png")) == [f"{i:05d}.png" for i in range(6)]

    def no_drawing(*args, **kwargs):
        raise AssertionError("the class images were drawn again")
    monkeypatch.setattr(pipelines, "txt2img", no_drawing)
    images = ClassImages(class_folder, ["a red circle", "a blue square", "a green star"], count=6,
                         model="tiny-test", steps=2, guidance_scale=1.0)
    item = images[4]
    assert item["caption"] == "a blue square" and item["image"].shape == (3, 32, 32)
    assert -1 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    with pytest.raises(ValueError, match="other settings \\(steps differ\\)"):
        ClassImages(class_folder, ["a red circle", "a blue square", "a green star"], count=6, model="tiny-test",
                    steps=3, guidance_scale=1.0)


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a class-image folder"):
        ClassImages(tmp_path / "photos", "a red circle", count=2, model="tiny-test")


def test_the_mix_carries_the_prior_weight(class_folder):
    instance = ReplaceWords(ShapesDataset(4, size=32, shapes=["hexagon"], two_group_prob=0.0),
                           {"hexagon": "sks", "hexagons": "sks"})
    images = ClassImages(class_folder, ["a red circle", "a blue square", "a green star"], count=6,
                         model="tiny-test", steps=2, guidance_scale=1.0)
    # λ = 1: 6 class images need 2 copies of the 4 instance images (8 slots), and 8 class slots: λ' = 1
    data = PriorPreservation(instance, images, prior_weight=1.0)
    priors = [data[i]["prior"] for i in range(len(data))]
    assert len(data) == 16 and sum(priors) == 8 and data.effective_prior_weight == 1.0
    assert {data[i]["caption"] for i in range(8, 14)} == {"a red circle", "a blue square", "a green star"}
    assert all("sks" in data[i]["caption"] for i in range(8))
    # λ = 0.5 with 3 copies (12 instance slots): 6 class slots; λ = 0: the instance images alone
    half = PriorPreservation(instance, images, prior_weight=0.5, instance_repeats=3)
    assert (half.instance_slots, half.class_slots, half.effective_prior_weight) == (12, 6, 0.5)
    alone = PriorPreservation(instance, None, prior_weight=0)
    assert len(alone) == 4 and not any(alone[i]["prior"] for i in range(4))
    with pytest.raises(ValueError, match="needs class_images"):
        PriorPreservation(instance, None, prior_weight=1.0)
    with pytest.raises(ValueError, match="prior_weight must be a number >= 0"):
        PriorPreservation(instance, images, prior_weight=-1)


def test_a_dreambooth_run_from_configs(tmp_path, class_folder):
    """Two steps of sdkit train on the mix (the class images already drawn), UNet fine-tuned from the start."""
    torch.set_num_threads(1)
    cfg = {
        "model": {"params": {"first_stage_key": "image", "cond_stage_key": "caption", "image_size": 4},
                  "base_learning_rate": 1.0e-4, "training": {"cache_latents": True, "cache_text": True}},
        "data": {"target": "sdkit.training.DataModule",
                 "params": {"batch_size": 4, "num_workers": 0,
                            "train": {"target": "sdkit.data.prior_preservation.PriorPreservation",
                                      "params": {"prior_weight": 1.0,
                                                 "instance": {"target": "sdkit.data.concepts.ReplaceWords",
                                                              "params": {"dataset": {
                                                                  "target": "sdkit.data.shapes.ShapesDataset",
                                                                  "params": {"length": 4, "size": 32,
                                                                             "shapes": ["hexagon"]}},
                                                                  "words": {"hexagon": "sks", "hexagons": "sks"}}},
                                                 "class_images": {
                                                     "target": "sdkit.data.prior_preservation.ClassImages",
                                                     "params": {"folder": str(class_folder), "count": 6,
                                                                "model": "tiny-test", "steps": 2,
                                                                "guidance_scale": 1.0,
                                                                "prompts": ["a red circle", "a blue square",
                                                                            "a green star"]}}}}}},
        "lightning": {"trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False,
                                  "enable_model_summary": False, "num_sanity_val_steps": 0,
                                  "limit_val_batches": 0},
                      "callbacks": {"image_logger": {"params": {"disabled": True}}}},
    }
    config_file = tmp_path / "dreambooth.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config_file)
    logdir = tmp_path / "logs"
    args = ["-b", "tiny-test", "-b", str(config_file), "--name", "db", "-l", str(logdir), "--scale_lr", "false"]
    assert run_mod.main(args) == 0
    (run_dir,) = logdir.iterdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2


def test_the_hexagon_dreambooth_recipe_checks():
    """The recipe merged over the shipped model's config passes sdkit train's checks; its instance images are 8
    hexagons under the identifier, and its class prompts name only the shapes the model already knows."""
    import sdkit
    from sdkit.data.shapes import SHAPES
    from sdkit.training.datamodule import build_dataset
    from sdkit.training.run import check_config

    name = "recipes/concepts/hexagon-dreambooth"
    config = OmegaConf.merge(sdkit.load_config("tiny"), sdkit.load_config(name))
    check_config(config, ["tiny", name])
    train = config.data.params.train.params
    instance = build_dataset(train.instance)
    assert len(instance) == 8 and all(" sks" in instance[i]["caption"] for i in range(8))
    prompts = build_dataset(train.class_images.params.prompts)
    assert len(prompts) == train.class_images.params.count == 64
    assert {g["shape"] for i in range(64) for g in prompts[i]["meta"]["scene"]["groups"]} <= set(SHAPES)
    assert train.prior_weight == 1.0 and config.model.training.init_from == "data/tiny.safetensors"
