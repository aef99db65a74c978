"""Which sdkit files the prompt → image path of ``txt2img`` runs through, in the order it first enters them.

    python tools/trace_path.py [--config tiny-test] [--root sdkit]

Runs one small txt2img (2 steps, guidance on, the default sampler) under ``sys.setprofile`` and prints every
sdkit source file whose functions were called, with the number of calls, and the frames between the sampler's
entry point and the UNet's ``forward`` (the wrapper layers a reader has to step through).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-test")
    args = parser.parse_args()
    import torch

    import sdkit
    from sdkit.pipelines import txt2img

    root = Path(sdkit.__file__).parent
    torch.manual_seed(0)
    model = sdkit.load_model(args.config)
    calls: Counter = Counter()
    order: list[str] = []
    chain: list[str] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        path = Path(frame.f_code.co_filename)
        if root not in path.parents:
            return
        name = str(path.relative_to(root.parent))
        if name not in calls:
            order.append(name)
        calls[name] += 1
        if frame.f_code.co_name == "forward" and "unet.py" in name and type(frame.f_locals.get("self")).__name__ == \
                "UNetModel" and not chain:
            f, stack = frame, []
            while f is not None:
                stack.append(f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}")
                if f.f_code.co_name == "sample" and f.f_code.co_filename.endswith("samplers/__init__.py"):
                    break
                f = f.f_back
            chain.extend(reversed(stack))

    sys.setprofile(profile)
    try:
        txt2img(model, "a red circle", steps=2, guidance_scale=5.0, height=32, width=32, seed=0, progress=False)
    finally:
        sys.setprofile(None)
    print(f"txt2img ran code in {len(order)} sdkit files (first entered first):")
    for name in order:
        print(f"  {calls[name]:6d} calls  {name}")
    print(f"\nfrom samplers.sample to UNetModel.forward: {len(chain) - 2} frames in between")
    print("  " + " -> ".join(chain))


if __name__ == "__main__":
    main()
