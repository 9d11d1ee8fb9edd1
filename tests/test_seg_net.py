"""Tests of the PUMIT segmentation network (pumit_seg/seg_net.py): shapes at every degree of anisotropy,
deep supervision as nnU-Net expects it, no dead parameters, clear errors, nnU-Net construction."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pumit_seg.models.sac import sac_layers
from pumit_seg.models.seg_net import PUMITSegNet, build_arch_kwargs, required_patch_divisor, sac_strides

SMALL = {"decoder_channels": [16, 32, 64, 64], "full_res_channels": [8, 16]}


def tiny_arch_kwargs(spatial_dims: int, aniso_d: int, **overrides) -> dict:
    return build_arch_kwargs("tiny", spatial_dims, aniso_d, **{**SMALL, **overrides})


def build_tiny(input_channels: int, num_classes: int, spatial_dims: int, aniso_d: int, deep_supervision=True):
    torch.manual_seed(0)
    return PUMITSegNet(
        input_channels, num_classes, deep_supervision, **tiny_arch_kwargs(spatial_dims, aniso_d)
    )


def nnunet_scales(strides) -> list[list[float]]:
    """nnU-Net's nnUNetTrainer._get_deep_supervision_scales, verbatim."""
    return list(list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0))[:-1]


def expected_shapes(spatial_shape, strides) -> list[tuple[int, ...]]:
    shapes = []
    for scale in nnunet_scales(strides):
        sizes = [size * s for size, s in zip(spatial_shape, scale, strict=True)]
        assert all(float(v).is_integer() for v in sizes)
        shapes.append(tuple(int(v) for v in sizes))
    return shapes


def test_strides_and_divisors_follow_the_sac_rule():
    assert sac_strides(3, 2) == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert sac_strides(3, 0) == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert sac_strides(3, 5) == [[1, 1, 1]] + [[1, 2, 2]] * 5
    assert sac_strides(2, 5) == [[1, 1]] + [[2, 2]] * 5
    for aniso_d in range(6):
        depth_divisor, inplane_divisor = required_patch_divisor(aniso_d)
        cumulative = np.prod(np.array(sac_strides(3, aniso_d)), axis=0)
        assert (depth_divisor, inplane_divisor, inplane_divisor) == tuple(int(v) for v in cumulative)


@pytest.mark.parametrize(("aniso_d", "input_channels"), [(0, 1), (1, 2), (2, 3), (3, 1), (4, 2), (5, 1)])
def test_3d_output_shapes_match_nnunet_deep_supervision_scales(aniso_d, input_channels):
    net = build_tiny(input_channels, 3, spatial_dims=3, aniso_d=aniso_d).eval()
    depth_divisor, _ = required_patch_divisor(aniso_d)
    spatial = (depth_divisor * 2 if aniso_d >= 3 else depth_divisor, 64, 32)
    x = torch.randn(2, input_channels, *spatial)
    with torch.no_grad():
        outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 5
    shapes = [tuple(y.shape[2:]) for y in outputs]
    assert shapes == expected_shapes(spatial, net.strides)
    assert all(y.shape[:2] == (2, 3) for y in outputs)
    assert shapes[0] == spatial  # full resolution first


@pytest.mark.parametrize("input_channels", [1, 2, 3])
def test_2d_output_shapes(input_channels):
    net = build_tiny(input_channels, 4, spatial_dims=2, aniso_d=5).eval()
    x = torch.randn(2, input_channels, 64, 32)
    with torch.no_grad():
        outputs = net(x)
    assert [tuple(y.shape) for y in outputs] == [
        (2, 4, *shape) for shape in expected_shapes((64, 32), net.strides)
    ]


def test_2d_network_equals_3d_network_on_one_slice():
    net2d = build_tiny(2, 3, spatial_dims=2, aniso_d=5).eval()
    net3d = PUMITSegNet(2, 3, True, **tiny_arch_kwargs(3, 5)).eval()
    net3d.load_state_dict(net2d.state_dict())
    x = torch.randn(1, 2, 32, 64)
    with torch.no_grad():
        out2d, out3d = net2d(x), net3d(x.unsqueeze(2))
    for a, b in zip(out2d, out3d, strict=True):
        torch.testing.assert_close(a, b.squeeze(2))


