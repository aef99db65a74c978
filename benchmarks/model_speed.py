"""SD v1's UNet forward and VAE decode as users run them: sdkit vs diffusers, time and peak memory, one run.

    python benchmarks/model_speed.py                          # the headline: CPU fp32, 2 threads
    python benchmarks/model_speed.py --batches 2 --latents 64 # 512×512 images (slow on a CPU)
    python benchmarks/model_speed.py --no-memory --repeats 3  # times only

What is timed: the bundled ``sd-v1-inference`` config as ``sdkit.load_model`` builds it (random weights, eval mode,
the config's ``use_checkpoint: True`` left as users get it), against diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` holding the *same* weight tensors (converted by ``sdkit.checkpoints.keys``, shared, not copied):

  unet  ``model.apply_model(x, t, context)``     vs  ``unet(x, t, encoder_hidden_states=context).sample``
        (x [B, 4, L, L], t = 500 for every row, context [B, 77, 768]; batch 2 is the guided batch of one image)
  vae   ``model.decode_first_stage(z)``           vs  ``vae.decode(z / 0.18215).sample``   (pixels 8L × 8L)

Time: both libraries live in this process; after one warm-up call each, ``--repeats`` rounds alternate them
(sdkit first in even rounds, diffusers first in odd ones). Each round gives a ratio sdkit/diffusers from two calls
seconds apart; the time ratio printed is the median of those per-round ratios, which stands up to a shared
machine's load shifting between rounds (the median seconds of each library are printed beside it, and the ratio of
those medians in the ``(medians)`` column).

Memory: each (library, part, batch, latent) runs in a fresh child process, which builds its model (sdkit through
``load_model``; diffusers from its config: the values of the weights do not change memory), makes one warm-up
call, resets the kernel's peak-RSS counter, and makes two more calls. Reported: peak resident set (VmHWM) minus
the resident set before those calls, i.e. the memory a call adds on top of the loaded model. The child runs with
glibc's mmap threshold fixed at 64 KiB (each tensor its own mapping, returned to the system when freed), so the
peak RSS follows the peak of live tensors instead of the allocator's caching. Ratios below 1.0: sdkit is
faster or smaller.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CONFIG = "sd-v1-inference"
CONTEXT_TOKENS = 77


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS counter (Linux)
        f.write("5")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _params():
    from sdkit.checkpoints import keys
    from sdkit.config import load_config

    params = load_config(CONFIG).model.params
    return (keys.as_plain(params.unet_config.params), keys.as_plain(params.first_stage_config.params),
            float(params.scale_factor))


def diffusers_modules(model=None, parts=("unet", "vae")) -> dict:
    """diffusers' UNet and VAE for the config; with ``model``, holding its weight tensors (shared)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdkit.checkpoints import keys

    unet_params, fs, scale = _params()
    state = keys.split_compvis(model.state_dict()) if model is not None else None
    out = {}
    for part in parts:
        if part == "unet":
            cls, config = UNet2DConditionModel, keys.unet_diffusers_config(unet_params)
            weights = state and keys.unet_to_diffusers(state["unet"], unet_params)
        else:
            cls, config = AutoencoderKL, keys.vae_diffusers_config(fs["ddconfig"], fs["embed_dim"], scale)
            weights = state and keys.vae_to_diffusers(state["vae"], fs["ddconfig"])
        if weights is None:
            out[part] = cls(**config).eval()
            continue
        with torch.device("meta"):
            module = cls(**config)
        module.load_state_dict(weights, strict=True, assign=True)
        out[part] = module.eval()
    return out


