"""A small CLIP (Radford et al. 2021): an image tower and a text tower trained with the contrastive loss, sized
for 64×64 images and a laptop CPU. Used to score generated images against captions (retrieval among
candidates) and as the base of the small safety checker.

    clip = SmallCLIP(embed_dim=256)
    logits_per_image, logits_per_text = clip(images, ["a red circle", "a blue star"])

Image tower: a small ResNet (GroupNorm + SiLU residual blocks, a stride-2 stage per level), mean-pooled and
projected. Text tower, by ``text_encoder``:

- ``"minilm"``: the pretrained all-MiniLM-L6-v2 sentence embedding (frozen, from its pip package; not in the
  checkpoint) with a trained two-layer projection head. Strong on unseen wordings, cheap to train.
- ``"transformer"``: a small causal CLIP text transformer on CLIP BPE tokens, trained from scratch (pooled at
  the end-of-text token, as CLIP).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import WrappedModule, batch_value, build, image_input


class _ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class ImageTower(nn.Module):
    """Conv stem, then per level: a stride-2 conv and ``blocks`` residual blocks; mean pool; linear projection."""

    def __init__(self, embed_dim: int, width: int = 64, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 blocks: int = 1, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        layers, ch = [], width
        for mult in channel_mult:
            layers.append(nn.Conv2d(ch, width * mult, 3, stride=2, padding=1))
            ch = width * mult
            layers += [_ResBlock(ch) for _ in range(blocks)]
        self.levels = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(8, ch)
        self.proj = nn.Linear(ch, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.levels(self.stem(x))))
        return self.proj(h.mean(dim=(2, 3)))


class MiniLMTextTower(nn.Module):
    """Frozen MiniLM sentence embedding (384) → trained MLP → embed_dim. Distinct captions are embedded once
    per process and kept (the encoder is frozen), which makes training as cheap as the head."""

    def __init__(self, embed_dim: int, hidden: int = 512):
        super().__init__()
        from ..nn.text import FrozenMiniLMEmbedder

        object.__setattr__(self, "encoder", FrozenMiniLMEmbedder(max_length=77, pooled=True))
        self.head = nn.Sequential(nn.Linear(384, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self._cache: dict[str, torch.Tensor] = {}

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.__dict__["encoder"]._apply(fn)
        return self

    def sentence_embeddings(self, texts: list[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            with torch.no_grad():
                for t, e in zip(missing, self.encoder(missing).float().cpu()):
                    self._cache[t] = e
        return torch.stack([self._cache[t] for t in texts])

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = self.head[0].weight.device
        return self.head(self.sentence_embeddings(texts).to(device))


class TransformerTextTower(nn.Module):
    """A small CLIP text transformer (sdkit's CLIPTextModel layout) on CLIP BPE tokens, pooled at <|endoftext|>."""

    def __init__(self, embed_dim: int, width: int = 256, layers: int = 4, heads: int = 4, max_length: int = 32):
        super().__init__()
        from ..nn.text import FrozenCLIPEmbedder

        config = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                  "num_attention_heads": heads, "max_position_embeddings": max_length}
        self.transformer = FrozenCLIPEmbedder(max_length=max_length, freeze=False, layer="pooled", config=config)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.proj(self.transformer(texts)[:, 0])


