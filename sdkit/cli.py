"""The ``sdkit`` command. Subcommands are added as the kit grows; each says what it needs when it fails."""
from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from .checkpoints import load_model, save_compvis, save_diffusers

    model = load_model(args.config, args.ckpt, use_ema=not args.no_ema, unsafe_pickle=args.unsafe_pickle)
    if args.to == "diffusers":
        save_diffusers(model, args.out)
    else:
        save_compvis(model, args.out)
    print(f"wrote {args.out}")
    return 0


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
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