def calls(model, reference: dict, part: str, batch: int, latent: int) -> dict:
    """{library: function running one call} for the inputs of this measurement (seeded)."""
    gen = torch.Generator().manual_seed(0)
    if part == "unet":
        x = torch.randn(batch, 4, latent, latent, generator=gen)
        t = torch.full((batch,), 500.0)
        context = torch.randn(batch, CONTEXT_TOKENS, 768, generator=gen)
        fns = {"sdkit": lambda: model.apply_model(x, t, context),
               "diffusers": lambda: reference["unet"](x, t, encoder_hidden_states=context).sample}
    else:
        z = torch.randn(batch, 4, latent, latent, generator=gen)
        scale = _params()[2]
        fns = {"sdkit": lambda: model.decode_first_stage(z),
               "diffusers": lambda: reference["vae"].decode(z / scale).sample}
    return {name: fn for name, fn in fns.items() if (model if name == "sdkit" else reference.get(part)) is not None}


def time_pair(fns: dict, repeats: int) -> dict:
    """Median seconds of each library over alternating rounds, and the per-round ratios."""
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        times = {"sdkit": [], "diffusers": []}
        for i in range(repeats):
            for name in (("sdkit", "diffusers") if i % 2 == 0 else ("diffusers", "sdkit")):
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    s, d = statistics.median(times["sdkit"]), statistics.median(times["diffusers"])
    rounds = [a / b for a, b in zip(times["sdkit"], times["diffusers"])]
    return {"sdkit": s, "diffusers": d, "ratio": s / d, "round_ratios": rounds}


def memory_child(impl: str, part: str, batch: int, latent: int) -> dict:
    """Run in a fresh process: MB a call adds to the resident set of the loaded model (see the module doc)."""
    torch.manual_seed(0)
    if impl == "sdkit":
        import sdkit
        model, reference = sdkit.load_model(CONFIG), {}
    else:
        model, reference = None, diffusers_modules(parts=(part,))
    (fn,) = calls(model, reference, part, batch, latent).values()
    with torch.inference_mode():
        fn()
        base = _rss_kb("VmRSS")
        _reset_peak_rss()
        for _ in range(2):
            fn()
        peak = _rss_kb("VmHWM")
    return {"mb": (peak - base) / 1024}


def _child_memory(impl: str, part: str, batch: int, latent: int, threads: int) -> float:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    job = json.dumps([impl, part, batch, latent, threads])
    out = subprocess.run([sys.executable, __file__, "--child", job], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 1])
    parser.add_argument("--latents", nargs="+", type=int, default=[16, 32], help="latent side (×8 = image side)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="times only (no child processes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, part, batch, latent, threads = json.loads(args.child)
        torch.set_num_threads(threads)
        print(json.dumps(memory_child(impl, part, batch, latent)))
        return
    torch.set_num_threads(args.threads)
    import diffusers

    import sdkit

    torch.manual_seed(0)
    model = sdkit.load_model(CONFIG)
    reference = diffusers_modules(model, args.parts)
    print(f"sdkit.load_model({CONFIG!r}) vs diffusers {diffusers.__version__} with the same weights; torch "
          f"{torch.__version__}, CPU float32, {torch.get_num_threads()} threads; time ratio: median over "
          f"{args.repeats} alternating rounds of the per-round ratio; memory: peak RSS a call adds, fresh process each"
          + (" (skipped)" if args.no_memory else ""))
    print(f"{'part':<5} {'batch':>5} {'latent':>6} {'sdkit s':>8} {'diffusers s':>11} {'time ratio':>10} "
          f"{'(medians)':>9} {'sdkit MB':>9} {'diffusers MB':>12} {'mem ratio':>9}")
    for part in args.parts:
        for batch in args.batches:
            for latent in args.latents:
                t = time_pair(calls(model, reference, part, batch, latent), args.repeats)
                line = (f"{part:<5} {batch:>5} {latent:>5}² {t['sdkit']:8.3f} {t['diffusers']:11.3f} "
                        f"{statistics.median(t['round_ratios']):10.3f} {t['ratio']:9.3f}")
                if not args.no_memory:
                    s, d = (_child_memory(impl, part, batch, latent, args.threads) for impl in ("sdkit", "diffusers"))
                    line += f" {s:9.1f} {d:12.1f} {s / d:9.3f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
