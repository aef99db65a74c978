"""The SD v1 denoising UNet, in the layout of CompVis `ldm/modules/diffusionmodules/openaimodel.py`.

`UNetModel` takes the CompVis constructor arguments, so a CompVis `unet_config` works unchanged, and its
state_dict keys are the `model.diffusion_model.*` keys of an SD checkpoint (minus that prefix).
Only 2-D images are supported (`dims=2`).
"""

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from sdkit.nn.attention import SpatialTransformer, run_checkpointed, zero_module
from sdkit.nn.conv import Conv2d, upsample_conv

__all__ = [
    "timestep_embedding", "Conv2d", "GroupNorm32", "normalization", "zero_module", "TimestepBlock",
    "TimestepEmbedSequential",
    "Upsample", "Downsample", "ResBlock", "AttentionBlock", "QKVAttention", "QKVAttentionLegacy", "UNetModel",
]


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal embedding [N, dim] of N (possibly fractional) timesteps: cat[cos(t*f), sin(t*f)].

    The frequencies are f_i = max_period^(-i/half), i = 0..half-1 (CompVis puts cos first).
    With `repeat_only`, each timestep is just repeated `dim` times.
    """
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    # this order of operations is CompVis's; float32 rounding of the frequencies matters at t ~ 1000
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in float32 (stable under fp16/bf16) and returns the input dtype."""

    def forward(self, x):
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # nothing to convert
        # float32 parameters too: CPU group_norm refuses mixed dtypes in a .half()/bf16 model
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class NormSiLU(nn.SiLU):
    """SiLU right after a norm layer: its input is a fresh tensor nobody else holds, so without autograd it runs
    in place and saves one activation-sized buffer per block (no parameters: the state dict is unchanged)."""

    def forward(self, x):
        return F.silu(x, inplace=not torch.is_grad_enabled())


def normalization(channels):
    """The UNet's normalisation layer: GroupNorm32 with 32 groups (eps 1e-5)."""
    return GroupNorm32(32, channels)


