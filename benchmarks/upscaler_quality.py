"""4× super-resolution on held-out emoji: the kit's small upscaler against bicubic interpolation, by PSNR.

    python benchmarks/upscaler_quality.py [--config tiny-upscaler] [--ckpt FILE] [--n 95] [--steps 50]
                                          [--sheet out.png] [--json out.json]

Ground truth: OpenMoji of the validation split (emoji the upscaler never saw) drawn at 128×128. Input: that image
downscaled to 32×32 (bicubic with antialiasing). Compared: bicubic upscaling back to 128×128, the upscaler (DDIM,
eta 1, as LDM's super-resolution notebook), and the autoencoder's own reconstruction of the ground truth: the
upscaler decodes through it, so that is the best PSNR it could reach.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import sdkit
from sdkit.data.emoji import EmojiDataset
from sdkit.data.transforms import to_pil, to_tensor
from sdkit.pipelines import upscale


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * torch.log10(4 / ((a - b) ** 2).mean(dim=(1, 2, 3)))


def downscale(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    return F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def bicubic(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def evaluate(model, n: int = 95, steps: int = 50, eta: float = 1.0) -> dict:
    data = EmojiDataset(style="openmoji", size=128, split="validation")
    items = [data[i] for i in range(min(n, len(data)))]
    truth = torch.stack([it["image"] for it in items])
    low = downscale(truth)
    start = time.perf_counter()
    upscaled = torch.stack([to_tensor(upscale(model, lr[None], steps=steps, eta=eta, seed=i, progress=False).images[0])
                            for i, lr in enumerate(low)])      # the saved 8-bit image, as people get it
    seconds = time.perf_counter() - start
    with torch.no_grad():
        recon = model.decode_first_stage(model.get_first_stage_encoding(model.encode_first_stage(truth)))
    scores = {"bicubic": psnr(bicubic(low), truth), "upscaler": psnr(upscaled, truth),
              "autoencoder_ceiling": psnr(recon.clamp(-1, 1), truth)}
    return {"n": len(items), "steps": steps, "eta": eta, "seconds": seconds,
            "psnr": {k: v.mean().item() for k, v in scores.items()},
            "upscaler_beats_bicubic": (scores["upscaler"] > scores["bicubic"]).float().mean().item(),
            "names": [it["meta"]["name"] for it in items], "truth": truth, "low": low, "upscaled": upscaled}


def side_by_side(out: dict, count: int = 8) -> Image.Image:
    """Rows: input (32×32, shown with nearest-neighbour pixels), bicubic, upscaler, ground truth."""
    cell, label_w = 128, 90
    rows = {"input 32x32": out["low"], "bicubic": bicubic(out["low"]), "upscaler": out["upscaled"],
            "ground truth": out["truth"]}
    sheet = Image.new("RGB", (label_w + count * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2), label, fill="black")
        for c in range(count):
            sheet.paste(to_pil(images[c]).resize((cell, cell), Image.Resampling.NEAREST), (label_w + c * cell, r * cell))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-upscaler")
    parser.add_argument("--ckpt", default=None, help="weights (default: the config's shipped weights)")
    parser.add_argument("--n", type=int, default=95)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--sheet", help="write a side-by-side PNG of the first 8 images")
    parser.add_argument("--json", help="write the numbers as JSON")
    args = parser.parse_args()
    model = sdkit.load_model(args.config, args.ckpt)
    out = evaluate(model, args.n, args.steps, args.eta)
    print(f"{out['n']} held-out OpenMoji, 32×32 → 128×128, DDIM {args.steps} steps eta {args.eta:g} "
          f"({out['seconds']:.0f} s); mean PSNR:")
    for k, v in out["psnr"].items():
        print(f"  {k:20s} {v:6.2f} dB")
    print(f"  upscaler above bicubic on {out['upscaler_beats_bicubic']:.0%} of the images")
    if args.sheet:
        side_by_side(out).save(args.sheet)
        print(f"wrote {args.sheet}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: out[k] for k in ("n", "steps", "eta", "seconds", "psnr", "upscaler_beats_bicubic")}, f,
                      indent=1)


if __name__ == "__main__":
    main()
