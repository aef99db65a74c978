"""Contact sheet of the shipped text-to-image model for its model card: shape prompts and emoji prompts.

    .venv/bin/python tools/tiny_samples.py data/tiny-samples.png [--config tiny] [--ckpt FILE]

Rows 1-2: held-out shape prompts (validation split); rows 3-4: emoji captions from the training split (Twemoji and
OpenMoji styles, as the model saw them); rows 5-6: held-out emoji captions. DPM-Solver++(2M), 20 steps,
guidance 5, seed = position on the sheet.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prompt_following import contact_sheet  # noqa: E402

import sdkit  # noqa: E402
from sdkit.data.emoji import EmojiDataset  # noqa: E402
from sdkit.data.shapes import ShapesDataset  # noqa: E402
from sdkit.pipelines import txt2img  # noqa: E402


def prompts() -> list[str]:
    shapes = ShapesDataset(length=16, size=64, seed=2, split="validation", caption_style="canonical")
    out = [shapes[i]["caption"] for i in range(16)]
    for split, start in (("train", 0), ("validation", 0)):
        for style in ("twemoji", "openmoji"):
            data = EmojiDataset(style=style, size=64, split=split)
            step = max(1, len(data) // 8)
            out += [data[(start + k * step) % len(data)]["caption"] for k in range(8)]
    return out[:16] + out[16:32] + out[32:48]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sdkit.load_model(args.config, args.ckpt)
    texts = prompts()
    images = txt2img(model, texts, seed=0, steps=20, guidance_scale=5.0, progress=False).images
    contact_sheet(images, texts).save(args.out)
    print(f"wrote {args.out} ({len(images)} images)")


if __name__ == "__main__":
    main()