def test_deep_supervision_flag_and_toggle():
    net = build_tiny(1, 2, spatial_dims=3, aniso_d=3, deep_supervision=False).eval()
    x = torch.randn(1, 1, 8, 32, 64)
    with torch.no_grad():
        single = net(x)
        assert isinstance(single, torch.Tensor) and single.shape == (1, 2, 8, 32, 64)
        net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
        outputs = net(x)
        assert isinstance(outputs, list) and len(outputs) == 5
        torch.testing.assert_close(outputs[0], single)
        net.decoder.deep_supervision = False
        assert isinstance(net(x), torch.Tensor)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    probs = logits.softmax(1)
    dims = (0, *range(2, logits.ndim))
    dice = (2 * (probs * one_hot).sum(dims) + 1) / (probs.sum(dims) + one_hot.sum(dims) + 1)
    return F.cross_entropy(logits, target) + 1 - dice.mean()


@pytest.mark.parametrize(("spatial_dims", "aniso_d", "spatial"), [(3, 1, (16, 32, 64)), (2, 5, (32, 64))])
def test_one_adamw_step_changes_every_parameter(spatial_dims, aniso_d, spatial):
    net = build_tiny(2, 3, spatial_dims=spatial_dims, aniso_d=aniso_d).train()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=1e-3, weight_decay=0.0
    )  # no decay: only gradients move
    x = torch.randn(2, 2, *spatial)
    target = torch.randint(0, 3, (2, 1, *spatial)).float()
    outputs = net(x)
    loss = 0.0
    for i, logits in enumerate(outputs):
        # nearest downsampling of the label map, like nnU-Net's DownsampleSegForDSTransform
        level_target = F.interpolate(target, size=logits.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + 0.5**i * dice_ce_loss(logits, level_target)
    loss.backward()
    # Provably without effect in the reference architecture (kept as it has them): a per-channel constant
    # added to the last pyramid block's output or to the 1/16 and 1/32 block norms is removed by the
    # InstanceNorms that follow (directly, or after the bias-free 1x1x1 lateral).
    last = f"encoder.blocks.{net.pyramid_blocks[-1]}."
    cancelled_by_norm = {
        last + "attn.proj.bias",
        last + "mlp.w3.bias",
        last + "mlp.ffn_ln.bias",
        "pyramid.block_norms.2.bias",
        "pyramid.block_norms.3.bias",
    }
    weak = {
        name: p.grad.abs().max().item() if p.grad is not None else None
        for name, p in net.named_parameters()
        if (p.grad is None or p.grad.abs().max() < 1e-7) and name not in cancelled_by_norm
    }
    assert not weak, f"parameters without gradient: {weak}"
    optimizer.step()
    unchanged = [
        name
        for name, p in net.named_parameters()
        if torch.equal(p, before[name]) and name not in cancelled_by_norm
    ]
    assert not unchanged, f"parameters not updated: {unchanged}"


def test_bad_strides_raise_with_expected_list():
    kwargs = tiny_arch_kwargs(3, 2)
    kwargs["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * 5
    with pytest.raises(
        ValueError,
        match=r"SAC rule.*aniso_d=2.*expected \[\[1, 1, 1\], \[1, 2, 2\], \[1, 2, 2\], \[2, 2, 2\]",
    ):
        PUMITSegNet(1, 2, **kwargs)
    kwargs["strides"] = sac_strides(3, 2)[:-1]
    with pytest.raises(ValueError, match="SAC rule"):
        PUMITSegNet(1, 2, **kwargs)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="spatial_dims=2 needs aniso_d=5"):
        PUMITSegNet(1, 2, **{**tiny_arch_kwargs(2, 5), "aniso_d": 3, "strides": [[1, 1]] + [[2, 2]] * 5})
    with pytest.raises(ValueError, match="pyramid_blocks"):
        PUMITSegNet(1, 2, **tiny_arch_kwargs(3, 2, pyramid_blocks=[0, 1, 2, 4]))
    with pytest.raises(ValueError, match="pyramid_channels needs 2 entries"):
        PUMITSegNet(1, 2, **tiny_arch_kwargs(3, 2, pyramid_channels=[16]))
    with pytest.raises(ValueError, match="decoder_channels needs 4 entries"):
        PUMITSegNet(1, 2, **tiny_arch_kwargs(3, 2, decoder_channels=[16, 32, 64]))
    with pytest.raises(ValueError, match="aniso_d"):
        build_arch_kwargs("tiny", 3, 6)


def test_bad_input_shapes_raise_with_divisors():
    net3d = build_tiny(1, 2, spatial_dims=3, aniso_d=2)
    with pytest.raises(ValueError, match=r"divisible by \(8, 32, 32\)"):
        net3d(torch.randn(1, 1, 4, 32, 32))  # depth must be a multiple of 2 ** (5 - 2)
    with pytest.raises(ValueError, match=r"divisible by \(8, 32, 32\)"):
        net3d(torch.randn(1, 1, 8, 48, 32))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\) with C=1"):
        net3d(torch.randn(1, 2, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        net3d(torch.randn(1, 1, 32, 32))
    net2d = build_tiny(1, 2, spatial_dims=2, aniso_d=5)
    with pytest.raises(ValueError, match=r"divisible by \(32, 32\)"):
        net2d(torch.randn(1, 1, 32, 40))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net2d(torch.randn(1, 1, 1, 32, 32))


def parameter_shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in net.named_parameters()}


@pytest.mark.parametrize("model", ["base", "large"])
def test_presets_build_valid_kwargs(model):
    kwargs = build_arch_kwargs(model, 3, 2)
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs["strides"] == sac_strides(3, 2)
    assert kwargs["decoder_channels"] == [128, 256, 512, 512]
    assert kwargs["full_res_channels"] == [32, 64]
    expected = {"base": (768, 12, [3, 5, 7, 11]), "large": (1024, 24, [7, 11, 15, 23])}[model]
    assert (kwargs["vit"]["embed_dim"], kwargs["vit"]["depth"], kwargs["pyramid_blocks"]) == expected
    assert "in_channels" not in kwargs["vit"]


def test_arch_kwargs_json_round_trip_and_nnunet_constructor():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = tiny_arch_kwargs(3, 3, pyramid_channels=[32, 48])
    reloaded = json.loads(json.dumps(arch_kwargs))
    assert reloaded == arch_kwargs
    direct = PUMITSegNet(input_channels=2, num_classes=4, deep_supervision=True, **arch_kwargs)
    via_nnunet = get_network_from_plans(
        "pumit_seg.models.seg_net.PUMITSegNet",
        reloaded,
        [],
        input_channels=2,
        output_channels=4,
        allow_init=True,
        deep_supervision=True,
    )
    assert isinstance(via_nnunet, PUMITSegNet)
    assert not hasattr(via_nnunet, "initialize")  # nnU-Net would call network.apply(network.initialize)
    assert parameter_shapes(via_nnunet) == parameter_shapes(direct)
    assert via_nnunet.decoder.deep_supervision is True
    # the stored config rebuilds the same network (what weights.save_model / load_model rely on)
    assert json.loads(json.dumps(direct.config)) == direct.config
    rebuilt = PUMITSegNet(**direct.config)
    assert parameter_shapes(rebuilt) == parameter_shapes(direct)
    rebuilt.load_state_dict(via_nnunet.state_dict())
    x = torch.randn(1, 2, 4, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x)[0], via_nnunet.eval()(x)[0])


