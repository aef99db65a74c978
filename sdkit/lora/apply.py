"""Applying LoRAs to a model: load, scale, merge, unmerge, remove; several at once.

    lora = sdkit.lora.load_lora(model, "style.safetensors", scale=0.8)
    lora.scale = 0.5            # takes effect at the next forward pass
    lora.merge()                # fold it into the weights (faster sampling); lora.unmerge() takes it out again
    lora.remove()               # the model is the base model again
    lora.save("copy.safetensors", layout="diffusers")

A LoRA acts through forward hooks (``sdkit.lora.adapters``), so while it is applied the model's ``state_dict()``
has exactly its CompVis keys and values; merged, the values include the update. Each ``load_lora`` call adds one
more LoRA: their updates add up. A file that does not fit the model is refused whole, with what it targets and what
the model has; ``parts=("unet",)`` applies only a file's UNet layers, on purpose.
"""
from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import torch
from torch import nn

from .adapters import LoRALayer, add_to_weight, attach
from .files import LayerWeights, LoRAError, LoRAFile, kohya_name, read_lora, write_lora
from .targets import (
    ATTENTION_PROJECTIONS,
    PARTS,
    Target,
    find_targets,
    text_encoder_kind,
)

_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> its LoRAs, in the order applied


class LoRA:
    """One LoRA applied to a model (see the module notes). ``layers`` maps diffusers/PEFT layer names to their
    :class:`~sdkit.lora.adapters.LoRALayer`; its parameters are what LoRA training optimises."""

    def __init__(self, model: nn.Module, targets: dict[str, Target], layers: dict[str, LoRALayer],
                 scale: float = 1.0, name: str = "lora"):
        self.model, self.name, self.targets = model, name, targets
        # ModuleDict keys may not contain dots: the kohya names (underscores) are unique
        self.layers = nn.ModuleDict({kohya_name(n): layer for n, layer in layers.items()})
        self._names = list(layers)
        self._scale, self._merged, self._removed = float(scale), False, False
        self._hooks = [h for n in self._names for h in attach(targets[n], self.layer(n), self._hook_scale)]
        _APPLIED.setdefault(model, []).append(self)

    # ------------------------------------------------------------------ state
    def layer(self, name: str) -> LoRALayer:
        return self.layers[kohya_name(name)]

    def _hook_scale(self) -> float:
        return 0.0 if self._merged or self._removed else self._scale

    @property
    def scale(self) -> float:
        """The factor s of the update W + s·α/r·B·A (0: the base model's output, exactly)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"a LoRA scale must be a finite number, got {value}")
        if self._merged:          # a merged LoRA is re-merged at the new scale
            self._add_to_weights(value - self._scale)
        self._scale = value

    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def rank(self) -> int:
        return max(self.layer(n).rank for n in self._names)

    def parameters(self):
        return self.layers.parameters()

    # ------------------------------------------------------------------ operations
    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError(f"LoRA {self.name!r} was removed from its model; load it again")

    def _add_to_weights(self, factor: float) -> None:
        for n in self._names:
            add_to_weight(self.targets[n], self.layer(n), factor)

    def merge(self) -> LoRA:
        """Fold the update into the model's weights (the hooks then add nothing)."""
        self._check_alive()
        if not self._merged:
            self._add_to_weights(self._scale)
            self._merged = True
        return self

    def unmerge(self) -> LoRA:
        """Take a merged update out of the weights again (the hooks add it from then on)."""
        self._check_alive()
        if self._merged:
            self._add_to_weights(-self._scale)
            self._merged = False
        return self

    def remove(self) -> None:
        """Take the LoRA off the model (unmerging it first): the model computes what it did before."""
        if self._removed:
            return
        self.unmerge()
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._removed = [], True
        applied = _APPLIED.get(self.model, [])
        if self in applied:
            applied.remove(self)

    # ------------------------------------------------------------------ files
    def layer_weights(self) -> dict[str, LayerWeights]:
        """The current weights of every layer, by diffusers/PEFT name."""
        return {n: LayerWeights(self.layer(n).down.detach().cpu(), self.layer(n).up.detach().cpu(),
                                self.layer(n).alpha, self.targets[n].is_conv) for n in self._names}

    def save(self, path: str | os.PathLike, layout: str = "kohya", dtype: torch.dtype = torch.float32) -> Path:
        """Write the LoRA as a .safetensors file in the kohya/A1111 or the diffusers/PEFT layout (atomically).
        The user scale is not part of the file: a LoRA file holds the update at scale 1."""
        return write_lora(path, self.layer_weights(), layout, dtype)

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("merged" if self._merged else "applied")
        parts = sorted({self.targets[n].part for n in self._names})
        return (f"LoRA({self.name!r}, {len(self._names)} layers of {'+'.join(parts)}, rank {self.rank}, "
                f"scale {self._scale:g}, {state})")


