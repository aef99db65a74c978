"""``sdkit train``: config-driven Lightning runs, as CompVis main.py.

    sdkit train -b sdkit/configs/recipes/tiny-t2i/stage1.yaml [-b more.yaml ...] [key=value ...] [--name NAME]
    sdkit train --resume logs/2024-01-01T12-00-00_tiny          # or a .ckpt file

Configs merge left to right, then the ``key=value`` overrides (OmegaConf dotlist). A run lives in
``<logdir>/<timestamp>_<name>/``: ``configs/`` (the merged project and lightning configs), ``checkpoints/``
(``last.ckpt``, the best by the model's monitor, ``on_exception.ckpt`` after a crash), ``images/``, ``metrics.csv``.
``--resume`` restores everything (weights, optimizer, LR schedule, EMA, step, data position) and continues in
the same folder; the resumed run computes exactly what the unbroken run would have.

Config sections: ``model`` (base_learning_rate, target, params, and ``training`` options of the Lightning
wrapper), ``data`` (target/params, e.g. sdkit.training.DataModule) and ``lightning`` (``trainer``: Trainer
arguments; ``callbacks``: name → {target, params}, merged over the defaults; ``logger``).
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import glob
import inspect
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, get_obj_from_str, instantiate_from_config, merge_configs

RUN_DIR_ENV = "SDKIT_RUN_DIR"  # lets DDP ranks that Lightning starts find rank 0's run folder


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CompVis main.py options that make sense here."""
    parser.add_argument("-b", "--base", nargs="+", action="append", default=[], metavar="CONFIG",
                        help="config YAML paths or bundled names, merged left to right (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotlist overrides applied after the configs, e.g. data.params.batch_size=8")
    parser.add_argument("-n", "--name", default="", help="run name (default: the last config's file name)")
    parser.add_argument("-r", "--resume", default="", metavar="RUN_OR_CKPT",
                        help="a run folder (continues from checkpoints/last.ckpt) or a checkpoint file")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed of weights, data order and noise")
    parser.add_argument("-l", "--logdir", default="logs", help="folder that holds the run folders")
    parser.add_argument("-f", "--postfix", default="", help="appended to the run folder name")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=None,
                        help="lr = accumulate_grad_batches × devices × batch_size × base_learning_rate (the "
                             "CompVis default); false: lr = base_learning_rate. Default: the config's top-level "
                             "scale_lr key, else true")
    return parser


# ================================================================================================ run folder


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """(run folder, checkpoint) for ``--resume``; a checkpoint must be complete (clear error otherwise)."""
    from .callbacks import LAST, check_checkpoint_file

    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume!r}: no such run folder or checkpoint")
    if path.is_file():
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        run_dir, ckpt = path, path / "checkpoints" / LAST
        if not ckpt.exists():
            raise FileNotFoundError(f"--resume {resume!r}: the run folder has no checkpoints/{LAST} yet")
    check_checkpoint_file(ckpt)
    return run_dir, ckpt


def _launcher_run_id() -> str | None:
    """A name all processes of an external launch agree on (SLURM job, torchrun rendezvous), or None."""
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            return f"{var.split('_')[0].lower()}{value}"
    return None


def make_run_dir(args, base_paths: list[str]) -> Path:
    if not _is_rank_zero() and os.environ.get(RUN_DIR_ENV):  # a DDP rank started by rank 0's Lightning
        return Path(os.environ[RUN_DIR_ENV])
    name = args.name or (Path(base_paths[-1]).stem if base_paths else "run")
    stamp = _launcher_run_id() or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    return Path(args.logdir) / f"{stamp}_{name}{args.postfix}"


# ================================================================================================ building


# plain model class -> its Lightning wrapper
WRAPPERS = [
    ("sdkit.diffusion.LatentDiffusion", "sdkit.training.diffusion.LatentDiffusionModule"),
    ("sdkit.nn.autoencoder.VQModel", "sdkit.training.autoencoders.VQModelModule"),
    ("sdkit.nn.autoencoder.AutoencoderKL", "sdkit.training.autoencoders.AutoencoderKLModule"),
    ("sdkit.training.clip.SmallCLIP", "sdkit.training.clip.CLIPModule"),
]


def build_module(config: DictConfig, learning_rate: float, seed: int):
    """The LightningModule for ``config.model``: a LightningModule target is built as is; a plain sdkit model
    (LatentDiffusion, AutoencoderKL, VQModel, SmallCLIP) gets its training wrapper, with ``model.training`` options."""
    import lightning as L

    model_cfg = OmegaConf.to_container(config.model, resolve=True)
    training = dict(model_cfg.pop("training", None) or {})
    model_cfg.pop("base_learning_rate", None)
    cls = get_obj_from_str(model_cfg["target"])
    if issubclass(cls, L.LightningModule):
        module = instantiate_from_config(model_cfg, **training)
        module.learning_rate, module.seed = learning_rate, seed
        return module
    for base, wrapper in WRAPPERS:
        if issubclass(cls, get_obj_from_str(base)):
            return get_obj_from_str(wrapper)(model=model_cfg, learning_rate=learning_rate, seed=seed, **training)
    raise TypeError(f"sdkit train does not know how to train {cls.__name__}: give a LightningModule target or "
                    f"one of {[b.rsplit('.', 1)[1] for b, _ in WRAPPERS]}")


