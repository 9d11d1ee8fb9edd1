"""Fixed-aniso_d SAC layers (issue 7 item 1) and the reference pyramid's norms (item 2).

A segmentation network's aniso_d is fixed by its plan: its SAC kernels are stored in the shape they are
used in, so Adam moves them like plain convs, while pre-trained (isotropic) weights loaded into them give
exactly the output of the adaptive layers."""

import pytest
import torch
from torch import nn

from pumit_seg.models.sac import SACConv3d, SACDownsample, SACUpsample, sac_layers
from pumit_seg.models.seg_net import PUMITSegNet, build_arch_kwargs
from pumit_seg.models.vit import load_pretrained_encoder, universal_vit_tiny

SMALL = {"decoder_channels": [16, 32, 64, 64], "full_res_channels": [8, 16]}


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


@pytest.mark.parametrize(("spatial_dims", "aniso_d", "spatial"), [(3, 2, (8, 64, 32)), (3, 0, (32, 64, 32))])
def test_fixed_network_with_adaptive_weights_gives_the_adaptive_output(spatial_dims, aniso_d, spatial):
    kwargs = build_arch_kwargs("tiny", spatial_dims, aniso_d, **SMALL)
    torch.manual_seed(0)
    adaptive = PUMITSegNet(1, 3, True, **{**kwargs, "fixed_kernels": False}).eval()
    fixed = PUMITSegNet(1, 3, True, **kwargs).eval()
    assert all(layer.is_fixed for _, layer in sac_layers(fixed))
    assert not any(layer.is_fixed for _, layer in sac_layers(adaptive))
    fixed.load_state_dict(adaptive.state_dict())  # every SAC kernel sum-pooled once, at load
    smaller = [
        n for n, p in fixed.named_parameters() if p.numel() < dict(adaptive.named_parameters())[n].numel()
    ]
    if aniso_d > 0:
        assert "encoder.patch_embed.proj.weight" in smaller and any("stages.0" in n for n in smaller)
    x = torch.randn(1, 1, *spatial)
    with torch.no_grad():
        for a, b in zip(adaptive(x), fixed(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_block_outputs_are_instance_normed_before_the_pyramid_and_laterals():
    net = PUMITSegNet(1, 2, True, **build_arch_kwargs("tiny", 3, 2, **SMALL)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for norm in net.pyramid.block_norms:  # non-trivial affine parameters
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        features = [torch.randn(2, 64, 2, 4, 4) for _ in range(4)]
        scaled = [100 * f + 3 for f in features]
        for a, b in zip(net.pyramid(features, 2), net.pyramid(scaled, 2), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for lateral, x in zip(net.decoder.laterals, net.pyramid(features, 2), strict=True):
            assert isinstance(lateral[1], nn.InstanceNorm3d) and isinstance(lateral[2], nn.LeakyReLU)
            # (the InstanceNorm's eps makes a channel of tiny variance differ slightly)
            torch.testing.assert_close(lateral(x), lateral(100 * x), rtol=1e-3, atol=5e-3)
    assert isinstance(net.pyramid.level2_norm, nn.InstanceNorm3d) and net.pyramid.level2_norm.affine
    # full-resolution branch: one conv per level, 1x3x3 kernels and a 1x2x2 stride at aniso_d 2
    assert net.full_res_branch.level0.conv.weight.shape[2:] == (1, 3, 3)
    assert net.full_res_branch.level1.conv.weight.shape[2:] == (1, 3, 3)
    assert net.full_res_branch.level1.conv.sac_stride == 2
    assert isinstance(net.encoder.norm, nn.Identity)  # the final LayerNorm is unused by the reference


def test_version_1_plans_are_refused_clearly():
    kwargs = build_arch_kwargs("tiny", 3, 2, **SMALL)
    del kwargs["arch_version"], kwargs["fixed_kernels"], kwargs["final_norm_on_last_block"]
    with pytest.raises(ValueError, match="re-run pumit_plan_and_preprocess"):
        PUMITSegNet(1, 2, True, **kwargs)