def applied_loras(model: nn.Module) -> list[LoRA]:
    """The LoRAs applied to ``model`` (not removed), in the order they were applied."""
    return list(_APPLIED.get(model, []))


# ================================================================================================ matching


def match_layers(model: nn.Module, lora: LoRAFile, parts=PARTS) -> tuple[dict[str, Target], dict[str, LayerWeights]]:
    """The model's layer and the file's weights for every layer of ``lora`` in ``parts``, by diffusers name.
    Refuses (LoRAError) a file any of whose layers in ``parts`` the model does not have or has in other shapes."""
    unknown_parts = set(parts) - set(PARTS)
    if unknown_parts:
        raise ValueError(f"parts must be among {PARTS}, got {sorted(unknown_parts)}")
    targets = find_targets(model)
    lookup = {}
    for t in targets.values():
        lookup.update(dict.fromkeys(t.aliases, t))
    source = f"the LoRA file {lora.path!r}" if lora.path else "the LoRA"
    wanted = {n: w for n, w in lora.layers.items() if lora.part_of(n) in parts or lora.part_of(n) == "other"}
    text_layers = [n for n in wanted if lora.part_of(n) == "text_encoder"]
    if text_layers and not any(t.part == "text_encoder" for t in targets.values()):
        raise LoRAError(f"{source} changes {len(text_layers)} layers of a CLIP text encoder, but this model's "
                        f"text encoder is {text_encoder_kind(model)}. Pass parts=('unet',) to apply only its "
                        f"UNet layers (the LoRA was trained with its text-encoder part, so results will differ).")
    missing = [n for n in wanted if n not in lookup]
    if missing:
        raise LoRAError(f"{source} changes {len(missing)} of its {len(lora.layers)} layers that this model does not "
                        f"have: {_explain_unknown(missing)}. This model has {len(targets)} layers a LoRA can change, "
                        f"e.g. {next(iter(targets.values())).kohya_name}.")
    matched_targets, matched_weights = {}, {}
    wrong = []
    for n, w in wanted.items():
        t = lookup[n]
        if (w.down.shape[1], w.up.shape[0]) != (t.in_features, t.out_features):
            wrong.append((n, t, w))
        matched_targets[t.name], matched_weights[t.name] = t, w
    if wrong:
        raise LoRAError(f"{source} does not fit this model: {_explain_shapes(wrong)}")
    if not matched_targets:
        raise LoRAError(f"{source} has no layers in parts {tuple(parts)}")
    return matched_targets, matched_weights


