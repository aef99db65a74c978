"""Generation parameters in PNGs: the A1111 "parameters" chunk written by PipelineResult.save, checked by a small
parser written here the way A1111-style readers (web UIs, image browsers) split the text, and sdkit's own record
read back exactly."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import sdkit
from sdkit.pipelines.metadata import parse_a1111, read_parameters


def a1111_reader(text: str) -> dict:
    """An independent reader in the A1111 style: last line = key: value pairs; "Negative prompt:" line; the rest
    is the prompt."""
    *head, last = text.split("\n")
    fields = dict(re.findall(r'\s*([\w ]+): ("[^"]*"|[^,]*)', last))
    fields = {k: v.strip('"') for k, v in fields.items()}
    negative = [line for line in head if line.startswith("Negative prompt: ")]
    prompt = "\n".join(line for line in head if not line.startswith("Negative prompt: "))
    return {"prompt": prompt, "negative": negative[0][len("Negative prompt: "):] if negative else "", **fields}


@pytest.fixture(scope="module")
def model():
    return sdkit.load_model("tiny")


def test_saved_pngs_carry_a1111_parameters_and_the_sdkit_record(model, tmp_path):
    result = sdkit.txt2img(model, "a red circle", negative_prompt="a blue square", steps=3, guidance_scale=5,
                           seed=11, num_images=2, sampler="euler", karras=True, progress=False)
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["00000-11.png", "00001-12.png"]
    for path, seed, image in zip(paths, (11, 12), result.images):
        with Image.open(path) as png:
            text = png.info["parameters"]
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(image))
        seen = a1111_reader(text)
        assert seen["prompt"] == "a red circle" and seen["negative"] == "a blue square"
        assert (seen["Steps"], seen["Sampler"], seen["CFG scale"], seen["Seed"], seen["Size"]) == \
            ("3", "Euler Karras", "5", str(seed), "64x64")
        assert seen["Model"] == "tiny" and re.fullmatch(r"[0-9a-f]{10}", seen["Model hash"])
        record = read_parameters(path)
        assert record["seed"] == seed and record["sampler"] == "euler" and record["karras"] is True
        assert parse_a1111(text)["Seed"] == str(seed)
    with pytest.raises(FileExistsError, match="would overwrite"):
        result.save(tmp_path)


def test_quoted_values_and_img2img_strength_round_trip(model, tmp_path):
    start = sdkit.txt2img(model, "a green star", steps=2, seed=1, progress=False).images[0]
    result = sdkit.img2img(model, start, "a star, green: bright", strength=0.5, steps=4, seed=2, progress=False,
                           guidance_scale=1.0)
    (path,) = result.save(tmp_path, name="edit-{index}.png")
    parsed = parse_a1111(Image.open(path).info["parameters"])
    assert parsed["prompt"] == "a star, green: bright" and parsed["negative_prompt"] == ""
    assert parsed["Denoising strength"] == "0.5" and parsed["CFG scale"] == "1"
    assert read_parameters(path)["verb"] == "img2img"
    assert parse_a1111('x\nSteps: 2, Model: "a, b"')["Model"] == "a, b"     # a quoted value with a comma


def test_sdkit_generate_writes_parameters_that_sdkit_info_and_an_a1111_reader_read(tmp_path, capsys):
    from sdkit.cli import main

    assert main(["generate", "two yellow stars", "--negative", "red", "--steps", "3", "--seed", "9",
                 "--guidance", "4", "--sampler", "ddim", "--out", str(tmp_path), "--no-progress"]) == 0
    (path,) = tmp_path.glob("*.png")
    seen = a1111_reader(Image.open(path).info["parameters"])
    assert (seen["prompt"], seen["negative"], seen["Steps"], seen["Sampler"], seen["CFG scale"], seen["Seed"],
            seen["Size"]) == ("two yellow stars", "red", "3", "DDIM", "4", "9", "64x64")
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert "Sampler: DDIM" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
