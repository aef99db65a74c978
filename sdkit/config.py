"""Configs in the CompVis schema: ``{target: dotted.path, params: {...}}``.

A CompVis YAML works here after swapping ``ldm.*`` targets for ``sdkit.*`` ones; the known CompVis targets are
translated automatically (see ``COMPVIS_TARGETS``), so an unmodified ``v1-inference.yaml`` also loads.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent / "configs"

# CompVis class paths -> sdkit class paths, so scripts and YAML written for `ldm` port by changing nothing.
COMPVIS_TARGETS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": "sdkit.diffusion.LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": "sdkit.diffusion.LatentInpaintDiffusion",
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": "sdkit.nn.unet.UNetModel",
    "ldm.models.autoencoder.AutoencoderKL": "sdkit.nn.autoencoder.AutoencoderKL",
    "ldm.models.autoencoder.VQModel": "sdkit.nn.autoencoder.VQModel",
    "ldm.models.autoencoder.VQModelInterface": "sdkit.nn.autoencoder.VQModelInterface",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "sdkit.nn.text.FrozenCLIPEmbedder",
    "ldm.modules.encoders.modules.BERTEmbedder": "sdkit.nn.text.BERTEmbedder",
    "ldm.modules.encoders.modules.TransformerEmbedder": "sdkit.nn.text.TransformerEmbedder",
    "ldm.modules.encoders.modules.ClassEmbedder": "sdkit.nn.text.ClassEmbedder",
    "ldm.modules.encoders.modules.SpatialRescaler": "sdkit.nn.rescaler.SpatialRescaler",
    "ldm.modules.losses.LPIPSWithDiscriminator": "sdkit.nn.losses.LPIPSWithDiscriminator",
    "ldm.modules.losses.contperceptual.LPIPSWithDiscriminator": "sdkit.nn.losses.LPIPSWithDiscriminator",
    "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": "sdkit.nn.losses.VQLPIPSWithDiscriminator",
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": "sdkit.nn.losses.VQLPIPSWithDiscriminator",
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler": "sdkit.lr_schedulers.LambdaWarmUpCosineScheduler",
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2": "sdkit.lr_schedulers.LambdaWarmUpCosineScheduler2",
    "ldm.lr_scheduler.LambdaLinearScheduler": "sdkit.lr_schedulers.LambdaLinearScheduler",
    "main.DataModuleFromConfig": "sdkit.training.DataModule",
}


def get_obj_from_str(path: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``, with an error that says what could not be found."""
    path = COMPVIS_TARGETS.get(path, path)
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"target {path!r} is not a dotted path like 'sdkit.nn.unet.UNetModel'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ImportError(f"cannot import module {module_name!r} for target {path!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (target {path!r})") from e


def instantiate_from_config(config: Any, **extra: Any) -> Any:
    """Build ``target(**params, **extra)``. The CompVis markers ``__is_first_stage__`` and
    ``__is_unconditional__`` return None, as in ldm (the caller decides what they mean)."""
    if config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, dict) or "target" not in config:
        raise KeyError(f"expected a config with a 'target' key (and optional 'params'), got {config!r}")
    params = dict(config.get("params") or {})
    params.update(extra)
    return get_obj_from_str(config["target"])(**params)


def bundled_configs() -> list[str]:
    """Names accepted by ``load_config`` / ``load_model`` without a path: the inference and training configs
    (``"tiny"``), then the stages of model recipes by their folder (``"recipes/tiny-t2i/stage1"``)."""
    names = [p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml")]
    return sorted(names, key=lambda name: (name.count("/"), name))


def load_config(name_or_path: str | Path | dict | DictConfig, overrides: Iterable[str] = ()) -> DictConfig:
    """Load a bundled config by name (``"sd-v1-inference"``) or a YAML file, then apply ``key=value`` overrides."""
    if isinstance(name_or_path, (dict, DictConfig)):
        config = OmegaConf.create(name_or_path)
    else:
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise FileNotFoundError(
                f"no config {str(name_or_path)!r}: give a YAML path or one of the bundled names {bundled_configs()}"
            )
        config = OmegaConf.load(path)
    overrides = list(overrides)
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
    return config


def merge_configs(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge configs left to right, then dotlist overrides, as CompVis main.py does with ``-b a.yaml -b b.yaml``."""
    configs = [load_config(p) for p in paths]
    return OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
