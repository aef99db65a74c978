"""Configs in the CompVis schema: ``{target: dotted.path, params: {...}}``.

A CompVis YAML works here after swapping ``ldm.*`` targets for ``sdkit.*`` ones; the known CompVis targets are
translated automatically (see ``COMPVIS_TARGETS``), so an unmodified ``v1-inference.yaml`` also loads.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

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


class ConfigError(ValueError):
    """A config that cannot be read or used: the message names the file or key and what to do."""


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
        raise ConfigError(f"expected a config with a 'target' key (and optional 'params'), got {config!r:.200}")
    params = config.get("params") or {}
    if isinstance(params, DictConfig):   # a plain dict whose params are still an omegaconf node
        params = OmegaConf.to_container(params, resolve=True)
    if not isinstance(params, dict):
        raise ConfigError(f"the params of target {config['target']!r} must be a mapping of argument names to "
                          f"values, got {params!r:.100}")
    params = {**params, **extra}
    cls = get_obj_from_str(config["target"])
    check_params(cls, params, config["target"])
    return cls(**params)


def check_params(cls, params: dict, target: str) -> None:
    """Refuse params that ``cls`` cannot take (a mistyped key, a missing required one) in words, before calling
    it: a TypeError from inside the constructor would look like a bug."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # builtins and C extensions without a signature: let the call decide
        return
    try:
        signature.bind(**params)
    except TypeError as e:
        names = [n for n, p in signature.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in params if k not in signature.parameters]
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, names, 1))
                 else repr(k) for k in unknown]
        detail = f"unknown parameter(s) {', '.join(hints)}" if unknown else str(e)
        raise ConfigError(f"config target {target!r}: {detail}; it takes: {', '.join(names)}") from None


def bundled_configs() -> list[str]:
    """Names accepted by ``load_config`` / ``load_model`` without a path: the inference and training configs
    (``"tiny"``), then the stages of model recipes by their folder (``"recipes/tiny-t2i/stage1"``)."""
    names = [p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml")]
    return sorted(names, key=lambda name: (name.count("/"), name))


def load_config(name_or_path: str | Path | dict | DictConfig, overrides: Iterable[str] = ()) -> DictConfig:
    """Load a bundled config by name (``"sd-v1-inference"``) or a YAML file, then apply ``key=value`` overrides."""
    if isinstance(name_or_path, (dict, DictConfig)):
        config = OmegaConf.create(name_or_path)
    elif isinstance(name_or_path, (str, Path)):
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            close = difflib.get_close_matches(str(name_or_path), bundled_configs(), 3)
            raise FileNotFoundError(
                f"no config {str(name_or_path)!r}: give a YAML path or one of the bundled names {bundled_configs()}"
                + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        if path.is_dir():
            raise IsADirectoryError(f"config {str(path)!r} is a folder; give a YAML file")
        config = _read_yaml(path)
    else:
        raise TypeError(f"config must be a bundled config name (e.g. 'sd-v1-inference'), a YAML path or a dict, "
                        f"got {type(name_or_path).__name__} {name_or_path!r:.60}")
    overrides = list(overrides)
    if overrides:
        config = merge([config], overrides, [name_or_path if isinstance(name_or_path, (str, Path)) else "config"])
    return config


def _read_yaml(path: Path) -> DictConfig:
    import yaml

    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if b"\0" in head or head.startswith((b"PK\x03\x04", b"\x89PNG", b"\x80")):
            raise ConfigError(f"config {str(path)!r} is a binary file (a checkpoint or an image?), not a YAML "
                              "config; pass weights with ckpt= (--ckpt)")
        config = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {str(path)!r} is not a text (YAML) file") from None
    if isinstance(config, ListConfig):
        raise ConfigError(f"config {str(path)!r} holds a list; a config is a mapping (model: target: ...)")
    return config


_KEY = re.compile(r"[A-Za-z0-9_][\w\-]*(\.[A-Za-z0-9_][\w\-]*)*")


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``key=value`` dotlist overrides (``model.params.unet_config.params.num_heads=4``), each checked: a dotted
    key of names, then ``=``, then a YAML value."""
    import yaml

    parsed = []
    for item in overrides:
        key, eq, value = str(item).partition("=")
        if not eq or not _KEY.fullmatch(key.strip()):
            raise ConfigError(f"override {item!r} is not key=value with a dotted key (e.g. "
                              "data.params.batch_size=8)" + ("; to add a config file use -b FILE"
                                                             if not eq and item.endswith((".yaml", ".yml")) else ""))
        try:
            parsed.append(OmegaConf.from_dotlist([f"{key.strip()}={value}"]))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") \
                from None
    return OmegaConf.merge(*parsed) if parsed else OmegaConf.create()


def merge(configs: list, overrides: Iterable[str] = (), names: Iterable[str] = ()) -> DictConfig:
    """Merge configs left to right, then ``key=value`` overrides; a clash of kinds (a mapping over a list, a key
    into a value) is refused in words naming the configs."""
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    try:
        return OmegaConf.merge(*configs, parse_overrides(overrides))
    except (TypeError, OmegaConfBaseException) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"the configs {list(names)} and overrides {overrides} do not merge: "
                          f"{' '.join(str(e).split())} (an override sets a key inside a list or a plain value?)") \
            from None


def model_section(config: DictConfig, name: str = "the config") -> DictConfig:
    """The ``model:`` section of a config, with its ``target``; a config without one is refused in words."""
    model = config.get("model") if isinstance(config, DictConfig) else None
    if not isinstance(model, DictConfig) or "target" not in model:
        raise ConfigError(f"{name} has no 'model:' section with a 'target:' (it has: {sorted(config)[:8]}); a "
                          "model config looks like CompVis' v1-inference.yaml: model: {target: ..., params: ...}")
    return model


def merge_configs(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge configs left to right, then dotlist overrides, as CompVis main.py does with ``-b a.yaml -b b.yaml``."""
    paths = list(paths)
    return merge([load_config(p) for p in paths], overrides, paths)