def _check_dims(dims):
    if dims != 2:
        raise ValueError(f"sdkit's UNet supports only 2-D images (dims=2), got dims={dims}.")


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embeddings `emb`."""


WRAPPED_MODULE_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrapped(layer: nn.Module) -> nn.Module:
    """The block inside FSDP and activation-checkpoint wrappers, which hide its type (two dict lookups a call)."""
    while True:
        for name in WRAPPED_MODULE_NAMES:
            if name in layer._modules:
                layer = layer._modules[name]
                break
        else:
            return layer


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the timestep embedding and the context to the children that take them. The child's
    kind is read through FSDP's wrapper (which shards ResBlocks and SpatialTransformers), but the call goes to the
    wrapper, which gathers the block's weights."""

    def forward(self, x, emb, context=None):
        for layer in self:
            kind = unwrapped(layer)
            if isinstance(kind, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(kind, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then (with `use_conv`) a 3x3 conv named `conv`."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = Conv2d(self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        if self.use_conv:
            return upsample_conv(x, self.conv)
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Downsample(nn.Module):
    """x2 downsampling named `op`: a stride-2 3x3 conv with `use_conv`, else 2x2 average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.op = Conv2d(self.channels, self.out_channels, 3, stride=2, padding=padding)
        elif self.channels != self.out_channels:
            raise ValueError(
                f"Downsample without a conv cannot change channels ({channels} -> {out_channels}); set use_conv=True."
            )
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally changing channels or resolution.

    in_layers (norm, SiLU, conv) -> + emb_layers(emb) (or FiLM scale/shift with `use_scale_shift_norm`)
    -> out_layers (norm, SiLU, dropout, zero-init conv), added to skip_connection(x).
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), NormSiLU(), Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out_channels = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            NormSiLU(),
            nn.Dropout(p=dropout),
            zero_module(Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        return run_checkpointed(self._forward, x, emb, enabled=self.use_checkpoint, module=self)

    def _forward(self, x, emb):
        in_norm, in_act, in_conv = self.in_layers
        out_norm, out_act, dropout, out_conv = self.out_layers
        h = in_act(in_norm(x))
        if self.updown:  # resample between the activation and the conv, and resample the skip path the same way
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers[1](F.silu(emb)).type(h.dtype)[..., None, None]  # emb_layers: SiLU, Linear
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h.add_(emb_out))  # h: in_conv's fresh output (conv backward does not need it)
        h = out_act(h)
        if self.training and dropout.p:
            h = dropout(h)
        return out_conv(h).add_(self.skip_connection(x))  # the same: out_conv's output is fresh


def _qkv_attention(q, k, v):
    """Attention over [B, C, T] tensors (channels first, one head each), scale C^-0.5."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class QKVAttentionLegacy(nn.Module):
    """QKV attention on [N, H*3*C, T]: split heads first, then q, k, v (the original OpenAI layout)."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _qkv_attention(q, k, v).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """QKV attention on [N, 3*H*C, T]: split q, k, v first, then heads (`use_new_attention_order`)."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _qkv_attention(q, k, v).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all positions with 1-D conv projections (`norm`, `qkv`, `proj_out`), plus the input.

    Used instead of SpatialTransformer when the UNet has no cross-attention. `num_head_channels` (if not -1)
    fixes the width of a head and overrides `num_heads`.
    """

    def __init__(
        self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, use_new_attention_order=False
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels != 0:
            raise ValueError(
                f"AttentionBlock: {channels} channels cannot be split into heads of {num_head_channels} channels; "
                "choose num_head_channels that divides every level's width (model_channels * channel_mult)."
            )
        else:
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads != 0:
            raise ValueError(f"AttentionBlock: {channels} channels cannot be split into {self.num_heads} heads.")
        # CompVis always checkpoints this block; here it follows use_checkpoint (same numbers, less recompute).
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        attention_class = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_class(self.num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        return run_checkpointed(self._forward, x, enabled=self.use_checkpoint, module=self)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def _plain_context_dim(context_dim):
    """Turn an omegaconf ListConfig (or list) context_dim into an int, or a list of ints (one per block)."""
    if context_dim is None or isinstance(context_dim, int):
        return context_dim
    dims = [int(d) for d in context_dim]
    return dims[0] if len(set(dims)) == 1 else dims


def _check_attention_options(use_spatial_transformer, context_dim, num_heads, num_head_channels) -> None:
    if use_spatial_transformer and context_dim is None:
        raise ValueError(
            "use_spatial_transformer=True needs context_dim, the width of the conditioning vectors "
            "(768 for SD v1's CLIP text encoder)."
        )
    if context_dim is not None and not use_spatial_transformer:
        raise ValueError(
            f"context_dim={context_dim} is set but use_spatial_transformer=False: cross-attention conditioning "
            "lives in the spatial transformer. Set use_spatial_transformer=True, or drop context_dim."
        )
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("Set num_heads or num_head_channels (both are -1): the attention layers need one of them.")


class _BlockMaker:
    """Builds the UNet's blocks with the options they share (ResBlocks, attention, resampling)."""

    def __init__(self, unet: "UNetModel", time_embed_dim, dims, use_scale_shift_norm, transformer_depth,
                 use_new_attention_order, resblock_updown):
        self.unet, self.time_embed_dim, self.dims = unet, time_embed_dim, dims
        self.use_scale_shift_norm, self.transformer_depth = use_scale_shift_norm, transformer_depth
        self.use_new_attention_order, self.resblock_updown = use_new_attention_order, resblock_updown

    def res(self, channels, out_channels, up=False, down=False):
        u = self.unet
        return ResBlock(channels, self.time_embed_dim, u.dropout, out_channels=out_channels, dims=self.dims,
                        use_checkpoint=u.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm, up=up,
                        down=down)

    def attention(self, channels, attention_block_heads):
        u = self.unet
        heads, dim_head = u.attention_heads(channels)
        if u.use_spatial_transformer:
            return SpatialTransformer(channels, heads, dim_head, depth=self.transformer_depth,
                                      context_dim=u.context_dim, checkpoint=u.use_checkpoint)
        return AttentionBlock(channels, use_checkpoint=u.use_checkpoint, num_heads=attention_block_heads,
                              num_head_channels=dim_head, use_new_attention_order=self.use_new_attention_order)

    def down(self, ch):
        if self.resblock_updown:
            return self.res(ch, ch, down=True)
        return Downsample(ch, self.unet.conv_resample, self.dims, ch)

    def up(self, ch):
        if self.resblock_updown:
            return self.res(ch, ch, up=True)
        return Upsample(ch, self.unet.conv_resample, self.dims, ch)


class UNetModel(nn.Module):
    """The full UNet with timestep embedding, attention and optional cross-attention conditioning.

    Arguments are those of CompVis `openaimodel.UNetModel`. The most important:
      model_channels, channel_mult: width of each level (SD v1: 320 x [1, 2, 4, 4]).
      num_res_blocks: ResBlocks per level; attention_resolutions: downsampling rates (1, 2, 4, ...) with attention.
      num_heads / num_head_channels: heads per attention layer, or a fixed width per head (-1 = unused);
        legacy=True reproduces the original rule for the head width (see `attention_heads`).
      use_spatial_transformer + context_dim: cross-attention on a [batch, tokens, context_dim] context (SD: 768).
      num_classes: class-conditional model (pass labels as `y`); n_embed: predict VQ codebook ids instead.
      use_checkpoint: gradient checkpointing while training (same results, less memory, more compute).
      use_fp16: kept for config compatibility; cast the model with `.half()` to run it in fp16.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=-1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        use_spatial_transformer=False,
        transformer_depth=1,
        context_dim=None,
        n_embed=None,
        legacy=True,
    ):
        super().__init__()
        _check_dims(dims)
        context_dim = _plain_context_dim(context_dim)
        _check_attention_options(use_spatial_transformer, context_dim, num_heads, num_head_channels)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = int(num_res_blocks)
        self.attention_resolutions = [int(r) for r in attention_resolutions]
        self.dropout = dropout
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.legacy = legacy
        self.use_spatial_transformer = use_spatial_transformer
        self.context_dim = context_dim
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        blocks = _BlockMaker(self, time_embed_dim, dims, use_scale_shift_norm, transformer_depth,
                             use_new_attention_order, resblock_updown)
        skip_channels, ch = self._build_encoder(blocks)
        self.middle_block = TimestepEmbedSequential(blocks.res(ch, None), blocks.attention(ch, num_heads),
                                                    blocks.res(ch, None))
        self._feature_size += ch
        ch = self._build_decoder(blocks, skip_channels, ch)
        self.out = nn.Sequential(
            normalization(ch), NormSiLU(), zero_module(Conv2d(model_channels, out_channels, 3, padding=1))
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), Conv2d(model_channels, n_embed, 1))

    def _build_encoder(self, blocks: "_BlockMaker") -> tuple[list[int], int]:
        """conv_in, then per level num_res_blocks ResBlocks (+ attention), then a downsample. Returns the channels
        of every encoder output (the skip connections) and the channels at the bottom."""
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(self.in_channels, self.model_channels, 3, padding=1))]
        )
        self._feature_size = self.model_channels
        skip_channels = [self.model_channels]
        ch, ds = self.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [blocks.res(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers.append(blocks.attention(ch, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(blocks.down(ch)))
                skip_channels.append(ch)
                ds *= 2
                self._feature_size += ch
        return skip_channels, ch

    def _build_decoder(self, blocks: "_BlockMaker", skip_channels: list[int], ch: int) -> int:
        """Each ResBlock takes the previous output concatenated with the matching encoder output; a level ends
        with an upsample. Returns the channels of the last block."""
        self.output_blocks = nn.ModuleList([])
        ds = 2 ** (len(self.channel_mult) - 1)
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers = [blocks.res(ch + skip_channels.pop(), self.model_channels * mult)]
                ch = self.model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(blocks.attention(ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(blocks.up(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
        return ch

    def attention_heads(self, channels):
        """(number of heads, width of a head) for an attention layer on `channels` channels, as CompVis derives it.

        num_head_channels=-1 splits the channels into num_heads heads; otherwise heads are num_head_channels wide.
        legacy=True then resets the head width: channels // heads for the spatial transformer, and
        num_head_channels for AttentionBlock (-1 there means "use num_heads").
        """
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = channels // heads if self.use_spatial_transformer else self.num_head_channels
        if heads < 1 or dim_head == 0:
            raise ValueError(
                f"Cannot split {channels} channels into attention heads (num_heads={self.num_heads}, "
                f"num_head_channels={self.num_head_channels}); use fewer or narrower heads."
            )
        return heads, dim_head

    def forward(self, x, timesteps=None, context=None, y=None):
        """Predict the output (SD: the noise ε) for latents `x` [N, C, H, W] at `timesteps` [N].

        context: [N, tokens, context_dim] cross-attention conditioning (e.g. CLIP text encodings);
        y: [N] class labels for a class-conditional model (num_classes set).
        """
        timesteps = self._check_inputs(x, timesteps, context, y)
        dtype = self.input_blocks[0][0].weight.dtype  # run in the parameters' dtype, return x's dtype
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb.to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        if isinstance(context, torch.Tensor):
            context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        head = self.id_predictor if self.predict_codebook_ids else self.out
        return head(h).type(x.dtype)

    def _check_inputs(self, x, timesteps, context, y):
        """Turn mistakes into clear messages; return the timesteps as a [N] tensor."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNetModel expects x of shape [batch, {self.in_channels}, height, width], got {tuple(x.shape)}. "
                "(SD v1 takes 4 latent channels; the inpainting model 9: latent, mask, masked-image latent.)"
            )
        batch, (height, width) = x.shape[0], x.shape[-2:]
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            lower = f"{max(factor, height // factor * factor)}x{max(factor, width // factor * factor)}"
            upper = f"{-(-height // factor) * factor}x{-(-width // factor) * factor}"
            raise ValueError(
                f"UNetModel got a latent of size {height}x{width}, but it halves the size {len(self.channel_mult) - 1} "
                f"times (channel_mult={list(self.channel_mult)}), so height and width must be multiples of {factor}. "
                f"Nearest valid sizes: {lower} or {upper}. For Stable Diffusion (VAE factor 8) that means image "
                f"sizes in multiples of {8 * factor} pixels, e.g. 512x512 or 512x768."
            )
        if timesteps is None:
            raise ValueError("UNetModel needs `timesteps`: a [batch] tensor of diffusion timesteps (0..999 for SD).")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(
                f"timesteps must hold one value per batch item, shape [{batch}], got {tuple(timesteps.shape)}."
            )
        if (y is not None) != (self.num_classes is not None):
            if y is None:
                raise ValueError(f"This UNet is class-conditional (num_classes={self.num_classes}): pass labels as y.")
            raise ValueError("This UNet is not class-conditional (num_classes=None), but labels y were given.")
        if y is not None and tuple(y.shape) != (batch,):
            raise ValueError(f"y must hold one class label per batch item, shape [{batch}], got {tuple(y.shape)}.")
        self._check_context(context, batch)
        return timesteps

    def _check_context(self, context, batch):
        if self.context_dim is None:
            if context is not None:
                raise ValueError(
                    "This UNet has no cross-attention (context_dim=None), but a context was given. "
                    "Build it with use_spatial_transformer=True and context_dim to condition on a context."
                )
            return
        width = self.context_dim if isinstance(self.context_dim, int) else "context_dim"
        if context is None:
            raise ValueError(
                f"This UNet has cross-attention (context_dim={self.context_dim}) and needs `context`, a "
                f"[batch, tokens, {width}] tensor such as model.get_learned_conditioning(prompts). For unconditional "
                "samples pass the encoding of the empty prompt ''."
            )
        if isinstance(context, (list, tuple)):
            return  # one context per transformer block; each CrossAttention checks its width
        if context.ndim != 3 or context.shape[0] != batch:
            raise ValueError(
                f"context must have shape [{batch}, tokens, {width}] (one row per batch item), "
                f"got {tuple(context.shape)}."
            )
        if isinstance(self.context_dim, int) and context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context vectors have size {context.shape[-1]}, but this UNet was built with "
                f"context_dim={self.context_dim}. Use the text encoder that matches the UNet."
            )
