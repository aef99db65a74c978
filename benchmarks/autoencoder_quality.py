"""How good is a trained small autoencoder? PSNR on held-out images, and whether the shape checker still reads
the reconstructions correctly (the property a text-to-image model trained in its latent space needs).

    python benchmarks/autoencoder_quality.py CONFIG CKPT [--n 128]

CONFIG is the training config (e.g. sdkit/configs/train-tiny-autoencoder.yaml), CKPT a run's checkpoint or an
exported .safetensors of the autoencoder alone.
"""
from __future__ import annotations

import argparse

import torch

from sdkit.config import instantiate_from_config, load_config
from sdkit.checkpoints import read_checkpoint
from sdkit.data.emoji import EmojiDataset
from sdkit.data.shapes import Scene, ShapesDataset
from sdkit.data.shapes_checker import check


def load_autoencoder(config: str, ckpt: str):
    cfg = load_config(config).model
    cfg.params.pop("lossconfig", None)
    model = instantiate_from_config(cfg).eval()
    state, _ = read_checkpoint(ckpt)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    model.load_state_dict(state, strict=True)
    return model


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.clamp(-1, 1) - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args()
    model = load_autoencoder(args.config, args.ckpt)
    sets = {
        "shapes (validation)": ShapesDataset(length=args.n, size=64, split="validation"),
        "twemoji (validation)": EmojiDataset(style="twemoji", size=64, split="validation"),
        "openmoji (validation)": EmojiDataset(style="openmoji", size=64, split="validation"),
    }
    for name, data in sets.items():
        items = [data[i] for i in range(min(args.n, len(data)))]
        x = torch.stack([it["image"] for it in items])
        rec = torch.cat([model.decode(model.encode(b).mode()) for b in x.split(32)])
        line = f"{name:22s} n={len(items):4d}  PSNR {psnr(rec, x).mean():.2f} dB"
        if name.startswith("shapes"):
            ok_in = [check(it["image"], Scene.from_dict(it["meta"]["scene"])).correct for it in items]
            ok_rec = [check(r, Scene.from_dict(it["meta"]["scene"])).correct for r, it in zip(rec, items)]
            line += (f"  checker correct: originals {sum(ok_in) / len(items):.3f}, "
                     f"reconstructions {sum(ok_rec) / len(items):.3f}")
        print(line)


if __name__ == "__main__":
    main()
