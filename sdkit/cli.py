"""The ``sdkit`` command. Subcommands are added as the kit grows; each says what it needs when it fails."""
from __future__ import annotations

import argparse
import errno
import os
import sys


def _convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoints import load_model, save_compvis, save_diffusers
    from .checkpoints.write_compvis import COMPVIS_SUFFIXES

    out = os.path.abspath(args.out)         # everything that can be refused is, before the model is built
    if args.to == "compvis" and os.path.isdir(out):
        raise IsADirectoryError(f"{args.out!r} is a folder; --to compvis writes one file (e.g. model.safetensors)")
    if args.to == "compvis" and not out.endswith(COMPVIS_SUFFIXES):
        raise ValueError(f"--to compvis writes a {' / '.join(COMPVIS_SUFFIXES)} file; {args.out!r} has none of "
                         "these suffixes")
    if args.to == "diffusers":
        if args.half:
            raise ValueError("--half applies to --to compvis only (a diffusers folder is written in float32)")
        if os.path.isfile(out):
            raise FileExistsError(f"{args.out!r} is a file; --to diffusers writes a folder")
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"no checkpoint {args.ckpt!r} (a .ckpt, .safetensors or a diffusers folder)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the folder of {args.out!r} does not exist ({parent}); create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write into {parent!r} (permission denied or a read-only file system)")
    model = load_model(args.config, args.ckpt, use_ema=not args.no_ema, unsafe_pickle=args.unsafe_pickle)
    if args.to == "diffusers":
        save_diffusers(model, args.out)
    else:
        save_compvis(model, args.out, dtype=torch.float16 if args.half else None)
    print(f"wrote {args.out}")
    return 0


def _watermark_decode(args: argparse.Namespace) -> int:
    from .watermark import decode_command

    return decode_command(args.file, args.payload, args.method)


def _info(args: argparse.Namespace) -> int:
    """Print the generation parameters stored in a PNG (sdkit's record, or any A1111-style "parameters" text)."""
    import json

    from .pipelines.metadata import a1111_text, read_parameters

    try:
        record = read_parameters(args.file)
    except (OSError, ValueError) as e:   # missing file, not an image (PIL.UnidentifiedImageError is an OSError)
        print(f"sdkit info: error: cannot read {args.file!r}: {e}", file=sys.stderr)
        return 2
    if not record:
        print(f"sdkit info: {args.file} carries no generation parameters", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=1, ensure_ascii=False) if args.json or "sampler" not in record
          else a1111_text(record))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.run import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert a checkpoint between CompVis single-file and diffusers layouts")
    convert.add_argument("ckpt", help="a .ckpt, .safetensors or a diffusers-layout folder")
    convert.add_argument("out", help="output .safetensors/.ckpt file or folder")
    convert.add_argument("--config", default="sd-v1-inference", help="bundled config name or YAML path")
    convert.add_argument("--to", choices=("diffusers", "compvis"), required=True)
    convert.add_argument("--no-ema", action="store_true", help="keep the raw (non-EMA) UNet weights")
    convert.add_argument("--unsafe-pickle", action="store_true",
                         help="allow full unpickling of a .ckpt you trust (runs code from the file)")
    convert.add_argument("--half", action="store_true", help="store float16 weights (compvis; half the size)")
    convert.set_defaults(func=_convert)
    watermark = sub.add_parser("watermark", help="invisible watermark tools")
    watermark = watermark.add_subparsers(dest="action", required=True)
    decode = watermark.add_parser("decode", help="read the invisible watermark of an image (exit 0 when found)")
    decode.add_argument("file", help="an image file (PNG, JPEG, ...; resized or cropped copies too)")
    decode.add_argument("--payload", action="append", help="expected payload text (repeatable); default: "
                        "'sdkit' and 'StableDiffusionV1'")
    decode.add_argument("--method", choices=("spread", "dwtDct", "all"), default="spread",
                        help="spread: the kit's robust mark (default); dwtDct: SD v1's invisible-watermark mark, "
                             "as the reference decoder reads it; all: both")
    decode.set_defaults(func=_watermark_decode)
    info = sub.add_parser("info", help="print the generation parameters a PNG carries (prompt, sampler, seed, ...)")
    info.add_argument("file", help="a PNG written by sdkit (or by an A1111-style tool)")
    info.add_argument("--json", action="store_true", help="the full record as JSON")
    info.set_defaults(func=_info)
    from .training.run import add_arguments as add_train_arguments  # argparse only: no Lightning import

    train = sub.add_parser("train", help="train a model from configs (CompVis main.py: -b CONFIG ... key=value)",
                           description="Train from configs merged left to right, then key=value overrides; "
                                       "a run folder logs/<time>_<name>/ holds configs, checkpoints and images.")
    add_train_arguments(train)
    train.set_defaults(func=_train)
    from .pipelines.commands import add_arguments as add_generation_arguments  # argparse only: no torch import

    add_generation_arguments(sub)  # generate, img2img, inpaint, upscale
    return parser


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}


def user_errors() -> tuple[type[BaseException], ...]:
    """What a person's input or environment causes (a bad value, a missing or unreadable file, a config that
    does not parse, too little memory): printed as one line. Anything else is a bug and keeps its traceback."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException
    from PIL import UnidentifiedImageError

    errors = [ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
              MemoryError, FloatingPointError, ImportError, UnidentifiedImageError, yaml.YAMLError,
              OmegaConfBaseException]
    if "lightning" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        errors.append(MisconfigurationException)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. User errors print ``sdkit <command>: error: <message>`` on stderr and exit with 2 (set
    SDKIT_TRACEBACK=1 to see the traceback too); bugs raise as usual."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sdkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        disk = isinstance(e, OSError) and e.errno in DISK_ERRNOS
        if os.environ.get("SDKIT_TRACEBACK") or not (disk or isinstance(e, user_errors())):
            raise
        message = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
        print(f"sdkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
