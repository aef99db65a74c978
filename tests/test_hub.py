"""find_sd_v1_weights looks where huggingface_hub stores downloads (a fake cache here) and never downloads."""
import pytest
from huggingface_hub import hf_hub_download

from sdkit.hub import find_sd_v1_weights


def fake_cache(root, repo, filename):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_nothing_cached_means_none(tmp_path, monkeypatch):
    monkeypatch.delenv("SDKIT_SD_V1_WEIGHTS", raising=False)
    assert find_sd_v1_weights(cache_dir=tmp_path) is None


def test_single_file_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SDKIT_SD_V1_WEIGHTS", raising=False)
    path = fake_cache(tmp_path, "runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
    assert find_sd_v1_weights(cache_dir=tmp_path) == path
    # the same answer huggingface_hub itself gives offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hf_hub_download("runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
                           cache_dir=tmp_path) == str(path)


def test_diffusers_folder_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SDKIT_SD_V1_WEIGHTS", raising=False)
    unet = fake_cache(tmp_path, "CompVis/stable-diffusion-v1-4", "unet/diffusion_pytorch_model.safetensors")
    assert find_sd_v1_weights(cache_dir=tmp_path) == unet.parents[1]


def test_environment_variable_wins_and_must_exist(tmp_path, monkeypatch):
    file = tmp_path / "mine.safetensors"
    file.write_bytes(b"x")
    monkeypatch.setenv("SDKIT_SD_V1_WEIGHTS", str(file))
    assert find_sd_v1_weights(cache_dir=tmp_path) == file
    monkeypatch.setenv("SDKIT_SD_V1_WEIGHTS", str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match="SDKIT_SD_V1_WEIGHTS"):
        find_sd_v1_weights(cache_dir=tmp_path)
