"""LoRA files: the kohya/A1111 single-file layout and the diffusers/PEFT layout, read and written as .safetensors.

kohya / A1111 (what most shared SD v1 LoRAs are)::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   [r, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     [out, r]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              [] (scale α/r)
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight                           [r, in, 1, 1]
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                   [r, in]

diffusers / PEFT (``StableDiffusionPipeline.save_lora_weights`` → ``pytorch_lora_weights.safetensors``)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight             [r, in]
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight             [out, r]
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight

Its α is in the file's ``lora_adapter_metadata`` (PEFT's LoraConfig: ``lora_alpha``, ``alpha_pattern``), or in a
PEFT folder's ``adapter_config.json``; without either, α = r (scale 1), as diffusers reads it. Also read: PEFT
state dicts without the ``unet.`` prefix, ``base_model.model.`` prefixes, and the older diffusers names
(``…attn1.processor.to_q_lora.down.weight``, ``…q_proj.lora_linear_layer.down.weight``). sdkit writes the
diffusers layout with α/r folded into B (``lora_B``), so every reader gets the same scale without metadata.

Layer names stay as the file has them (kohya names cannot be turned into dotted paths without the model:
``transformer_blocks`` has underscores of its own); ``sdkit.lora.apply`` matches them to the model's layers.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_file

LAYOUTS = ("kohya", "diffusers")
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
METADATA_KEY = "lora_adapter_metadata"          # where diffusers keeps PEFT's LoraConfig in the file


class LoRAError(ValueError):
    """A LoRA file that cannot be read, or that does not fit the model."""


@dataclass
class LayerWeights:
    """One layer's update as stored: ``down`` A [r, in], ``up`` B [out, r], ``alpha`` (None: α = r), and whether
    the layer is a 1x1 conv (the file stores [r, in, 1, 1] / [out, r, 1, 1] then)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    conv: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoRAFile:
    """The layers of a LoRA file by the file's own names, its layout and its metadata."""

    layers: dict[str, LayerWeights]
    layout: str
    path: str = ""
    metadata: dict = field(default_factory=dict)

    def part_of(self, name: str) -> str:
        """"unet", "text_encoder" or "other" for a layer name of this file."""
        for prefix, part in KOHYA_PARTS.items():
            if name.startswith(prefix):
                return part
        head = name.split(".", 1)[0]
        return head if head in ("unet", "text_encoder") else "other"


