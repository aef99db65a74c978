"""The CompVis first-stage models: the convolutional Encoder/Decoder and the KL and VQ autoencoders around them.

Module and parameter names follow ``ldm/modules/diffusionmodules/model.py`` and ``ldm/models/autoencoder.py``
exactly (``encoder.down.{i}.block.{j}``, ``decoder.up.{i}``, ``mid.attn_1``, ``quant_conv``, ...), so the
``first_stage_model.*`` part of an SD checkpoint loads with ``load_state_dict(strict=True)``.

Layout of the SD kl-f8 autoencoder (ch 128, ch_mult (1,2,4,4)): the encoder runs four levels of ResnetBlocks with a
stride-2 Downsample between levels (8x smaller), a middle block with one single-head self-attention, and a
3x3 conv to 2·z_channels (mean and log-variance). The decoder mirrors it; its ``up`` list is stored lowest
resolution last (``up.3`` is the 512-channel level), because CompVis builds it in reverse and prepends.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# LinAttnBlock (attn_type="linear") is the bare LinearAttention with one wide head: no norm, no residual, as in CompVis.
from sdkit.nn.attention import LinAttnBlock, SpatialSelfAttention
from sdkit.nn.conv import upsample_conv
from sdkit.nn.distributions import DiagonalGaussianDistribution
from sdkit.nn.quantize import VectorQuantizer


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, x·sigmoid(x)."""
    return F.silu(x)


