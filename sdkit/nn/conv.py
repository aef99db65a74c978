"""Two faster ways to compute the same convolutions on the CPU (float32): the results equal ``F.conv2d``'s up to
float rounding, the parameters and checkpoint keys are those of ``nn.Conv2d``, and autograd runs through both.

- :class:`Conv2d`: a convolution whose weight outweighs its output runs as one matrix product over the unfolded
  input instead of through oneDNN, which re-lays the whole weight out in its blocked format on every call. At
  SD v1's 1280-channel UNet levels the weights are 59-118 MB and the feature maps 2x2 to 8x8 pixels, so that copy
  cost more than the arithmetic; the stored weight already is the [out, in·kh·kw] matrix the product needs.
- :func:`upsample_conv`: nearest-neighbour x2 upsampling followed by a 3x3 conv is, for each of the four output
  pixel phases, a 2x2 conv at the input's resolution with summed taps: 4/9 of the multiply-adds, and the 4x larger
  upsampled image is never built. One conv computes the four phases (4·out channels), then they are interleaved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "upsample_conv"]

# Where each path pays, measured on 2 CPU cores (torch 2.13, oneDNN): benchmarks/model_speed.py times the whole nets.
MATMUL_MIN_WEIGHT = 2 ** 23            # Conv2d: a matrix product for weights of 32 MB and more (beyond the caches)
MATMUL_WEIGHT_PER_POSITION = 2 ** 16   #   with at most weight elements / 2^16 output positions (batch · h · w)
PHASES_MIN_PIXELS = 256                # upsample_conv: phases for inputs of 16x16 pixels and more; on smaller
                                       #   ones oneDNN's 2x2 kernels run at a fraction of their 3x3 speed


def _plain_cpu_float(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.ndim == 4
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters, keys and initialisation) that computes a CPU convolution with few output
    positions for its weight (a weight of 32 MB or more, and output positions ≤ weight elements / 2^16) as
    weight [out, in·kh·kw] @ columns; the wide, compute-bound convolutions stay with oneDNN (see the module
    docstring)."""

    def _conv_forward(self, x, weight, bias):
        if _matmul_pays(self, x, weight):
            return conv_as_matmul(x, weight, bias, self.stride, self.padding)
        return super()._conv_forward(x, weight, bias)


def _matmul_pays(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    if weight.numel() < MATMUL_MIN_WEIGHT or weight.shape[-2:] == (1, 1) or not _plain_cpu_float(conv, x, weight):
        return False
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[-2:], conv.stride, conv.padding
    positions = x.shape[0] * ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)
    return positions * MATMUL_WEIGHT_PER_POSITION <= weight.numel()


def conv_as_matmul(x, weight, bias, stride, padding):
    """conv2d(x, weight, bias, stride, padding) as weight [out, in·kh·kw] @ columns [in·kh·kw, batch·positions]."""
    (b, c), (kh, kw) = x.shape[:2], weight.shape[-2:]
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    patches = x.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # a view [b, in, h_out, w_out, kh, kw]
    h_out, w_out = patches.shape[2:4]
    cols = patches.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, -1)  # [in·kh·kw, b·h_out·w_out], one copy
    matrix = weight.reshape(weight.shape[0], -1)
    out = matrix @ cols if bias is None else torch.addmm(bias[:, None], matrix, cols)  # [out, b·positions]
    if b == 1:
        return out.view(1, -1, h_out, w_out)
    return out.view(-1, b, h_out, w_out).transpose(0, 1).contiguous()


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, padding-1 ``conv``; on the
    CPU for inputs of at least 16x16 pixels, computed phase by phase (see the module docstring). The result has x's
    memory layout (NCHW or channels-last)."""
    weight, bias = conv.weight, conv.bias
    if (x.ndim != 4 or x.shape[2] * x.shape[3] < PHASES_MIN_PIXELS or weight.shape[-2:] != (3, 3)
            or conv.stride != (1, 1) or conv.padding != (1, 1) or not _plain_cpu_float(conv, x, weight)):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    b, _, h, w = x.shape
    o = weight.shape[0]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    kernel = phase_kernels(weight, channels_last)  # [4·out, in, 2, 2]: phase (a, c) is channel block 2a + c
    # the window of x padded by 1 at (i + a, j + c), under phase (a, c)'s kernel, gives output pixel (2i+a, 2j+c)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, None if bias is None else bias.repeat(4))
    y = y.view(b, 2, 2, o, h + 1, w + 1)
    if channels_last:
        out = x.new_empty(b, h, 2, w, 2, o)
        for a in (0, 1):
            for c in (0, 1):
                out[:, :, a, :, c] = y[:, a, c, :, a:a + h, c:c + w].permute(0, 2, 3, 1)
        return out.view(b, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
    out = x.new_empty(b, o, h, 2, w, 2)
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, :, a, :, c] = y[:, a, c, :, a:a + h, c:c + w]
    return out.view(b, o, 2 * h, 2 * w)


def phase_kernels(weight: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """The 2x2 kernels [4·out, in, 2, 2] of the four phases of a 3x3 conv after nearest x2 upsampling.

    Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are input rows (i - 1, i, i) for a = 0
    and (i, i, i + 1) for a = 1: over the two distinct rows the kernel rows are (w0, w1 + w2), resp. (w0 + w1, w2).
    The same holds for columns. Phase (a, c) is channel block 2a + c."""
    o, i = weight.shape[:2]
    rows = weight.new_empty(2, o, i, 2, 3)               # [a, out, in, 2 rows, 3 columns]
    rows[0, :, :, 0] = weight[:, :, 0]
    rows[0, :, :, 1] = weight[:, :, 1] + weight[:, :, 2]
    rows[1, :, :, 0] = weight[:, :, 0] + weight[:, :, 1]
    rows[1, :, :, 1] = weight[:, :, 2]
    if channels_last:                                    # written straight into the layout the conv reads
        store = weight.new_empty(2, 2, o, 2, 2, i)
        kernel = store.permute(0, 1, 2, 5, 3, 4)
    else:
        store = kernel = weight.new_empty(2, 2, o, i, 2, 2)  # [a, c, out, in, 2 rows, 2 columns]
    kernel[:, 0, ..., 0] = rows[..., 0]
    kernel[:, 0, ..., 1] = rows[..., 1] + rows[..., 2]
    kernel[:, 1, ..., 0] = rows[..., 0] + rows[..., 1]
    kernel[:, 1, ..., 1] = rows[..., 2]
    if channels_last:
        return store.view(4 * o, 2, 2, i).permute(0, 3, 1, 2)
    return store.view(4 * o, i, 2, 2)
