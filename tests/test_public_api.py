"""The public surface: `import sdkit` offers the verbs, the lazy packages list their names for tab-completion,
every listed name resolves, and importing the package does not import torch."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import sdkit

PACKAGES = ["sdkit", "sdkit.nn", "sdkit.pipelines", "sdkit.training"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_listed_name_resolves_and_dir_lists_it(package):
    module = importlib.import_module(package)
    listed = set(dir(module))
    for name in module.__all__:
        assert name in listed, name
        assert getattr(module, name) is not None, name


def test_the_verbs_are_one_attribute_away():
    from sdkit.pipelines import img2img, inpaint, outpaint, txt2img, upscale
    from sdkit.samplers import sample
    assert (sdkit.txt2img, sdkit.img2img, sdkit.inpaint, sdkit.outpaint, sdkit.upscale) == \
        (txt2img, img2img, inpaint, outpaint, upscale)
    assert sdkit.samplers.sample is sample and sdkit.load_model is sdkit.checkpoints.load_model
    assert {"txt2img", "load_model", "samplers", "nn"} <= set(dir(sdkit))
    with pytest.raises(AttributeError, match="has no attribute 'txt2image'"):
        sdkit.txt2image


def test_import_sdkit_does_not_import_torch():
    code = "import sys, sdkit, sdkit.pipelines, sdkit.nn; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
