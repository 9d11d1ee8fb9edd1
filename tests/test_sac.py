"""SAC layers: strides, depth sum-pooling, upsampling, 2D weight inflation, fixed-aniso_d layers (docs/method.md)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pumit_seg.models.sac import (
    SACConv3d,
    SACDownsample,
    SACUpsample,
    aniso_d_from_spacing,
    depth_downsample_stride,
    depth_upsample_stride,
    inflate_depth,
    pending_downsamples,
    sum_pool_depth,
)
from pumit_seg.models.vit import load_pretrained_encoder, universal_vit_tiny


def test_stride_rules():
    assert pending_downsamples(3, 1) == 2 and pending_downsamples(1, 3) == 0
    assert [depth_downsample_stride(16, a, 0) for a in range(6)] == [16, 8, 4, 2, 1, 1]
    assert depth_downsample_stride(2, 2, 1) == 1 and depth_downsample_stride(2, 2, 2) == 2
    # upsampling from the 1/32 level (n = 5) with stride 2 at aniso_d 4 and 5
    assert depth_upsample_stride(2, 4, 5) == 2 and depth_upsample_stride(2, 5, 5) == 1
    assert depth_upsample_stride(16, 2, 4) == 4


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        ((1, 1, 1), 0),
        ((0.5, 1, 1), 0),
        ((2.5, 0.8, 0.8), 1),
        ((5, 1, 1), 2),
        ((2.4, 0.3, 0.3), 3),
        ((100, 1, 1), 5),
    ],
)
def test_aniso_d_from_spacing(spacing, expected):
    assert aniso_d_from_spacing(spacing) == expected


def test_aniso_d_rejects_bad_spacing():
    with pytest.raises(ValueError, match="positive"):
        aniso_d_from_spacing((0, 1, 1))


@pytest.mark.parametrize("aniso_d", [0, 1, 2, 3])
def test_patch_embedding_gives_same_token_grid(aniso_d):
    layer = SACDownsample(2, 8, stride=16)
    x = torch.randn(1, 2, 64 >> aniso_d, 64, 64)
    assert layer(x, aniso_d, 0).shape == (1, 8, 4, 4, 4)


def test_patch_embedding_rejects_indivisible_input():
    with pytest.raises(ValueError, match="not divisible"):
        SACDownsample(1, 4, stride=16)(torch.randn(1, 1, 8, 60, 64), 0, 0)


def test_reduced_kernel_equals_conv3d_with_sum_pooled_kernel():
    torch.manual_seed(0)
    layer = SACDownsample(3, 5, stride=8)
    x = torch.randn(2, 3, 4, 16, 16)
    out = layer(x, 1, 0)  # depth stride 4
    pooled = layer.weight.reshape(5, 3, 4, 2, 8, 8).sum(3)
    assert torch.allclose(out, F.conv3d(x, pooled, layer.bias, stride=(4, 8, 8)), atol=1e-5)
    assert torch.equal(sum_pool_depth(layer.weight, 4), pooled)


def test_sum_pooled_kernel_matches_full_kernel_on_depth_constant_input():
    torch.manual_seed(0)
    conv = SACConv3d(3, 4)
    slice2d = torch.randn(1, 3, 1, 12, 12)
    x = slice2d.expand(-1, -1, 6, -1, -1)
    reduced = conv(x, 2, 0)  # pending > 0: 1x3x3
    full = conv(x, 0, 0)  # full 3x3x3
    assert reduced.shape == full.shape == (1, 4, 6, 12, 12)
    assert torch.allclose(reduced[:, :, 1:-1], full[:, :, 1:-1], atol=1e-5)
    # the downsampling layer, too: one patch of depth-constant input
    down = SACDownsample(3, 4, stride=4)
    x = torch.randn(1, 3, 1, 8, 8).expand(-1, -1, 4, -1, -1)
    assert torch.allclose(down(x, 2, 0), down(x, 0, 0), atol=1e-5)


def test_upsampling_inverts_downsampling_shapes():
    down = [SACDownsample(1, 1, stride=2) for _ in range(5)]
    up = [SACUpsample(1, 1, stride=2) for _ in range(5)]
    for aniso_d in range(6):
        depth = 2 ** max(5 - aniso_d, 0)
        x = torch.randn(1, 1, depth, 32, 32)
        shapes = [x.shape]
        for level, layer in enumerate(down):
            x = layer(x, aniso_d, level)
            shapes.append(x.shape)
        assert x.shape[2:] == (1, 1, 1)
        for level, layer in zip(range(5, 0, -1), up, strict=True):
            x = layer(x, aniso_d, level)
            assert x.shape == shapes[level - 1], (aniso_d, level)


def test_2d_weight_inflation_on_load_state_dict():
    torch.manual_seed(0)
    conv2d = torch.nn.Conv2d(3, 4, 3, padding=1)
    sac = SACConv3d(3, 4)
    sac.load_state_dict(conv2d.state_dict())
    assert torch.allclose(sac.weight.sum(2), conv2d.weight, atol=1e-6)
    image = torch.randn(1, 3, 10, 10)
    volume = image[:, :, None].expand(-1, -1, 5, -1, -1)
    out = sac(volume, 0, 0)  # the full inflated 3x3x3 kernel
    expected = conv2d(image)
    for z in range(1, 4):
        assert torch.allclose(out[:, :, z], expected, atol=1e-5)
    # a 2D patch embedding loads into the SAC patch embedding and reproduces it on a 2D image
    patch2d = torch.nn.Conv2d(3, 4, 8, stride=8)
    sac_patch = SACDownsample(3, 4, stride=8)
    sac_patch.load_state_dict(patch2d.state_dict())
    assert torch.allclose(
        sac_patch(image[..., :8, :8][:, :, None], 5, 0)[:, :, 0], patch2d(image[..., :8, :8]), atol=1e-5
    )


def test_inflate_then_pool_round_trip():
    weight = torch.randn(2, 3, 4, 5, 5)
    assert torch.allclose(sum_pool_depth(inflate_depth(weight, 16), 4), weight, atol=1e-6)
    with pytest.raises(ValueError, match="not a divisor"):
        sum_pool_depth(weight, 3)


@pytest.mark.parametrize(
    ("aniso_d", "num_downsamples", "fixed"), [(0, 0, False), (2, 0, False), (2, 0, True)]
)
def test_conv_on_a_list_of_inputs_equals_conv_on_their_concatenation(aniso_d, num_downsamples, fixed):
    """A decoder stage convolves its upsampled map and skip separately (no concatenation kept for the
    backward pass): output and every gradient equal the conv on ``torch.cat``, depth-pooled kernels included."""
    torch.manual_seed(0)
    fixed_kwargs = {"fixed_aniso_d": aniso_d, "fixed_num_downsamples": num_downsamples} if fixed else {}
    conv = SACConv3d(7, 5, kernel_size=3, **fixed_kwargs)
    up = torch.randn(2, 3, 4, 8, 8, requires_grad=True)
    skip = torch.randn(2, 4, 4, 8, 8, requires_grad=True)
    split_output = conv([up, skip], aniso_d, num_downsamples)
    split_output.square().sum().backward()
    split_grads = [t.grad.clone() for t in (up, skip, conv.weight, conv.bias)]
    for t in (up, skip, conv.weight, conv.bias):
        t.grad = None
    cat_output = conv(torch.cat([up, skip], dim=1), aniso_d, num_downsamples)
    cat_output.square().sum().backward()
    torch.testing.assert_close(split_output, cat_output, rtol=1e-5, atol=1e-5)
    for split_grad, t in zip(split_grads, (up, skip, conv.weight, conv.bias), strict=True):
        torch.testing.assert_close(split_grad, t.grad, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"inputs with \[3, 3\] channels, expected 7"):
        conv([up, skip[:, :3]], aniso_d, num_downsamples)


# ---- fixed-aniso_d layers: a segmentation network's kernels stored in the shape they are used in


def adamw_step(parameters, loss_fn, lr=1e-2):
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    loss_fn().backward()
    optimizer.step()


def effective_patch_kernel(layer: SACDownsample, aniso_d: int) -> torch.Tensor:
    from pumit_seg.models.sac import depth_downsample_stride, sum_pool_depth

    return (
        sum_pool_depth(layer.weight, depth_downsample_stride(layer.sac_stride, aniso_d, 0)).detach().clone()
    )


@pytest.mark.parametrize(("aniso_d", "depth"), [(2, 4), (5, 1)])
def test_one_adamw_step_moves_the_fixed_kernel_like_a_plain_conv(aniso_d, depth):
    torch.manual_seed(0)
    adaptive = SACDownsample(2, 8, stride=16)
    fixed = SACDownsample(2, 8, stride=16, fixed_aniso_d=aniso_d, fixed_num_downsamples=0)
    fixed.load_state_dict(adaptive.state_dict())  # the isotropic kernel is sum-pooled once, here
    assert fixed.weight.shape == (8, 2, depth, 16, 16)
    plain = nn.Conv3d(2, 8, kernel_size=(depth, 16, 16), stride=(depth, 16, 16))
    with torch.no_grad():
        plain.weight.copy_(fixed.weight)
        plain.bias.copy_(fixed.bias)
    x = torch.randn(2, 2, 2 * depth, 32, 32)
    target = torch.randn(2, 8, 2, 2, 2)

    before = effective_patch_kernel(adaptive, aniso_d)
    torch.testing.assert_close(before, fixed.weight.detach())
    torch.testing.assert_close(adaptive(x, aniso_d, 0), plain(x))

    adamw_step(adaptive.parameters(), lambda: ((adaptive(x, aniso_d, 0) - target) ** 2).mean())
    adamw_step(fixed.parameters(), lambda: ((fixed(x, aniso_d, 0) - target) ** 2).mean())
    adamw_step(plain.parameters(), lambda: ((plain(x) - target) ** 2).mean())

    plain_move = (plain.weight.detach() - before).abs().mean()
    fixed_move = (fixed.weight.detach() - before).abs().mean()
    adaptive_move = (effective_patch_kernel(adaptive, aniso_d) - before).abs().mean()
    torch.testing.assert_close(fixed.weight.detach(), plain.weight.detach())  # the very same update
    # every tap of a pooled group got the same gradient, so Adam moved the sum 16 / depth times as far
    assert adaptive_move / plain_move == pytest.approx(16 / depth, rel=0.05)
    assert fixed_move / plain_move == pytest.approx(1.0, rel=1e-5)


def test_fixed_layers_store_the_used_shapes_and_refuse_other_anisotropy():
    assert SACConv3d(4, 4, fixed_aniso_d=2, fixed_num_downsamples=1).weight.shape[2:] == (1, 3, 3)
    assert SACConv3d(4, 4, fixed_aniso_d=2, fixed_num_downsamples=2).weight.shape[2:] == (3, 3, 3)
    assert SACUpsample(4, 4, 2, fixed_aniso_d=2, fixed_num_downsamples=2).weight.shape[2:] == (1, 2, 2)
    assert SACUpsample(4, 4, 2, fixed_aniso_d=2, fixed_num_downsamples=3).weight.shape[2:] == (2, 2, 2)
    layer = SACDownsample(1, 4, 16, fixed_aniso_d=2, fixed_num_downsamples=0)
    with pytest.raises(ValueError, match=r"built for aniso_d=2.*called with aniso_d=3"):
        layer(torch.randn(1, 1, 2, 16, 16), 3, 0)
    with pytest.raises(ValueError, match="fixed_num_downsamples"):
        SACConv3d(4, 4, fixed_aniso_d=2)
    # strided SAC conv: 1x3x3 stride 1x2x2 while depth waits, 3x3x3 stride 2 afterwards
    strided = SACConv3d(2, 4, stride=2)
    assert strided(torch.randn(1, 2, 4, 8, 8), 2, 0).shape == (1, 4, 4, 4, 4)
    assert strided(torch.randn(1, 2, 4, 8, 8), 0, 0).shape == (1, 4, 2, 4, 4)


@pytest.mark.parametrize("aniso_d", [0, 2, 5])
def test_pretrained_weights_into_a_fixed_vit_give_the_adaptive_output(aniso_d):
    torch.manual_seed(0)
    adaptive = universal_vit_tiny(in_channels=1).eval()
    fixed = universal_vit_tiny(in_channels=1, fixed_aniso_d=aniso_d, pos_grid_shape=(2, 2, 2)).eval()
    report = load_pretrained_encoder(fixed, adaptive.state_dict())
    assert not report.missing and not report.skipped
    depth = max(16 >> aniso_d, 1)
    assert fixed.patch_embed.proj.weight.shape[2:] == (depth, 16, 16)
    if depth != 16:
        how = report.adapted["patch_embed.proj.weight"]
        assert f"sum-pooled to {depth}" in how and f"fixed {depth}x16x16 kernel for aniso_d {aniso_d}" in how
    assert "grid 5x10x10 resampled to 2x2x2" in report.adapted["pos_embed"]
    x = torch.randn(2, 1, 2 * depth, 32, 32)
    with torch.no_grad():
        expected, got = adaptive(x, aniso_d), fixed(x, aniso_d)
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=1e-5, atol=1e-5)