def _explain_unknown(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return f"{shown} (a second text encoder: the file is for SDXL, not SD v1)"
    if any(k in n for n in names for k in ("resnets", "conv1", "conv2", "conv_in", "conv_out", "time_emb",
                                           "downsamplers", "upsamplers", "conv_shortcut")):
        return (f"{shown} (ResBlock / conv layers: a LoCon or LyCORIS file; sdkit applies LoRA to the attention "
                f"and transformer layers only)")
    return f"{shown} (made for another architecture or number of transformer blocks, e.g. SDXL)"


def _explain_shapes(wrong: list[tuple[str, Target, LayerWeights]]) -> str:
    context = [(n, t, w) for n, t, w in wrong if t.name.endswith(("attn2.to_k", "attn2.to_v"))]
    if context and len(context) == len(wrong):
        _, t, w = context[0]
        sd2 = " (SD 2.x uses 1024)" if w.down.shape[1] == 1024 else ""
        return (f"its cross-attention layers read text states of width {w.down.shape[1]}{sd2}, this model's read "
                f"{t.in_features} (SD v1: 768). The LoRA was made for another text encoder.")
    n, t, w = wrong[0]
    return (f"{len(wrong)} layers have other shapes, e.g. {n}: the file's update is [{w.up.shape[0]} x "
            f"{w.down.shape[1]}], the model's layer [{t.out_features} x {t.in_features}]. The LoRA was made for "
            f"a model of another size (for example SD v1 vs the kit's tiny model).")


# ================================================================================================ entry points


def apply_lora(model: nn.Module, lora: LoRAFile | dict[str, LayerWeights], scale: float = 1.0, *,
               parts=PARTS, name: str | None = None) -> LoRA:
    """Apply LoRA weights already read (a :class:`LoRAFile` or {layer name: LayerWeights}) to ``model``."""
    if not isinstance(lora, LoRAFile):
        lora = LoRAFile(dict(lora), "diffusers")
    targets, weights = match_layers(model, lora, parts)
    device = next(model.parameters()).device
    layers = {n: LoRALayer(w.down, w.up, w.alpha).to(device) for n, w in weights.items()}
    return LoRA(model, targets, layers, scale, name or (Path(lora.path).stem if lora.path else "lora"))


def load_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0, *, parts=PARTS) -> LoRA:
    """Read a LoRA file (kohya/A1111 or diffusers/PEFT layout) and apply it to ``model`` at ``scale``."""
    return apply_lora(model, read_lora(path), scale, parts=parts)


def save_lora(lora: LoRA, path: str | os.PathLike, layout: str = "kohya", dtype: torch.dtype = torch.float32) -> Path:
    """Write an applied LoRA as a .safetensors file (``layout`` "kohya" or "diffusers")."""
    return lora.save(path, layout, dtype)


def create_lora(model: nn.Module, rank: int = 4, alpha: float | None = None, *,
                layers: tuple[str, ...] = ATTENTION_PROJECTIONS, text_encoder_layers: tuple[str, ...] = (),
                seed: int = 0, name: str = "lora") -> LoRA:
    """A new, trainable LoRA on ``model``: ``layers`` picks the UNet layers by the end of their names (default:
    the attention projections to_q/to_k/to_v/to_out.0 of attn1 and attn2; add "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2"), ``text_encoder_layers`` the CLIP text layers ("q_proj", "mlp.fc1", ...). As in
    LoRA's paper and kohya's trainer, A starts random (Kaiming-uniform) and B at zero: the model starts unchanged.
    ``alpha`` (default: the rank) makes the update α/r·B·A."""
    if int(rank) < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    targets = find_targets(model)
    chosen = {n: t for n, t in targets.items()
              if (t.part == "unet" and t.name.endswith(tuple("." + s for s in layers)))
              or (t.part == "text_encoder" and t.name.endswith(tuple("." + s for s in text_encoder_layers)))}
    if text_encoder_layers and not any(t.part == "text_encoder" for t in chosen.values()):
        raise LoRAError(f"text_encoder_layers={text_encoder_layers}: this model's text encoder is "
                        f"{text_encoder_kind(model)}, not CLIP; sdkit's LoRA changes CLIP text layers only")
    if not chosen:
        raise LoRAError(f"layers={layers} picks none of this model's {len(targets)} LoRA layers; use the ends of "
                        f"their names, e.g. 'to_q', 'attn2.to_k', 'proj_in', 'ff.net.2'")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    new = {}
    for n, t in chosen.items():
        # kaiming_uniform_(a=√5) as torch's Linear default: bound = 1/√in
        bound = 1.0 / math.sqrt(t.in_features)
        down = (torch.rand(rank, t.in_features, generator=generator) * 2 - 1) * bound
        new[n] = LoRALayer(down, torch.zeros(t.out_features, rank), alpha).to(device)
    return LoRA(model, chosen, new, 1.0, name)
