"""Low-rank weight deltas on every linear and convolution layer of a network (LoRA / LoCon), kept outside it.

A :class:`LowRankDelta` holds, for each ``nn.Linear`` and ``nn.Conv2d`` weight W [out, in, (kh, kw)] of a network,
two factors ``up`` [out, r] and ``down`` [r, in·kh·kw] and stands for the network with the weights

    W' = W + (α / r) · (up @ down).view_as(W)

(Hu et al. 2021, "LoRA"; the convolution form is LoCon's: a kh×kw conv to r channels, then a 1×1 conv back). It
never modifies the network it describes:

- training runs the network through :func:`torch.func.functional_call` with W' swapped in (:meth:`LowRankDelta.run`),
  so one frozen network serves as the teacher, as the student (this delta) and as an EMA target (another delta),
  and checkpoints hold its weights once, keys unchanged (the CompVis contract);
- inference merges ΔW into the weights once (:meth:`LowRankDelta.merge_into`): the merged network is a plain SD v1
  UNet at the plain UNet's speed, and ``merge_into(net, sign=-1)`` takes it back out (up to float rounding).

``up`` starts at zero, so a fresh delta is the identity (W' = W). Files are safetensors in the kohya LoCon layout
(``lora_unet_<layer>.lora_down.weight`` [r, in, kh, kw], ``.lora_up.weight`` [out, r, 1, 1], ``.alpha``), with the
CompVis layer names (dots → underscores), plus string metadata; :func:`save_delta` / :func:`load_delta`. The base
network's digest is stored too, so a delta is never merged into weights it was not trained against.

Size: for the shipped tiny UNet (17.6 M weights in 262 layers), rank 8 is 1.2 M numbers (2.4 MB in float16),
rank 16 is 2.4 M (4.9 MB), rank 32 is 4.9 M (9.7 MB).
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

PREFIX = "lora_unet_"


class DeltaFileError(ValueError):
    """A delta file that does not fit the network it is applied to (other layers, shapes or base weights)."""


def target_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The layers a delta adapts: every Linear and Conv2d (conv subclasses included), by module name."""
    return {name: m for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def file_key(name: str) -> str:
    return PREFIX + name.replace(".", "_")


def base_digest(net: nn.Module) -> str:
    """sha1 of the targeted weights rounded to float16: the same for the shipped float16 file loaded in any
    dtype, different for any other weights (a retrained base)."""
    h = hashlib.sha1()
    for name, layer in target_layers(net).items():
        h.update(name.encode())
        h.update(layer.weight.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LowRankDelta(nn.Module):
    """Factors of a rank-``rank`` update for every targeted weight of ``net`` (see the module docstring).

    Args:
        net: the network whose layers the delta adapts (it is not stored, only its layer names and shapes).
        rank: r, capped per layer at min(out, in·kh·kw).
        alpha: α; the update is scaled by α/r (None: α = r, scale 1, as LCM-LoRA trained it).
        seed: seed of the ``down`` initialisation (peft's: uniform in ±1/√fan_in); ``up`` starts at zero.
    """

    def __init__(self, net: nn.Module, rank: int = 16, alpha: float | None = None, seed: int = 0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        layers = target_layers(net)
        if not layers:
            raise ValueError(f"{type(net).__name__} has no Linear or Conv2d layer to adapt")
        self.names = list(layers)
        self.shapes = [tuple(layers[n].weight.shape) for n in self.names]
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        generator = torch.Generator().manual_seed(seed)
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for shape in self.shapes:
            fan_in = math.prod(shape[1:])
            r = min(rank, shape[0], fan_in)
            bound = 1.0 / math.sqrt(fan_in)
            self.down.append(nn.Parameter((torch.rand(r, fan_in, generator=generator) * 2 - 1) * bound))
            self.up.append(nn.Parameter(torch.zeros(shape[0], r)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def delta(self, i: int) -> torch.Tensor:
        """ΔW of layer ``i`` in the layer's weight shape."""
        return (self.scale * (self.up[i] @ self.down[i])).view(self.shapes[i])

    def weights(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """``{"<layer>.weight": W + ΔW}`` for :func:`torch.func.functional_call` (differentiable in the factors)."""
        layers = target_layers(net)
        return {f"{n}.weight": layers[n].weight + self.delta(i).to(layers[n].weight.dtype)
                for i, n in enumerate(self.names)}

    def run(self, net: nn.Module, *args, **kwargs):
        """``net(*args, **kwargs)`` with W' in place of W; ``net`` itself is left as it is."""
        return torch.func.functional_call(net, self.weights(net), args, kwargs)

    @torch.no_grad()
    def merge_into(self, net: nn.Module, sign: float = 1.0) -> nn.Module:
        """Add ``sign``·ΔW to ``net``'s weights in place (sign −1 takes a merged delta back out)."""
        self.check_fits(net)
        layers = target_layers(net)
        for i, n in enumerate(self.names):
            w = layers[n].weight
            w.add_((sign * self.delta(i).to(torch.float32)).to(w.dtype))
        return net

    @torch.no_grad()
    def lerp_towards(self, other: LowRankDelta, weight: float) -> None:
        """EMA update: self ← self + weight·(other − self), factor by factor (LCM's target network is an EMA of
        the student's weights; the product of averaged factors differs from the averaged product ΔW only to second
        order in the factors' change over the EMA window, ~20 steps at decay 0.95)."""
        for mine, theirs in zip(self.parameters(), other.parameters()):
            mine.lerp_(theirs.detach(), weight)

    def check_fits(self, net: nn.Module) -> None:
        layers = target_layers(net)
        missing = [n for n in self.names if n not in layers]
        wrong = [n for n, s in zip(self.names, self.shapes) if n in layers and tuple(layers[n].weight.shape) != s]
        if missing or wrong:
            raise DeltaFileError(f"this low-rank delta does not fit {type(net).__name__}: {len(missing)} of its "
                                 f"layers are missing ({missing[:3]}), {len(wrong)} have other shapes ({wrong[:3]}); "
                                 "it was made for another architecture")

    @classmethod
    @torch.no_grad()
    def from_difference(cls, base: nn.Module, tuned: nn.Module, rank: int = 16) -> LowRankDelta:
        """The rank-``rank`` delta closest to a fine-tune: for each layer, the truncated SVD of ΔW = W_tuned − W_base
        (reshaped [out, in·kh·kw]), which by Eckart–Young is the best rank-r approximation in the Frobenius norm.
        This is how a full fine-tune (e.g. DreamBooth) is shipped as a small file ("extract LoRA" in kohya's
        tools); ``relative_error`` says what the truncation lost."""
        delta = cls(base, rank=rank)
        delta.check_fits(tuned)
        base_layers, tuned_layers = target_layers(base), target_layers(tuned)
        lost = total = 0.0
        for i, n in enumerate(delta.names):
            diff = (tuned_layers[n].weight.double() - base_layers[n].weight.double()).reshape(delta.shapes[i][0], -1)
            u, s, vh = torch.linalg.svd(diff, full_matrices=False)
            r = delta.down[i].shape[0]
            delta.up[i].copy_((u[:, :r] * s[:r]).float())
            delta.down[i].copy_(vh[:r].float())
            lost += float((s[r:] ** 2).sum())
            total += float((s ** 2).sum())
        delta.relative_error = math.sqrt(lost / total) if total else 0.0   # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F, all layers
        return delta

    # ------------------------------------------------------------------ files
    def state_for_file(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The kohya LoCon tensors: down [r, in, kh, kw] (or [r, in]), up [out, r, 1, 1] (or [out, r]), alpha."""
        state = {}
        for i, (n, shape) in enumerate(zip(self.names, self.shapes)):
            r = self.down[i].shape[0]
            conv = len(shape) == 4
            state[f"{file_key(n)}.lora_down.weight"] = self.down[i].detach().reshape(
                (r, *shape[1:]) if conv else (r, shape[1])).to(dtype).contiguous()
            state[f"{file_key(n)}.lora_up.weight"] = self.up[i].detach().reshape(
                (shape[0], r, 1, 1) if conv else (shape[0], r)).to(dtype).contiguous()
            # α/r is the scale; a per-layer α keeps it when r was capped at a small layer's size
            state[f"{file_key(n)}.alpha"] = torch.tensor(self.scale * r, dtype=torch.float32)
        return state

    @classmethod
    def from_file_state(cls, net: nn.Module, state: dict[str, torch.Tensor], rank: int) -> LowRankDelta:
        """A delta for ``net`` holding the factors of a file (the inverse of :meth:`state_for_file`)."""
        delta = cls(net, rank=rank)
        expected = {f"{file_key(n)}.{part}" for n in delta.names for part in ("lora_down.weight",
                                                                               "lora_up.weight", "alpha")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise DeltaFileError(f"the delta file's layers do not match {type(net).__name__}: {len(missing)} "
                                 f"missing ({missing[:3]}), {len(unexpected)} unexpected ({unexpected[:3]})")
        with torch.no_grad():
            for i, n in enumerate(delta.names):
                down, up = state[f"{file_key(n)}.lora_down.weight"], state[f"{file_key(n)}.lora_up.weight"]
                r = down.shape[0]
                if down.numel() != delta.down[i].numel() or up.numel() != delta.up[i].numel():
                    raise DeltaFileError(f"layer {n}: the file's factors {tuple(down.shape)}, {tuple(up.shape)} do "
                                         f"not fit its weight {delta.shapes[i]} at rank {rank}")
                alpha = float(state[f"{file_key(n)}.alpha"])
                delta.down[i].copy_(down.reshape(r, -1).float())
                # fold the file's per-layer α/r into up, so delta.scale (α = rank) applies to every layer alike
                delta.up[i].copy_(up.reshape(up.shape[0], r).float() * (alpha / r) / delta.scale)
        return delta


def save_delta(delta: LowRankDelta, net: nn.Module, path: str | os.PathLike, metadata: dict | None = None,
               dtype: torch.dtype = torch.float16) -> Path:
    """Write ``delta`` (trained against ``net``'s weights) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    from ..atomic import atomic_file

    path = Path(path)
    meta = {"format": "sdkit-lowrank-delta", "layout": "kohya-locon, CompVis layer names", "rank": str(delta.rank),
            "base_digest": base_digest(net), **{k: str(v) for k, v in (metadata or {}).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(delta.state_for_file(dtype), str(tmp), metadata=meta)
    return path


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a delta file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no low-rank delta file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 (safe_open has keys(), no iteration)
    if meta.get("format") != "sdkit-lowrank-delta":
        raise DeltaFileError(f"{path} is not an sdkit low-rank delta file (metadata format "
                             f"{meta.get('format')!r}); LoRA files of the attention layers load with sdkit.lora")
    return state, meta


def load_delta(net: nn.Module, path: str | os.PathLike, check_base: bool = True) -> tuple[LowRankDelta, dict]:
    """The delta stored in ``path`` for ``net``, and the file's metadata. With ``check_base``, a file trained
    against other base weights than ``net``'s is refused (merging it would give a wrong model, silently)."""
    state, meta = read_delta(path)
    if check_base and meta.get("base_digest") not in (None, base_digest(net)):
        raise DeltaFileError(f"{path} was trained against other base weights than this model's (base digest "
                             f"{meta.get('base_digest', '')[:12]}… vs {base_digest(net)[:12]}…): it belongs to "
                             f"{meta.get('base', 'another model')!r} as it was when the delta was made")
    return LowRankDelta.from_file_state(net, state, int(meta.get("rank", 16))), meta


def merge_delta_file(model: nn.Module, path: str | os.PathLike, sign: float = 1.0) -> dict:
    """Merge the delta file ``path`` into a LatentDiffusion model's UNet (``model.model.diffusion_model``; any
    other module as it is) in place, and return the file's metadata, also kept as ``model.delta_meta``.
    ``sign=-1`` takes a merged delta back out (the base model again, up to float rounding)."""
    net = getattr(getattr(model, "model", None), "diffusion_model", model)
    delta, meta = load_delta(net, path, check_base=sign > 0)
    delta.merge_into(net, sign)
    model.delta_meta = {**meta, "path": str(path)} if sign > 0 else None
    return meta
