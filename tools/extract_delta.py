"""Ship a full fine-tune of a shipped model (e.g. DreamBooth) as a small low-rank delta file: the truncated SVD of
each layer's weight change (sdkit.nn.lowrank.LowRankDelta.from_difference), which a config's ``delta:`` key merges
back into the base weights at load time.

    python tools/extract_delta.py logs/<run>/checkpoints/last.ckpt data/hexagon-dreambooth.safetensors \
        --base tiny --rank 16 --name hexagon-dreambooth

It prints how much of the change the rank keeps (relative Frobenius error over all layers) and the file size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tuned", help="the fine-tuned checkpoint (.ckpt of an sdkit run, or .safetensors)")
    parser.add_argument("out", help="the delta file to write (.safetensors)")
    parser.add_argument("--base", default="tiny", help="the bundled config whose shipped weights were fine-tuned")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--name", default=None, help="recorded in the file's metadata")
    args = parser.parse_args()

    import sdkit
    from sdkit.nn.lowrank import LowRankDelta, save_delta

    base = sdkit.load_model(args.base)
    tuned = sdkit.load_model(args.base, args.tuned, use_ema=False)
    base_unet, tuned_unet = base.model.diffusion_model, tuned.model.diffusion_model
    delta = LowRankDelta.from_difference(base_unet, tuned_unet, rank=args.rank)
    path = save_delta(delta, base_unet, args.out, {"base": args.base, "name": args.name or Path(args.out).stem,
                                                   "made_from": Path(args.tuned).name,
                                                   "relative_error": f"{delta.relative_error:.4f}"})
    print(f"{path}: rank {args.rank}, {delta.numel():,} numbers, {path.stat().st_size / 1e6:.2f} MB; the rank keeps "
          f"the change to a relative Frobenius error of {delta.relative_error:.3f}")


if __name__ == "__main__":
    main()