def default_callbacks(run_dir: Path, monitor: str | None, has_validation: bool) -> dict:
    """CompVis' default callbacks (image logger, LR monitor, memory/time monitor, checkpoints), as configs."""
    ckpt_dir = str(run_dir / "checkpoints")
    callbacks = {
        "image_logger": {"target": "sdkit.training.callbacks.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True,
                                    "images_dir": str(run_dir / "images")}},
        "learning_rate_logger": {"target": "lightning.pytorch.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "performance": {"target": "sdkit.training.callbacks.PerformanceMonitor", "params": {}},
        "resilience": {"target": "sdkit.training.callbacks.ResilientCheckpointing",
                       "params": {"ckpt_dir": ckpt_dir}},
        "last_checkpoint": {"target": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "params": {"dirpath": ckpt_dir, "save_top_k": 0, "save_last": True,
                                       "every_n_train_steps": 500}},
        "progress_bar": {"target": "lightning.pytorch.callbacks.TQDMProgressBar",
                         "params": {"refresh_rate": 1 if sys.stderr.isatty() else 50}},
    }
    if monitor and has_validation:
        callbacks["modelcheckpoint"] = {
            "target": "lightning.pytorch.callbacks.ModelCheckpoint",
            "params": {"dirpath": ckpt_dir, "filename": "best-{epoch:06}-{step:09}", "monitor": monitor,
                       "mode": "min", "save_top_k": 1, "save_last": False, "auto_insert_metric_name": False}}
    return callbacks


QUIET = (  # Lightning warnings that do not apply to these runs
    r".*module\(s\) in eval mode.*",                       # frozen first/cond stages are in eval mode on purpose
    r"Using ModelCheckpoint with manual optimization.*",   # the post-step state is what resuming needs
    r".*isinstance\(treespec, LeafSpec\).*",
)


def build_trainer(config: DictConfig, run_dir: Path, module, data, now: str = "run"):
    import lightning as L

    from .callbacks import AtomicCheckpointIO
    from .datamodule import DataModule

    lightning_cfg = config.get("lightning") or OmegaConf.create()
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(lightning_cfg.get("trainer") or OmegaConf.create(),
                                                            resolve=True)
    trainer_kwargs.setdefault("accelerator", "auto")
    trainer_kwargs.setdefault("devices", 1)
    for key in ("strategy", "plugins"):  # {target, params} configs become objects
        value = trainer_kwargs.get(key)
        if isinstance(value, dict) and "target" in value:
            trainer_kwargs[key] = instantiate_from_config(value)
    if isinstance(data, DataModule):  # sdkit's sampler shards across ranks itself, in a resumable order
        trainer_kwargs["use_distributed_sampler"] = False

    monitor = getattr(getattr(module, "net", None), "monitor", None) or getattr(module, "monitor", None)
    has_validation = (isinstance(data, DataModule) and data.dataset_configs.get("validation") is not None
                      and trainer_kwargs.get("limit_val_batches", 1) != 0)
    callback_cfgs = OmegaConf.merge(default_callbacks(run_dir, monitor, has_validation),
                                    lightning_cfg.get("callbacks") or {})
    if trainer_kwargs.get("enable_progress_bar") is False:
        callback_cfgs.pop("progress_bar", None)
    callbacks = [instantiate_from_config(c) for c in callback_cfgs.values() if c is not None and c.get("target")]

    logger_cfg = lightning_cfg.get("logger")
    if logger_cfg is not None:
        logger = instantiate_from_config(logger_cfg)
    else:
        from lightning.pytorch.loggers import CSVLogger
        logger = CSVLogger(save_dir=str(run_dir), name="", version=f"csv_{now}")  # one metrics.csv per launch

    plugins = trainer_kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    plugins.append(AtomicCheckpointIO())
    return L.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=logger, plugins=plugins,
                     **trainer_kwargs)


def scaled_learning_rate(config: DictConfig, trainer, scale_lr: bool) -> float:
    """CompVis' rule: lr = accumulate_grad_batches × devices (× nodes) × batch_size × base_learning_rate."""
    base_lr = float(config.model.get("base_learning_rate", 1e-4))
    if not scale_lr:
        print(f"++++ NOT USING LR SCALING ++++\nSetting learning rate to {base_lr:.2e}")
        return base_lr
    batch_size = int(OmegaConf.select(config, "data.params.batch_size", default=1))
    accumulate = int(OmegaConf.select(config, "lightning.trainer.accumulate_grad_batches", default=1) or 1)
    devices = int(trainer.num_devices) * int(trainer.num_nodes)
    lr = accumulate * devices * batch_size * base_lr
    print(f"Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * {devices} (devices) "
          f"* {batch_size} (batchsize) * {base_lr:.2e} (base_lr)")
    return lr