# ================================================================================================ reading


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Read a LoRA file (.safetensors, or a .pt/.ckpt pickle read with weights_only) or a folder holding
    ``pytorch_lora_weights.safetensors`` (diffusers) / ``adapter_model.safetensors`` (PEFT)."""
    from ..checkpoints.read import read_checkpoint

    path = Path(path)
    config = {}
    if path.is_dir():
        found = [path / name for name in FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise LoRAError(f"{str(path)!r} is a folder without a LoRA file ({' or '.join(FOLDER_FILES)}); pass "
                            "the LoRA .safetensors file itself")
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
        path = found[0]
    state, meta = read_checkpoint(path)
    metadata = dict(meta.get("metadata") or {})
    keys = list(state)
    if any(k.startswith((*KOHYA_PARTS, "lora_te2_")) for k in keys):
        return LoRAFile(_read_kohya(state, path), "kohya", str(path), metadata)
    if any(_DIFFUSERS_KEY.match(k) for k in keys):
        peft_config = config or _metadata_config(metadata)
        return LoRAFile(_read_diffusers(state, path, peft_config), "diffusers", str(path), metadata)
    raise LoRAError(f"{str(path)!r} is not a LoRA file: {_what_it_is(keys)}")


def _what_it_is(keys: list[str]) -> str:
    """A description of a state dict that holds no LoRA layers, for the error message."""
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "it is a full model checkpoint (CompVis keys); load it with sdkit.load_model(config, path)"
    if "emb_params" in keys or "string_to_param" in keys:
        return "it is a textual-inversion embedding, not a LoRA"
    if any(re.search(r"\.(hada_w|lokr_w|oft_)", k) for k in keys):
        return "it is a LyCORIS file (LoHa / LoKr / OFT), which sdkit does not apply; use a plain LoRA"
    shown = ", ".join(keys[:3]) or "(no tensors)"
    return (f"none of its {len(keys)} keys (e.g. {shown}) are LoRA weights (kohya's lora_unet_….lora_down.weight "
            f"or diffusers/PEFT's unet.….lora_A.weight)")


def _as_matrix(t: torch.Tensor, key: str, path: Path) -> tuple[torch.Tensor, bool]:
    """A [r, in] / [out, r] matrix from a Linear (2-D) or 1x1-conv (4-D) LoRA weight; (matrix, was a conv)."""
    if t.ndim == 2:
        return t, False
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.flatten(1), True
    raise LoRAError(f"{str(path)!r}: {key} has shape {tuple(t.shape)}; sdkit applies LoRA to Linear layers and 1x1 "
                    "convolutions (a LoRA of k×k convs, LoCon/LyCORIS, is not supported)")


def _pair(name: str, down, up, alpha, path: Path) -> LayerWeights:
    if down is None or up is None:
        raise LoRAError(f"{str(path)!r} is incomplete: layer {name} has a {'down' if up is None else 'up'} weight "
                        f"but no {'up' if up is None else 'down'} weight")
    (down, conv), (up, _) = _as_matrix(*down, path), _as_matrix(*up, path)
    if up.shape[1] != down.shape[0]:
        raise LoRAError(f"{str(path)!r}: layer {name} has down {tuple(down.shape)} and up {tuple(up.shape)}: their "
                        f"ranks differ ({down.shape[0]} vs {up.shape[1]}), so the file is damaged")
    return LayerWeights(down.float(), up.float(), None if alpha is None else float(alpha), conv)


def _read_kohya(state: dict, path: Path) -> dict[str, LayerWeights]:
    parts: dict[str, dict[str, tuple]] = {}
    for key, tensor in state.items():
        name, _, kind = key.partition(".")
        if kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            what = "DoRA (dora_scale)" if kind == "dora_scale" else f"'{kind}'"
            raise LoRAError(f"{str(path)!r}: key {key} holds {what}, which a plain LoRA file does not have; sdkit "
                            "reads lora_down.weight, lora_up.weight and alpha")
        parts.setdefault(name, {})[kind] = (tensor, key)
    return {name: _pair(name, p.get("lora_down.weight"), p.get("lora_up.weight"),
                        p["alpha"][0].item() if "alpha" in p else None, path)
            for name, p in parts.items()}


# (layer path).(lora_A | lora_B | lora.down | lora.up | lora_linear_layer.down | …)(.default).weight, or .alpha
_DIFFUSERS_KEY = re.compile(r"^(?P<name>.+?)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                            r"lora_linear_layer\.up)(\.default)?\.weight$")
_PROCESSOR_KEY = re.compile(r"^(?P<block>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)"
                            r"\.weight$")
_PART_OF_PATH = {"down_blocks.": "unet.", "mid_block.": "unet.", "up_blocks.": "unet.",
                 "text_model.": "text_encoder."}


def _diffusers_name(name: str) -> str:
    """The layer name with its part prefix (``unet.`` / ``text_encoder.``), whatever prefix the file used."""
    name = name.removeprefix("base_model.model.")
    for start, part in _PART_OF_PATH.items():
        if name.startswith(start):
            return part + name
    return name


def _read_diffusers(state: dict, path: Path, config: dict) -> dict[str, LayerWeights]:
    parts: dict[str, dict[str, tuple]] = {}
    for key, tensor in state.items():
        m, old = _DIFFUSERS_KEY.match(key), _PROCESSOR_KEY.match(key)
        if old:
            proj = old["proj"] + (".0" if old["proj"] == "to_out" else "")
            name, kind = f"{old['block']}.{proj}", old["kind"]
        elif m:
            name, kind = m["name"], "down" if m["kind"] in ("lora_A",) or m["kind"].endswith("down") else "up"
        elif key.endswith(".alpha"):
            name, kind = key[: -len(".alpha")], "alpha"
        elif "lora_magnitude_vector" in key:
            raise LoRAError(f"{str(path)!r} is a DoRA file ({key}), which sdkit does not apply; use a plain LoRA")
        else:
            raise LoRAError(f"{str(path)!r}: key {key} is not a LoRA weight of the diffusers/PEFT layout "
                            "(….lora_A.weight / ….lora_B.weight)")
        parts.setdefault(_diffusers_name(name), {})[kind] = (tensor, key)
    layers = {}
    for name, p in parts.items():
        alpha = p["alpha"][0].item() if "alpha" in p else _configured_alpha(name, config)
        layers[name] = _pair(name, p.get("down"), p.get("up"), alpha, path)
        if config.get("use_rslora") and alpha is not None:   # rsLoRA scales by α/√r: as α' / r with α' = α√r
            layers[name].alpha = alpha * layers[name].rank ** 0.5
    return layers


def _metadata_config(metadata: dict) -> dict:
    """PEFT LoraConfig entries from diffusers' file metadata, per part: {"unet": {...}, "text_encoder": {...}}."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    per_part: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        part, _, option = key.partition(".")
        per_part.setdefault(part, {})[option] = value
    return {"per_part": per_part}


