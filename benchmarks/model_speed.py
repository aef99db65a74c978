"""UNet forward and VAE decode: sdkit vs diffusers, time and peak memory, from one run.

    python benchmarks/model_speed.py                 # full SD v1 and tiny-test configs, CPU fp32
    python benchmarks/model_speed.py --latent 64     # 512×512 images (slow on a CPU)
    python benchmarks/model_speed.py --device cuda --dtype float16 --latent 64

Each measurement runs in a fresh process, so one model's allocations never count against another. Time is the
median of ``--repeats`` calls after one warm-up call; memory is the peak resident set (CPU, from VmHWM after
resetting it) or torch's peak allocation (CUDA) during those calls, above what the built model already holds.
On the CPU the memory child runs with glibc's mmap threshold fixed at 64 KiB, so each tensor is its own mapping and is
returned to the system when freed: the peak RSS then follows the peak of live tensors instead of the allocator's
caching, which otherwise makes the numbers wander by ±20% between runs.
The ratio column is sdkit / diffusers: below 1.0 means sdkit is faster or smaller.
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


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS counter (Linux)
        f.write("5")


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(impl: str, part: str, config: str, device: str, dtype: torch.dtype):
    """The module to time and a function that runs it once."""
    from omegaconf import OmegaConf

    from sdkit.checkpoints.keys import unet_diffusers_config, vae_diffusers_config
    from sdkit.config import load_config

    torch.manual_seed(0)
    params = load_config(config).model.params
    if part == "unet":
        unet_params = OmegaConf.to_container(params.unet_config.params)
        unet_params["use_checkpoint"] = False  # inference: no gradient checkpointing on either side
        if impl == "sdkit":
            from sdkit.nn.unet import UNetModel
            model = UNetModel(**unet_params)
        else:
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel(**unet_diffusers_config(unet_params))
        ctx_dim = unet_params["context_dim"]
        return model, lambda m, x: m(x, torch.full((x.shape[0],), 500, device=x.device),
                                     torch.randn(x.shape[0], 77, ctx_dim, device=x.device, dtype=x.dtype)), \
            unet_params["in_channels"]
    fs = OmegaConf.to_container(params.first_stage_config.params)
    if impl == "sdkit":
        from sdkit.nn.autoencoder import AutoencoderKL
        model = AutoencoderKL(ddconfig=fs["ddconfig"], embed_dim=fs["embed_dim"])
        return model, lambda m, z: m.decode(z), fs["embed_dim"]
    from diffusers import AutoencoderKL as DiffusersVAE
    model = DiffusersVAE(**vae_diffusers_config(fs["ddconfig"], fs["embed_dim"]))
    return model, lambda m, z: m.decode(z).sample, fs["embed_dim"]


def measure(impl: str, part: str, config: str, latent: int, batch: int, repeats: int, device: str,
            dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    model, run, channels = build(impl, part, config, device, dtype)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, channels, latent, latent, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        run(model, x)  # warm-up (allocator, kernels)
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_kb("VmRSS") * 1024
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(model, x)
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_kb("VmHWM") * 1024
    return {"seconds": statistics.median(times), "peak_mb": (peak - base) / 2 ** 20}


def _child(job: str, extra_env: dict) -> dict:
    """Run one measurement in a fresh process (time and memory use separate processes: the mmap setting that
    makes memory exact slows allocation down)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **extra_env}
    out = subprocess.run([sys.executable, __file__, "--child", job], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["sd-v1-inference", "tiny-test"])
    parser.add_argument("--parts", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
    parser.add_argument("--latent", type=int, default=16, help="latent side (×8 = image side for SD v1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"latent {args.latent}², batch {args.batch}, median of {args.repeats}")
    print(f"{'config':<16} {'part':<5} {'sdkit s':>9} {'diffusers s':>12} {'time ratio':>10} "
          f"{'sdkit MB':>9} {'diffusers MB':>13} {'mem ratio':>9}")
    for config in args.configs:
        for part in args.parts:
            res = {}
            for impl in ("sdkit", "diffusers"):
                job = json.dumps([impl, part, config, args.latent, args.batch, args.repeats, args.device, args.dtype])
                timing = _child(job, {})
                memory = _child(job, {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"})
                res[impl] = {"seconds": timing["seconds"], "peak_mb": memory["peak_mb"]}
            s, d = res["sdkit"], res["diffusers"]
            print(f"{config:<16} {part:<5} {s['seconds']:9.4f} {d['seconds']:12.4f} {s['seconds'] / d['seconds']:10.3f} "
                  f"{s['peak_mb']:9.1f} {d['peak_mb']:13.1f} {s['peak_mb'] / max(d['peak_mb'], 1e-9):9.3f}")


if __name__ == "__main__":
    main()