def fresh_nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor nothing else holds (a norm's output): in place when no gradient is recorded, which saves
    one activation-sized buffer per block at inference (autograd needs the input, so it stays out of place then)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


CHANNELS_LAST_MIN_POSITIONS = 8192   # batch · height · width; measured on 2 CPU cores (torch 2.13, oneDNN)


def _cpu_layout(h: torch.Tensor) -> torch.Tensor:
    """The decoder's feature maps on the CPU: channels-last from 8192 positions (batch · height · width) on, NCHW
    below (the same values either way). oneDNN convolves NHWC tensors as they are, while NCHW ones are re-laid out
    to its blocked format and back around every conv: at 2x64x64 or 1x128x128 positions and up that costs more
    than the (few MB) weight that channels-last re-lays instead, and at the 512-channel low resolutions less."""
    if h.device.type != "cpu" or h.ndim != 4:
        return h
    wide = h.shape[0] * h.shape[2] * h.shape[3] >= CHANNELS_LAST_MIN_POSITIONS
    return h.contiguous(memory_format=torch.channels_last if wide else torch.contiguous_format)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (optionally) a 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return upsample_conv(x, self.conv)  # conv(upsample(x)), computed at the input's resolution
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Downsample(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right, then a 3x3 stride-2 conv without padding
    (torch convs cannot pad asymmetrically); or 2x2 average pooling when ``with_conv`` is False."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 (+ temb_proj) → norm2 → swish → dropout → conv2, plus a skip that is the identity,
    or a 1x1 ``nin_shortcut`` (3x3 ``conv_shortcut`` if asked) when the channel count changes."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(fresh_nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(fresh_nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return h.add_(x)  # h is conv2's fresh output, and conv backward does not need it


class AttnBlock(SpatialSelfAttention):
    """The autoencoder's single-head self-attention over all H·W positions (CompVis' name for it here)."""


ATTN_TYPES = ("vanilla", "linear", "none")


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")


def _level(blocks: Iterable[nn.Module], attns: Iterable[nn.Module]) -> nn.Module:
    """A bare container so the keys read ``down.{i}.block.{j}`` / ``down.{i}.attn.{j}`` as in CompVis."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _middle(channels: int, dropout: float, attn_type: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type=attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    return mid


def _level_layers(level: nn.Module):
    """A level's ResnetBlocks, each followed by its attention block if the level has them, in order. Callers run
    them as ``for layer in ...: h = layer(h)``, so each input is freed as soon as the next layer has it (a helper
    that took ``h`` would keep the level's input alive, held by the caller, until the whole level had run)."""
    for i, block in enumerate(level.block):
        yield block
        if len(level.attn) > 0:
            yield level.attn[i]


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, 2·z_channels or z_channels, H/f, W/f) with f = 2^(len(ch_mult)-1).

    ``attn_resolutions`` lists feature-map sizes (counted from ``resolution``) that get an attention block after
    every ResnetBlock; ``resolution`` only serves that count, any input size that is a multiple of f works.
    """

    def __init__(self, *, ch: int, out_ch: int | None, ch_mult: Iterable[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Iterable[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", **ignore: Any):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        ch_mult = tuple(ch_mult)
        attn_resolutions = list(attn_resolutions)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.double_z = double_z

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + ch_mult
        self.in_ch_mult = in_ch_mult
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0,
                                          dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type=attn_type))
            down = _level(blocks, attns)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = _middle(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1,
                                  padding=1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (self.num_resolutions - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs the autoencoder cannot reconstruct at their own size, saying what would work."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the encoder expects images shaped (batch, {self.in_channels}, height, width), "
                             f"got {tuple(x.shape)}")
        f = self.downsampling_factor
        height, width = x.shape[-2:]
        if height % f or width % f:
            ok_h, ok_w = max(f, height // f * f), max(f, width // f * f)
            raise ValueError(
                f"image size {height}x{width} (height x width) is not a multiple of {f}: this autoencoder "
                f"downsamples by {f} ({self.num_resolutions} levels in ch_mult), so height and width must both "
                f"be multiples of {f} (e.g. {8 * f}x{8 * f} or {8 * f}x{12 * f}). Resize or crop the image, "
                f"for instance to {ok_h}x{ok_w}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for layer in _level_layers(level):
                h = layer(h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        for layer in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = layer(h)
        return self.conv_out(fresh_nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h·f, w·f). ``give_pre_end`` returns the features
    before norm_out/conv_out; ``tanh_out`` squashes the output to (-1, 1)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Iterable[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Iterable[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int | None, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla", **ignore: Any):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        ch_mult = tuple(ch_mult)
        attn_resolutions = list(attn_resolutions)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _middle(block_in, dropout, attn_type)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0,
                                          dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type=attn_type))
            up = _level(blocks, attns)
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)  # prepend, so up[i] holds the level of encoder down[i]

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"the decoder expects latents shaped (batch, {self.z_channels}, height, width), "
                             f"got {tuple(z.shape)}")
        self.last_z_shape = z.shape
        h = self.conv_in(z)
        for layer in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = layer(h)
        for i_level in reversed(range(self.num_resolutions)):
            h = _cpu_layout(h)
            for layer in _level_layers(self.up[i_level]):
                h = layer(h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        if self.give_pre_end:
            return h.contiguous()
        h = self.conv_out(fresh_nonlinearity(self.norm_out(h)))
        return (torch.tanh(h) if self.tanh_out else h).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Autoencoders


def _build_loss(lossconfig: Mapping | None) -> nn.Module:
    """CompVis builds ``lossconfig`` with instantiate_from_config; SD's is torch.nn.Identity (no parameters)."""
    if lossconfig is None or lossconfig.get("target") == "torch.nn.Identity":
        return nn.Identity()
    from sdkit.config import instantiate_from_config  # lazy: the config module imports every model class

    return instantiate_from_config(lossconfig)


def _refuse_ckpt_path(cls_name: str, ckpt_path: str | None) -> None:
    if ckpt_path is not None:
        raise NotImplementedError(
            f"{cls_name}(ckpt_path={ckpt_path!r}) does not load weights by itself in sdkit; build the model from "
            f"its config and checkpoint with sdkit.load_model(config, ckpt) instead."
        )


class _FirstStage(nn.Module):
    """What the KL and VQ autoencoders share: Encoder/Decoder from ``ddconfig``, the loss module, the optional
    ``colorize`` buffer for segmentation inputs, and the CompVis helpers used by training code."""

    def __init__(self, ddconfig: Mapping, lossconfig: Mapping | None, image_key: str, colorize_nlabels: int | None,
                 monitor: str | None):
        super().__init__()
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = _build_loss(lossconfig)
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise TypeError(f"colorize_nlabels must be an int (number of label channels), got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor

    def get_input(self, batch: Mapping, k: str) -> torch.Tensor:
        """batch[k] as a float (B, C, H, W) tensor; datasets give (B, H, W, C) images as CompVis expects."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight; the adversarial loss balances its gradients there."""
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a segmentation map to 3 channels with the fixed random ``colorize`` weights, into [-1, 1]."""
        if not hasattr(self, "colorize"):
            raise RuntimeError("to_rgb needs the model to be built with colorize_nlabels")
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class AutoencoderKL(_FirstStage):
    """The KL-regularised autoencoder (SD's first stage is the kl-f8 one, embed_dim 4).

    ``encode(x)`` returns the posterior (a DiagonalGaussianDistribution over latents of embed_dim channels),
    ``decode(z)`` the image. ``forward`` reconstructs through a posterior sample (or its mode).
    Parameters are ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*`` (plus ``loss.*`` if the
    loss has parameters), exactly the ``first_stage_model.*`` keys of an SD checkpoint.
    """

    def __init__(self, ddconfig: Mapping, lossconfig: Mapping | None = None, embed_dim: int | None = None,
                 ckpt_path: str | None = None, ignore_keys: Iterable[str] = (), image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None, **kwargs: Any):
        ddconfig = dict(ddconfig)
        if embed_dim is None:
            raise TypeError("AutoencoderKL needs embed_dim (the latent channel count; 4 for Stable Diffusion)")
        if not ddconfig.get("double_z", True):
            raise ValueError(
                "AutoencoderKL needs ddconfig double_z=True: its encoder must output a mean and a log-variance "
                "(2·z_channels channels). Set double_z: true, or use VQModel for an encoder with a single z."
            )
        if kwargs:
            warnings.warn(f"AutoencoderKL ignores the unknown arguments {sorted(kwargs)}", stacklevel=2)
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor)
        self.embed_dim = embed_dim
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        _refuse_ckpt_path(type(self).__name__, ckpt_path)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"AutoencoderKL.decode expects latents shaped (batch, {self.embed_dim}, height, width), got "
                f"{tuple(z.shape)}. Pass posterior.sample() or posterior.mode(), unscaled (divide SD latents by "
                f"the scale factor 0.18215 first)."
            )
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(_FirstStage):
    """The vector-quantised autoencoder (ldm's VQModel; taming's VectorQuantizer2 with legacy=True, beta 0.25).

    ``encode(x)`` -> ``(quant, emb_loss, info)``; ``decode(quant)`` -> image; ``decode_code(indices)`` decodes
    codebook indices shaped (B, h, w). Extra parameters over the encoder/decoder: ``quantize.embedding``,
    ``quant_conv`` (z_channels→embed_dim) and ``post_quant_conv``; with use_ema, the ``model_ema.*`` buffers.
    """

    def __init__(self, ddconfig: Mapping, lossconfig: Mapping | None, n_embed: int, embed_dim: int,
                 ckpt_path: str | None = None, ignore_keys: Iterable[str] = (), image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None,
                 batch_resize_range: tuple[int, int] | None = None, scheduler_config: Mapping | None = None,
                 lr_g_factor: float = 1.0, remap: Any = None, sane_index_shape: bool = False,
                 use_ema: bool = False):
        ddconfig = dict(ddconfig)
        if ddconfig.get("double_z", True):
            raise ValueError(
                "VQModel needs ddconfig double_z=False: the quantiser takes a single z of z_channels channels "
                "(the CompVis VQ configs set double_z: false). Use AutoencoderKL for a mean/log-variance encoder."
            )
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        # ldm does not pass legacy, so taming's default legacy=True (β on the codebook term) applies.
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.batch_resize_range = batch_resize_range
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        self.use_ema = use_ema
        if use_ema:  # ldm forgot to import LitEma here (use_ema=True raised NameError); sdkit has one
            from sdkit.ema import LitEma

            self.model_ema = LitEma(self)
        _refuse_ckpt_path(type(self).__name__, ckpt_path)

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None):
        """Temporarily swap in the EMA weights (a no-op without use_ema)."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.parameters())
        self.model_ema.copy_to(self)
        try:
            yield
        finally:
            self.model_ema.restore(self.parameters())

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Decode codebook indices shaped (B, h, w) (positions in ``used`` when the quantiser remaps).
        ldm calls a quantiser method that VectorQuantizer2 does not have; this does the lookup it meant."""
        if code_b.ndim != 3:
            raise ValueError(f"decode_code expects indices shaped (batch, height, width), got {tuple(code_b.shape)}")
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), shape=(b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        # VQModel's own encode/decode, so VQModelInterface (which redefines both) reconstructs the same way
        quant, diff, (_, _, ind) = VQModel.encode(self, input)
        dec = VQModel.decode(self, quant)
        if return_pred_indices:
            return dec, diff, ind
        return dec, diff


class VQModelInterface(VQModel):
    """The VQ first stage as LatentDiffusion uses it: the diffusion model works on the *pre-quantisation*
    latent, and decoding quantises it first (unless ``force_not_quantize``)."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))
