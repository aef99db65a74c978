"""The ``sdkit generate / img2img / inpaint / upscale`` commands (registered by ``sdkit.cli``).

    sdkit generate "a red circle above a blue square" --n 4 --seed 42 --out outputs/
    sdkit generate "..." --config sd-v1-inference --ckpt v1-5-pruned-emaonly.safetensors --sampler ddim --steps 50
    sdkit img2img photo.png "an oil painting" --strength 0.6
    sdkit inpaint photo.png mask.png "a red hat"            # mask: white = repaint
    sdkit upscale small.png --config my-upscaler.yaml --ckpt upscaler.ckpt

Without --config/--ckpt the kit's shipped small model ("tiny") is used. Every PNG is written atomically (a temp
file, then a rename) and carries the invisible watermark unless --no-watermark.
"""
from __future__ import annotations

import argparse
import os
import sys

SHIPPED_MODEL = "tiny"
SHIPPED_UPSCALER = "tiny-upscaler"   # the default of `sdkit upscale`


def _common(parser: argparse.ArgumentParser, *, steps: int, sampler: str, guidance: float, eta: float | None,
            out: str, text: bool = True) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--config", help="bundled config name or YAML path (default: the shipped small model, or "
                                        "sd-v1-inference when only --ckpt is given)")
    model.add_argument("--ckpt", help="weights: .ckpt, .safetensors or a diffusers folder (none: random weights)")
    model.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps (default: cpu)")
    model.add_argument("--unsafe-pickle", action="store_true", help="allow full unpickling of a trusted .ckpt")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=steps, help=f"sampling steps (default {steps})")
    sampling.add_argument("--sampler", default=sampler, help=f"ddim, plms, euler, dpmpp_2m, … (default {sampler})")
    sampling.add_argument("--eta", type=float, default=eta,
                          help="noise of ddim/euler_a/dpmpp_2m_sde (default: the sampler's own, 0 for ddim, "
                               "1 for euler_a and dpmpp_2m_sde)")
    sampling.add_argument("--karras", action="store_true", help="Karras σ grid (σ-space samplers)")
    sampling.add_argument("--spacing", default="compvis", help="timestep spacing: compvis, leading, trailing, "
                                                               "linspace")
    if text:
        from ..lora.arguments import lora_argument
        model.add_argument("--lora", action="append", type=lora_argument, metavar="FILE[:SCALE]",
                           help="apply a LoRA file (kohya/A1111 or diffusers .safetensors) at SCALE (default 1); "
                                "repeatable")
        model.add_argument("--embedding", action="append", metavar="FILE",
                           help="load a textual-inversion word (A1111 .pt or .safetensors; the word is the file's "
                                "name, e.g. hexagon-ti) to use in the prompt; repeatable")
        sampling.add_argument("--guidance", type=float, default=guidance, help=f"CFG scale (default {guidance})")
        sampling.add_argument("--negative", default="", help="negative prompt (replaces the empty uncond prompt)")
    sampling.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i")
    sampling.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    sampling.add_argument("--batch-size", type=int, help="images per batch (default: all at once)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=out, help=f"output folder (default {out})")
    output.add_argument("--no-watermark", action="store_true", help="save without the invisible watermark")
    output.add_argument("--watermark", help="watermark payload (default: 'StableDiffusionV1' for SD configs, "
                                            "'sdkit' otherwise)")
    output.add_argument("--safety-checker", help="local folder with safety-checker weights (default: no check)")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_arguments(sub) -> None:
    """Register the four generation commands on an argparse subparsers object."""
    gen = sub.add_parser("generate", help="text to image", description="Generate images from a text prompt.")
    gen.add_argument("prompt")
    gen.add_argument("--height", type=int, help="pixels (default: the model's size, 512 for SD v1)")
    gen.add_argument("--width", type=int, help="pixels (default: the model's size, 512 for SD v1)")
    _common(gen, steps=20, sampler="dpmpp_2m", guidance=7.5, eta=None, out="outputs/txt2img-samples")
    gen.set_defaults(func=run, verb="txt2img")

    i2i = sub.add_parser("img2img", help="repaint an image following a prompt",
                         description="Noise an image part-way (--strength) and denoise it with a prompt.")
    i2i.add_argument("image")
    i2i.add_argument("prompt")
    i2i.add_argument("--strength", type=float, default=0.75, help="0 = unchanged … 1 = from noise (default 0.75)")
    _common(i2i, steps=20, sampler="dpmpp_2m", guidance=7.5, eta=None, out="outputs/img2img-samples")
    i2i.set_defaults(func=run, verb="img2img")

    inp = sub.add_parser("inpaint", help="repaint the white region of a mask",
                         description="Repaint the white part of MASK (a grayscale image of IMAGE's size).")
    inp.add_argument("image")
    inp.add_argument("mask")
    inp.add_argument("prompt")
    inp.add_argument("--strength", type=float, default=1.0, help="1 = masked region from pure noise (default)")
    inp.add_argument("--mask-blur", type=float, default=0.0, help="Gaussian σ (pixels) for the mask edge")
    _common(inp, steps=20, sampler="dpmpp_2m", guidance=7.5, eta=None, out="outputs/inpaint-samples")
    inp.set_defaults(func=run, verb="inpaint")

    up = sub.add_parser("upscale", help="super-resolution with an LDM upscaler",
                        description="Upscale by the autoencoder factor with an LDM super-resolution model.")
    up.add_argument("image")
    up.add_argument("--prompt", help="only for upscalers with text conditioning")
    up.add_argument("--tile", type=int, help="decode in tiles of this many latent pixels (0 = never)")
    _common(up, steps=50, sampler="ddim", guidance=1.0, eta=1.0, out="outputs/upscale-samples", text=False)
    up.set_defaults(func=run, verb="upscale")


def load(args):
    """The model the arguments ask for, or an error saying how to ask for one."""
    from ..checkpoints import load_model
    from ..config import bundled_configs, load_config

    if args.config is None and args.ckpt is None:
        shipped = SHIPPED_UPSCALER if args.command == "upscale" else SHIPPED_MODEL
        if shipped not in bundled_configs():
            raise SystemExit(
                f"sdkit {args.command}: no model given, and the kit's shipped small model ({shipped!r}) is not "
                "installed in this version. Pass one: --config CONFIG [--ckpt WEIGHTS], e.g. --config "
                "sd-v1-inference --ckpt v1-5-pruned-emaonly.safetensors, or --config tiny-test for a quick "
                "random-weight smoke test.")
        return load_model(shipped, device=args.device)
    config = args.config or "sd-v1-inference"
    if args.ckpt is None and not load_config(config).get("weights"):
        print(f"sdkit {args.command}: no --ckpt given: {config} has random weights, so the images will be noise",
              file=sys.stderr)
    return load_model(config, args.ckpt, device=args.device, unsafe_pickle=args.unsafe_pickle)


def write_png(image, folder: str, name: str, payload: str | None, parameters: dict | None = None) -> str:
    """Watermark (unless ``payload`` is None) and save atomically (a temp file, then a rename: no half-written
    PNGs), with the watermark record and the generation parameters (A1111 "parameters" chunk + sdkit's record)."""
    from ..atomic import atomic_file
    from ..watermark import apply_watermark, pnginfo
    from .metadata import png_text

    if payload is not None:
        image = apply_watermark(image, payload)
    info = pnginfo(image)
    for key, value in (png_text(parameters) if parameters else {}).items():
        info.add_text(key, value)
    path = os.path.join(folder, name)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def _payload(args) -> str | None:
    from ..watermark import SD_V1_PAYLOAD, SDKIT_PAYLOAD, payload_bytes

    if args.no_watermark:
        return None
    if args.watermark:
        payload_bytes(args.watermark)   # e.g. bytes that are not UTF-8: refused now, not after generating
        return args.watermark
    return SD_V1_PAYLOAD if str(args.config or "").startswith("sd-v1") or (args.ckpt and not args.config) \
        else SDKIT_PAYLOAD


def run(args: argparse.Namespace) -> int:
    from . import img2img, inpaint, txt2img, upscale

    common = dict(num_images=args.n, steps=args.steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                  batch_size=args.batch_size, spacing=args.spacing, karras=args.karras,
                  progress=not args.no_progress)
    check_before_loading(args)        # what can be refused without the model is refused before building it
    payload = _payload(args)
    model = load(args)
    if getattr(args, "lora", None):
        from ..lora.arguments import apply_lora_arguments
        apply_lora_arguments(model, args.lora)
    for path in getattr(args, "embedding", None) or []:
        from ..textual_inversion import load_embedding
        print(f"textual inversion {path}: the word {load_embedding(model, path)!r}", flush=True)
    if args.safety_checker:
        from ..safety import SafetyChecker
        common["safety_checker"] = SafetyChecker.from_pretrained(args.safety_checker, device=args.device)
    if args.verb != "upscale":
        common.update(guidance_scale=args.guidance, negative_prompt=args.negative)
    if args.verb == "txt2img":
        result = txt2img(model, args.prompt, height=args.height, width=args.width, **common)
    elif args.verb == "img2img":
        result = img2img(model, args.image, args.prompt, strength=args.strength, **common)
    elif args.verb == "inpaint":
        result = inpaint(model, args.image, args.mask, args.prompt, strength=args.strength,
                         mask_blur=args.mask_blur, **common)
    else:
        result = upscale(model, args.image, args.prompt, decode_tile=args.tile, **common)
    number = len([f for f in os.listdir(args.out) if f.endswith(".png")])
    records = result.parameters or [None] * len(result.images)
    saved = []
    for image, seed, flagged, record in zip(result.images, result.seeds, result.nsfw, records):
        while os.path.exists(os.path.join(args.out, f"{number:05d}-{seed}.png")):  # never overwrite
            number += 1
        try:
            path = write_png(image, args.out, f"{number:05d}-{seed}.png", payload, record)
        except OSError as e:
            again = (f"rerun with --seed {args.seed} to make the same images" if args.seed is not None
                     else f"their seeds were {result.seeds[len(saved):][:8]}")
            raise OSError(e.errno, f"could not write {os.path.join(args.out, f'{number:05d}-{seed}.png')}: "
                                   f"{e.strerror or e}; {len(saved)} of {len(result.images)} image(s) were saved "
                                   f"before it. Free some space or choose another --out; {again}") from e
        saved.append(path)
        number += 1
        print(path + ("  (flagged by the safety checker: placeholder saved)" if flagged else ""))
    return 0


def check_before_loading(args: argparse.Namespace) -> None:
    """Refuse, before the model is built and anything is generated: an --out that is a file or cannot be written,
    a --device this machine lacks, a --ckpt or input file that does not exist."""
    from ..checks import device

    device(args.device)
    if getattr(args, "lora", None):
        from ..lora.arguments import check_lora_files
        check_lora_files(args.lora)
    for path in getattr(args, "embedding", None) or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--embedding {path!r}: no such file (an A1111 textual-inversion .pt or "
                                    ".safetensors file)")
    if args.ckpt is not None and not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt!r}: no such file or folder")
    for name in ("image", "mask"):
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{name} {path!r}: " + ("is a folder, not an image file" if os.path.isdir(path)
                                                           else "no such file"))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out!r} is a file; give a folder (images are named 00000-SEED.png)")
    os.makedirs(args.out, exist_ok=True)
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {args.out!r}: this folder is not writable; choose another")