def save_configs(config: DictConfig, run_dir: Path, now: str) -> None:
    (run_dir / "configs").mkdir(parents=True, exist_ok=True)
    project = OmegaConf.masked_copy(config, [k for k in config if k != "lightning"])
    OmegaConf.save(project, run_dir / "configs" / f"{now}-project.yaml")
    if "lightning" in config:
        OmegaConf.save(OmegaConf.create({"lightning": config.lightning}), run_dir / "configs" / f"{now}-lightning.yaml")


# ================================================================================================ main


def _split_base(args) -> tuple[list[str], list[str]]:
    bases = [b for group in args.base for b in group]
    overrides = list(args.overrides)
    # `-b a.yaml key=value` puts the override into the -b list: move it where it belongs
    moved = [b for b in bases if "=" in b and not Path(b).exists()]
    return [b for b in bases if b not in moved], moved + overrides


def check_config(config: DictConfig, bases: list[str]) -> None:
    """What can be checked before anything is built: the sections, the learning rate, the batch size, the
    Trainer's arguments and the callbacks' names (a typo there would otherwise be ignored or fail late)."""
    import lightning as L

    for section in ("model", "data"):
        if not isinstance(config.get(section), DictConfig) or "target" not in config[section]:
            raise ConfigError(f"the merged config has no {section!r} section with a target (configs: {bases}); "
                              f"a training config has model: {{target, params}} and data: {{target, params}}")
    lr = config.model.get("base_learning_rate", 1e-4)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ConfigError(f"model.base_learning_rate must be a positive number, got {lr!r}")
    lightning_cfg = config.get("lightning") or OmegaConf.create()
    trainer_kwargs = lightning_cfg.get("trainer") or {}
    accepted = [n for n in inspect.signature(L.Trainer.__init__).parameters if n != "self"]
    unknown = [k for k in trainer_kwargs if k not in accepted]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, accepted, 1))
                             else "") for k in unknown]
        raise ConfigError(f"lightning.trainer has unknown Trainer argument(s) {', '.join(hints)}; see "
                          "lightning.pytorch.Trainer for the list")
    defaults = default_callbacks(Path("."), "monitor", True)
    for name, cb in (lightning_cfg.get("callbacks") or {}).items():
        if cb is not None and name not in defaults and not (isinstance(cb, DictConfig) and cb.get("target")):
            close = difflib.get_close_matches(str(name), list(defaults), 1)
            raise ConfigError(f"lightning.callbacks.{name} has no target and is not one of the default callbacks "
                              f"({', '.join(defaults)})" + (f"; did you mean {close[0]!r}?" if close else
                                                             "; give it a target: (and params:)"))


def run(args: argparse.Namespace) -> int:
    import lightning as L

    bases, overrides = _split_base(args)
    ckpt = None
    if args.resume:
        run_dir, ckpt = resolve_resume(args.resume)
        previous = sorted(glob.glob(str(run_dir / "configs" / "*.yaml")))
        if not previous:
            raise FileNotFoundError(f"--resume: {run_dir} has no configs/*.yaml; is it an sdkit run folder?")
        bases = previous + bases
    elif not bases:
        raise SystemExit("sdkit train: give at least one config with -b CONFIG (or --resume RUN_FOLDER)")
    config = merge_configs(bases, overrides)
    check_config(config, bases)

    run_dir = make_run_dir(args, bases) if not args.resume else run_dir
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    L.seed_everything(args.seed, workers=True)
    data = instantiate_from_config(config.data)          # everything is built before the run folder is made,
    if getattr(data, "seed", "absent") is None:          # so a launch that fails here leaves nothing behind
        data.seed = args.seed
    module = build_module(config, learning_rate=float(config.model.get("base_learning_rate", 1e-4)),
                          seed=args.seed)
    module.run_config = OmegaConf.to_yaml(config)
    if hasattr(module, "use_cache_dir"):  # encoded data survives a restart (training/encoding_cache.py)
        module.use_cache_dir(run_dir / "cache", OmegaConf.to_yaml(config.data))
    fresh = not args.resume and not run_dir.exists()
    previous_env = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the DDP ranks Lightning starts during fit
    trainer = None
    try:
        with warnings.catch_warnings():
            for pattern in QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            trainer = build_trainer(config, run_dir, module, data, now)
            scale_lr = args.scale_lr if args.scale_lr is not None else bool(config.get("scale_lr", True))
            module.learning_rate = scaled_learning_rate(config, trainer, scale_lr)
            if _is_rank_zero():
                for sub in ("checkpoints", "configs", "images"):
                    (run_dir / sub).mkdir(parents=True, exist_ok=True)
                save_configs(config, run_dir, now)
                print(f"run folder: {run_dir}")
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    except BaseException:
        if fresh and _is_rank_zero() and run_dir.exists() and (trainer is None or trainer.global_step == 0):
            shutil.rmtree(run_dir, ignore_errors=True)   # nothing was trained: leave no empty run folder behind
            print(f"removed {run_dir}: the run failed before its first step", file=sys.stderr)
        raise
    finally:
        if previous_env is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous_env
    if trainer.is_global_zero:
        print(f"done: {run_dir / 'checkpoints'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="sdkit train", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
