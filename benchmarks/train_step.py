"""One training step of the small text-to-image UNet: sdkit vs the same loop on diffusers' UNet2DConditionModel.

    python benchmarks/train_step.py                          # tiny t2i recipe (stage 1) UNet, batch 32, CPU fp32
    python benchmarks/train_step.py --config tiny-test --batch 8
    python benchmarks/train_step.py --device cuda --batch 64

Both sides build the same architecture (diffusers' config comes from sdkit.checkpoints.keys.unet_diffusers_config,
and sdkit's weights are copied into it), see the same noisy latents, timesteps and text context, and run the
same loop: forward, ε-MSE loss, backward, AdamW step. sdkit's side goes through LatentDiffusion's training
objective (q_sample → apply_model → loss), as the Lightning module does. The two are timed alternately in one
process (step A, step B, A, B, ...) so that load from other programs hits both alike; the median of ``--steps``
steps after ``--warmup`` steps is reported, with the ratio sdkit / diffusers (below 1.0: sdkit is faster).
The first-step losses are printed too: with the same weights and inputs they agree to float rounding.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf


def build(config: str, device: str):
    from diffusers import UNet2DConditionModel

    from sdkit.checkpoints.keys import unet_diffusers_config, unet_to_diffusers
    from sdkit.config import instantiate_from_config, load_config

    params = load_config(config).model.params
    unet_params = OmegaConf.to_container(params.unet_config.params, resolve=True)
    unet_params["use_checkpoint"] = False  # speed: no activation recomputation on either side
    torch.manual_seed(0)
    ldm_cfg = OmegaConf.to_container(load_config(config).model, resolve=True)
    ldm_cfg["params"]["unet_config"]["params"] = unet_params
    ldm_cfg["params"]["cond_stage_config"] = "__is_unconditional__"  # the context is given directly
    ldm_cfg["params"]["conditioning_key"] = "crossattn"
    ldm_cfg["params"]["use_ema"] = False
    ldm = instantiate_from_config(ldm_cfg).to(device)
    ldm.model.conditioning_key = "crossattn"
    theirs = UNet2DConditionModel(**unet_diffusers_config(unet_params, params.image_size)).to(device)
    sd = {k[len("model.diffusion_model."):]: v for k, v in ldm.state_dict().items()
          if k.startswith("model.diffusion_model.")}
    theirs.load_state_dict(unet_to_diffusers(sd, unet_params))
    return ldm, theirs, unet_params, int(params.image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sdkit/configs/recipes/tiny-t2i/stage1.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    ldm, theirs, unet_params, size = build(args.config, args.device)
    g = torch.Generator().manual_seed(1)
    b, c = args.batch, unet_params["in_channels"]
    z0 = torch.randn(b, c, size, size, generator=g).to(args.device)
    noise = torch.randn(b, c, size, size, generator=g).to(args.device)
    t = torch.randint(0, 1000, (b,), generator=g).to(args.device)
    context = torch.randn(b, 77, unet_params["context_dim"], generator=g).to(args.device)
    ldm.train()
    theirs.train()
    opt_ours = torch.optim.AdamW(ldm.model.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours() -> float:
        loss, _ = ldm.p_losses(z0, context, t, noise=noise)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_theirs() -> float:
        x_t = ldm.q_sample(z0, t, noise=noise)  # the same forward-process arithmetic on both sides
        loss = F.mse_loss(theirs(x_t, t, encoder_hidden_states=context).sample, noise)
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss.item()

    def timed(fn) -> tuple[float, float]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, value

    times = {"sdkit": [], "diffusers": []}
    for i in range(args.warmup + args.steps):
        (ta, la), (tb, lb) = timed(step_ours), timed(step_theirs)
        if i == 0:
            print(f"first-step loss: sdkit {la:.6f}, diffusers {lb:.6f} (same weights and inputs)")
        if i >= args.warmup:
            times["sdkit"].append(ta)
            times["diffusers"].append(tb)
    n_params = sum(p.numel() for p in ldm.model.parameters()) / 1e6
    ours, ref = statistics.median(times["sdkit"]), statistics.median(times["diffusers"])
    print(f"{args.config}: UNet {n_params:.1f}M params, batch {b}, latents {c}×{size}×{size}, "
          f"device {args.device}, {torch.get_num_threads()} threads")
    print(f"training step (median of {args.steps}): sdkit {ours * 1000:.0f} ms, diffusers {ref * 1000:.0f} ms, "
          f"ratio sdkit/diffusers {ours / ref:.3f}")


if __name__ == "__main__":
    main()