class SmallCLIP(nn.Module):
    """Image and text towers into one embedding space; ``forward`` returns CLIP's scaled cosine logits.

    Args:
        embed_dim: size of the shared embedding.
        image_size: the training resolution (inputs of another size are resized to it).
        vision: ImageTower options (width, channel_mult, blocks).
        text_encoder: "minilm" or "transformer" (see the module docstring); text: that tower's options.
        init_logit_scale: initial temperature, log(1/0.07) as CLIP.
    """

    def __init__(self, embed_dim: int = 256, image_size: int = 64, vision: Mapping | None = None,
                 text_encoder: str = "minilm", text: Mapping | None = None,
                 init_logit_scale: float = math.log(1 / 0.07), image_key: str = "image",
                 text_key: str = "caption", monitor: str = "val/loss"):
        super().__init__()
        self.image_size, self.image_key, self.text_key, self.monitor = image_size, image_key, text_key, monitor
        self.visual = ImageTower(embed_dim, **dict(vision or {}))
        towers = {"minilm": MiniLMTextTower, "transformer": TransformerTextTower}
        if text_encoder not in towers:
            raise ValueError(f"text_encoder must be one of {list(towers)}, got {text_encoder!r}")
        self.text_encoder = text_encoder
        self.text = towers[text_encoder](embed_dim, **dict(text or {}))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    image_range = (-1.0, 1.0)  # what encode_image takes (the safety checker reads this and rescales its [0, 1])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] → L2-normalised embeddings [B, D]."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, texts: str | list[str]) -> torch.Tensor:
        """Captions → L2-normalised embeddings [B, D]."""
        return F.normalize(self.text([texts] if isinstance(texts, str) else list(texts)), dim=-1)

    def forward(self, images: torch.Tensor, texts: list[str]):
        image_features, text_features = self.encode_image(images), self.encode_text(texts)
        logits_per_image = self.logit_scale.exp().clamp(max=100) * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def contrastive_loss(logits_per_image: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP. Items with identical captions are all positives for each other (soft
    targets), so repeated captions in a batch are not pushed apart."""
    index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = torch.tensor([index[t] for t in texts], device=logits_per_image.device)
    targets = (ids[:, None] == ids[None, :]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_i = torch.sum(-targets * F.log_softmax(logits_per_image, dim=1), dim=1).mean()
    loss_t = torch.sum(-targets * F.log_softmax(logits_per_image.t(), dim=1), dim=1).mean()
    return (loss_i + loss_t) / 2


class CLIPModule(WrappedModule):
    """Trains a SmallCLIP with the contrastive loss (AdamW). Under DDP the features of all ranks are gathered,
    so every image is contrasted with the whole global batch."""

    inner = "clip"

    def __init__(self, model: Any, learning_rate: float = 1e-3, seed: int = 0, weight_decay: float = 0.1,
                 scheduler_config: Mapping | None = None):
        super().__init__(seed=seed, learning_rate=learning_rate)
        self.clip: SmallCLIP = build(model)
        self.weight_decay, self.scheduler_config = weight_decay, scheduler_config

    def shared_step(self, batch: Mapping, split: str):
        images = image_input(batch, self.clip.image_key)
        texts = list(batch_value(batch, self.clip.text_key))
        image_features, text_features = self.clip.encode_image(images), self.clip.encode_text(texts)
        if self._trainer is not None and self.trainer.world_size > 1:
            image_features = self.all_gather(image_features, sync_grads=True).flatten(0, 1)
            text_features = self.all_gather(text_features, sync_grads=True).flatten(0, 1)
            texts = [t for group in _gather_strings(texts) for t in group]
        logits = self.clip.logit_scale.exp().clamp(max=100) * image_features @ text_features.t()
        loss = contrastive_loss(logits, texts)
        accuracy = (logits.argmax(dim=1) == torch.arange(len(texts), device=logits.device)).float().mean()
        return loss, {f"{split}/loss": loss.detach(), f"{split}/top1": accuracy,
                      f"{split}/logit_scale": self.clip.logit_scale.detach().exp()}

    def training_step(self, batch: Mapping, batch_idx: int):
        self.seed_step(batch_idx)
        loss, logs = self.shared_step(batch, "train")
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["index"]))
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping, batch_idx: int):
        _, logs = self.shared_step(batch, "val")
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["index"]))

    def configure_optimizers(self):
        from .diffusion import with_scheduler

        decay, no_decay = [], []
        for name, p in self.clip.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.learning_rate)
        return with_scheduler(opt, self.scheduler_config)


def _gather_strings(texts: list[str]) -> list[list[str]]:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, texts)
    return out