def test_save_model_and_load_model_round_trip(tmp_path):
    from pumit_seg.weights import load_model, save_model

    net = build_tiny(3, 2, spatial_dims=3, aniso_d=4).eval()
    save_model(net, tmp_path / "seg.safetensors")
    loaded = load_model(tmp_path / "seg.safetensors").eval()
    assert isinstance(loaded, PUMITSegNet) and loaded.config == net.config
    x = torch.randn(1, 3, 2, 64, 32)
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x), strict=True):
            torch.testing.assert_close(a, b)


def test_an_fp16_autocast_runs_the_network_in_bf16():
    """nnU-Net's predictor opens a plain (fp16) autocast; the network switches it to bf16, the training
    precision, where the device supports bf16 (checked here on the CPU, where it always does)."""
    net = build_tiny(1, 2, spatial_dims=3, aniso_d=2).eval()
    x = torch.randn(1, 1, 8, 64, 32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            assert net(x)[0].dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert net(x)[0].dtype == torch.bfloat16
        assert net(x)[0].dtype == torch.float32  # no autocast: fp32 as before
        net.prefer_bf16_autocast = False
        with torch.autocast("cpu", dtype=torch.float16):
            assert net(x)[0].dtype == torch.float16


# ---- a fixed-aniso_d network and the pyramid's norms


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