def _configured_alpha(name: str, config: dict) -> float | None:
    """α of layer ``name`` from a PEFT config (``alpha_pattern`` entries match the end of the layer path)."""
    if "per_part" in config:
        config = config["per_part"].get(name.split(".", 1)[0], {})
    if not config:
        return None
    path = name.split(".", 1)[1] if name.startswith(("unet.", "text_encoder.")) else name
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


# ================================================================================================ writing


def kohya_name(name: str) -> str:
    """kohya's name of a diffusers/PEFT layer name: ``unet.down_blocks.0…to_q`` -> ``lora_unet_down_blocks_0…to_q``."""
    part, _, rest = name.partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}.get(part)
    if prefix is None:
        raise ValueError(f"layer name {name!r} does not start with unet. or text_encoder.")
    return prefix + rest.replace(".", "_")


def lora_state_dict(layers: dict[str, LayerWeights], layout: str = "kohya",
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in ``layout``, for layers named by their diffusers/PEFT names."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = {}
    for name, w in layers.items():
        down, up = w.down.detach().float(), w.up.detach().float()
        if layout == "diffusers":
            up = up * ((w.rank if w.alpha is None else w.alpha) / w.rank)    # α/r folded into B
        if w.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        if layout == "kohya":
            key = kohya_name(name)
            state[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
            state[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(w.rank if w.alpha is None else w.alpha), dtype=dtype)
        else:
            state[f"{name}.lora_A.weight"] = down.to(dtype).contiguous()
            state[f"{name}.lora_B.weight"] = up.to(dtype).contiguous()
    return state


def write_lora(path: str | os.PathLike, layers: dict[str, LayerWeights], layout: str = "kohya",
               dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> Path:
    """Write ``layers`` (by diffusers/PEFT name) as a .safetensors LoRA file in ``layout``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors; got {str(path)!r}")
    if not layers:
        raise ValueError("the LoRA has no layers to write")
    ranks = sorted({w.rank for w in layers.values()})
    alphas = sorted({float(w.rank if w.alpha is None else w.alpha) for w in layers.values()})
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
            "ss_network_alpha": f"{alphas[-1]:g}", "ss_base_model_version": "sd_v1",
            "sdkit_lora_layout": layout} if layout == "kohya" else {"sdkit_lora_layout": layout}
    info.update({str(k): str(v) for k, v in (metadata or {}).items()})
    state = lora_state_dict(layers, layout, dtype)
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=info)
    return path
