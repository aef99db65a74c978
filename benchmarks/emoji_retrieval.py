"""Do emoji prompts give recognisable emoji? Generate one image per emoji caption, then ask the kit's small CLIP which
of 100 candidate captions each image shows: top-1 and top-5 retrieval accuracy (chance: 1% and 5%).

    python benchmarks/emoji_retrieval.py [--config tiny] [--ckpt FILE] [--clip-ckpt FILE] [--split train]
                                         [--style twemoji] [--n 100] [--guidance 5] [--sheet out.png] [--json out.json]

Candidates: `--n` emoji of one split and style, drawn with a fixed seed; each is both a prompt and a candidate
caption. The same retrieval on the dataset's own renders of those emoji is printed as the ceiling (how well the
small CLIP tells these emoji apart at all). The validation split holds emoji the models never saw (95 names).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

import sdkit
from sdkit.data.emoji import EmojiDataset
from sdkit.data.transforms import to_tensor
from sdkit.pipelines import txt2img

from prompt_following import contact_sheet


def retrieval(clip, images: torch.Tensor, captions: list[str], k: int = 5) -> tuple[torch.Tensor, dict]:
    """Images [N, 3, H, W] in [-1, 1], captions [N] (image i shows caption i) → each image's rank of its own
    caption (0 = first) and the fraction of images whose own caption ranks first / in the top k of all N."""
    with torch.no_grad():
        sims = clip.encode_image(images) @ clip.encode_text(captions).T
    rank = (sims > sims.diagonal()[:, None]).sum(dim=1)          # how many captions beat the right one
    return rank, {"top1": (rank == 0).float().mean().item(), f"top{k}": (rank < k).float().mean().item()}


def pick(split: str, style: str, n: int, seed: int = 0) -> list[dict]:
    data = EmojiDataset(style=style, size=64, split=split)
    indices = sorted(random.Random(seed).sample(range(len(data)), min(n, len(data))))
    return [data[i] for i in indices]


def evaluate(model, clip, items: list[dict], guidance: float = 5.0, steps: int = 20, sampler: str = "dpmpp_2m",
             batch: int = 25) -> dict:
    captions = [item["caption"] for item in items]
    start = time.perf_counter()
    images = []
    for i in range(0, len(captions), batch):
        images += txt2img(model, captions[i:i + batch], seed=i, steps=steps, sampler=sampler,
                          guidance_scale=guidance, progress=False).images
    seconds = time.perf_counter() - start
    generated = torch.stack([to_tensor(im) for im in images])
    real = torch.stack([item["image"] for item in items])
    rank, scores = retrieval(clip, generated, captions)
    _, ceiling = retrieval(clip, real, captions)
    return {"n": len(items), "guidance": guidance, "steps": steps, "sampler": sampler, "seconds": seconds,
            "generated": scores, "dataset_renders": ceiling, "images": images, "captions": captions,
            "hits": (rank < 5).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--ckpt", default=None, help="text-to-image weights (default: the shipped ones)")
    parser.add_argument("--clip-config", default="tiny-clip")
    parser.add_argument("--clip-ckpt", default=None, help="small-CLIP weights (default: the shipped ones)")
    parser.add_argument("--split", default="train", choices=("train", "validation"))
    parser.add_argument("--style", default="twemoji", choices=("twemoji", "openmoji"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--sheet", help="write a contact sheet PNG of the first 48 images (ok = caption in top 5)")
    parser.add_argument("--json", help="write the numbers as JSON")
    args = parser.parse_args()
    model = sdkit.load_model(args.config, args.ckpt)
    clip = sdkit.load_model(args.clip_config, args.clip_ckpt)
    items = pick(args.split, args.style, args.n)
    out = evaluate(model, clip, items, args.guidance, args.steps, args.sampler)
    n = out["n"]
    print(f"{n} {args.style} captions of the {args.split} split, {args.sampler} {args.steps} steps, guidance "
          f"{args.guidance:g} ({out['seconds']:.0f} s to generate); retrieval among the {n} captions:")
    print(f"  generated images: top-1 {out['generated']['top1']:.1%}  top-5 {out['generated']['top5']:.1%}")
    print(f"  dataset renders:  top-1 {out['dataset_renders']['top1']:.1%}  top-5 "
          f"{out['dataset_renders']['top5']:.1%}   (chance: {1 / n:.1%} / {5 / n:.1%})")
    if args.sheet:
        contact_sheet(out["images"][:48], out["captions"][:48], out["hits"][:48]).save(args.sheet)
        print(f"wrote {args.sheet}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in out.items() if k not in ("images", "hits")}, f, indent=1)


if __name__ == "__main__":
    main()
