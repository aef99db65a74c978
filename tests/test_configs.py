"""Bundled configs: names, the tiny model's recipe folder, and that the recipe still describes the shipped model."""
import re

from omegaconf import OmegaConf

import sdkit
from sdkit.config import CONFIG_DIR, merge_configs

RECIPE = CONFIG_DIR / "recipes" / "tiny-t2i"
RELEASED_LINEAGE = ["stage1", "stage2", "stage3", "stage4", "stage5-attn16", "stage7-grounding",
                    "stage8-grounding-low-noise"]


def test_recipe_stages_are_bundled_names_that_load_as_their_files():
    names = sdkit.bundled_configs()
    assert "tiny" in names and "sd-v1-inference" in names
    stages = sorted(p.stem for p in RECIPE.glob("*.yaml"))
    assert [n for n in names if n.startswith("recipes/tiny-t2i/")] == [f"recipes/tiny-t2i/{s}" for s in stages]
    assert set(RELEASED_LINEAGE) < set(stages)
    for stage in stages:
        by_name = sdkit.load_config(f"recipes/tiny-t2i/{stage}")
        assert by_name == OmegaConf.load(RECIPE / f"{stage}.yaml")


def test_released_lineage_merges_to_the_shipped_model():
    """Stages 1-5, 7, 8 merged as their headers say build the architecture of configs/tiny.yaml."""
    merged = merge_configs([f"recipes/tiny-t2i/{s}" for s in RELEASED_LINEAGE]).model.params
    shipped = sdkit.load_config("tiny").model.params
    for part in ("unet_config", "first_stage_config", "cond_stage_config"):
        assert merged[part] == shipped[part], part
    for key in ("linear_start", "linear_end", "timesteps", "image_size", "channels", "conditioning_key"):
        assert merged[key] == shipped[key], key


def test_recipe_readme_and_headers_name_only_files_that_exist():
    readme = (RECIPE / "README.md").read_text()
    stages = {p.name for p in RECIPE.glob("*.yaml")}
    assert {name for name in stages if f"`{name}`" not in readme} == set()
    for path in [RECIPE / "README.md", *RECIPE.glob("*.yaml")]:
        for ref in re.findall(r"\$R/([\w.-]+\.yaml)", path.read_text()):
            assert ref in stages, f"{path.name} names {ref}"
    assert not list(CONFIG_DIR.glob("train-tiny-t2i*.yaml"))  # the stages live only in the recipe folder
