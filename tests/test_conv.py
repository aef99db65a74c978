"""The faster CPU convolution paths (sdkit.nn.conv) compute the same function as the plain ones, and the nets keep
their feature maps in the layout the fast paths expect (issue 21: the speed causes found in the full-size UNet)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdkit.nn import conv as fast
from sdkit.nn.attention import SpatialTransformer
from sdkit.nn.autoencoder import Decoder
from sdkit.nn.unet import UNetModel


def grads(out, inputs, seed=0):
    """Gradients of a fixed random projection of ``out`` with respect to ``inputs``."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weight).sum(), inputs)


def close(actual, expected, tol=1e-5):
    """Equal up to float rounding, relative to the expected tensor's scale."""
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max()) <= tol * float(expected.abs().max())


@pytest.mark.parametrize("batch,size,stride,padding,bias", [
    (1, 4, 1, 1, True), (2, 2, 1, 1, True), (2, 8, 2, 1, True), (2, 5, 1, 0, False), (3, 4, (2, 1), (1, 0), True),
])
def test_conv_as_matmul_matches_conv2d(monkeypatch, batch, size, stride, padding, bias):
    monkeypatch.setattr(fast, "MATMUL_MIN_WEIGHT", 0)  # small layers, so that the matrix-product path runs
    monkeypatch.setattr(fast, "MATMUL_WEIGHT_PER_POSITION", 1)
    conv = fast.Conv2d(24, 20, 3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(batch, 24, size, size + 1, requires_grad=True)
    assert fast._matmul_pays(conv, x, conv.weight)
    ours = conv(x)
    reference = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    assert ours.shape == reference.shape and ours.is_contiguous() and close(ours, reference)
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    assert all(close(a, b) for a, b in zip(grads(ours, params), grads(reference, params)))


def test_conv2d_is_nn_conv2d_with_the_same_keys_and_leaves_wide_convs_to_onednn():
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 16, 3, padding=1)
    torch.manual_seed(0)
    ours = fast.Conv2d(8, 16, 3, padding=1)
    assert isinstance(ours, nn.Conv2d) and ours.state_dict().keys() == plain.state_dict().keys()
    assert torch.equal(ours.weight, plain.weight)
    big = torch.empty(1280, 1280, 3, 3)                                     # SD v1's 59 MB level-4 weight
    assert fast._matmul_pays(ours, torch.empty(2, 1280, 4, 4), big)          # 32 positions: a matrix product
    assert not fast._matmul_pays(ours, torch.empty(2, 1280, 16, 16), big)    # 512 positions: oneDNN
    assert not fast._matmul_pays(ours, torch.empty(1, 8, 2, 2), ours.weight)  # small weights: oneDNN


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("batch,size", [(1, 16), (2, 17)])
def test_upsample_conv_by_phases_matches_upsample_then_conv(channels_last, batch, size):
    conv = nn.Conv2d(12, 10, 3, padding=1)
    x = torch.randn(batch, 12, size, size + 3, requires_grad=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    xl = x.contiguous(memory_format=layout)
    ours = fast.upsample_conv(xl, conv)
    reference = conv(F.interpolate(xl, scale_factor=2.0, mode="nearest"))
    assert ours.shape == (batch, 10, 2 * size, 2 * size + 6)
    assert ours.is_contiguous(memory_format=layout) and close(ours, reference)
    params = [x, conv.weight, conv.bias]
    assert all(close(a, b, 1e-4) for a, b in zip(grads(ours, params), grads(reference, params)))


def test_phase_kernels_sum_the_taps_each_phase_reads():
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows (0 1 2), (3 4 5), (6 7 8)
    kernels = fast.phase_kernels(weight)
    # phase (0, 0) reads input rows/columns (i-1, i): kernel rows (w0, w1+w2), columns likewise
    assert kernels[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert kernels[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8.0]]  # phase (1, 1): (w0+w1, w2)
    assert torch.equal(fast.phase_kernels(weight, channels_last=True), kernels)


def test_decoder_in_channels_last_gives_the_same_image(monkeypatch):
    decoder = Decoder(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                      resolution=32, z_channels=4).eval()
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        plain = decoder(z)
        monkeypatch.setattr("sdkit.nn.autoencoder.CHANNELS_LAST_MIN_POSITIONS", 0)  # every level channels-last
        wide = decoder(z)
    assert wide.is_contiguous() and close(wide, plain)


def test_spatial_transformer_returns_its_input_layout():
    st = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=8).eval()
    context = torch.randn(2, 5, 8)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 32, 4, 4).contiguous(memory_format=layout)
        with torch.no_grad():
            assert st(x, context).is_contiguous(memory_format=layout)


def test_unet_convs_see_no_channels_last_inputs():
    """The cause of the slow full-size UNet: a channels-last view from the transformer reached the next 3x3 conv,
    which then re-laid its NCHW weight out on every call. Every conv of a UNet with attention at every level must
    get NCHW inputs."""
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                     context_dim=16, legacy=False).eval()
    seen = []
    for module in unet.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 16))
    assert len(seen) > 5 and all(seen)
