"""PUMIT segmentation network (docs/method.md, "Segmentation network").

A universal ViT encoder, an EVA-style feature pyramid built from four of its blocks, a plain U-Net
decoder over that pyramid and a light full-resolution branch on the raw input, so that the logits
reach input resolution. Every resampling layer is spatially adaptive (SAC, docs/method.md): depth is
only down- or upsampled where the degree of anisotropy `aniso_d` allows it.

Resolution levels n = 0..5 are the in-plane scales 1, 1/2, 1/4, 1/8, 1/16 and 1/32; at level n the
depth is divided by ``2 ** max(n - aniso_d, 0)``. The ViT tokens live at level 4 (patch size 16)::

    input ──full-res branch──> level 0, level 1 ───────────────────────────────┐ skips
    input ──UniversalViT──> 4 block outputs (level 4)                          │
          ──pyramid──> level 2 (up, norm, GELU, up), level 3 (up), level 4, level 5 (max-pool)
          ──decoder──> laterals at 2..5; from level 5: up, concat skip, 2 x conv ... down to level 0
          ──heads──> logits at levels 0..4 (deep supervision, full resolution first)

Architecture version 2 follows the authors' reference (docs/differences_from_reference.md): every SAC layer is built for
the plan's fixed ``aniso_d`` and stores the kernel shape it uses (``fixed_kernels``; pooling at every
step would make Adam move pooled kernels 2^k times too fast), an affine InstanceNorm on each of the four
block outputs before the pyramid, InstanceNorm in the 1/4 branch, laterals 1x1x1 conv + InstanceNorm +
LeakyReLU, and a full-resolution branch of one conv per level (the 1/2 level by a strided 3x3 conv,
1x3x3 while depth is not resampled). Plans written for version 1 are refused with a clear message.

The class is built by nnU-Net as ``PUMITSegNet(input_channels=..., num_classes=..., **arch_kwargs,
deep_supervision=...)``; `build_arch_kwargs` makes a valid ``arch_kwargs`` dict. This module does not
import nnU-Net.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from pumit_seg.models.sac import (
    MAX_ANISO_D,
    SACConv3d,
    SACUpsample,
    depth_downsample_stride,
    depth_upsample_stride,
    sum_pool_depth,
)
from pumit_seg.models.vit import (
    PYRAMID_BLOCKS,
    VIT_SIZES,
    UniversalViT,
    build_universal_vit,
    tokens_to_grid,
)

NUM_LEVELS = 6  # in-plane levels 0..5 (scales 1 .. 1/32)
TOKEN_LEVEL = 4  # the ViT patch size 16 puts its tokens at in-plane level 4
DEFAULT_DECODER_CHANNELS = (128, 256, 512, 512)  # at levels 2, 3, 4, 5
DEFAULT_FULL_RES_CHANNELS = (32, 64)  # at levels 0, 1 (the reference's 32, 64; 128 is the decoder's level 2)
ARCH_VERSION = 2  # bumped when arch_kwargs / parameter layout change incompatibly
NEGATIVE_SLOPE = 0.01  # LeakyReLU, as nnU-Net and the reference
# LeakyReLU after an InstanceNorm runs in place, as in nnU-Net: the norm's backward needs its input, not its
# output, so overwriting the output keeps one feature map fewer per conv-norm-act for the backward pass
# (-8 % peak memory at the paper's BTCV step, benchmarks/results/training_cpu.md).
ACT_INPLACE = True
NORM_EPS = 1e-5  # InstanceNorm3d's default


def _check_aniso_d(aniso_d: int) -> None:
    if isinstance(aniso_d, bool) or not isinstance(aniso_d, int) or not 0 <= aniso_d <= MAX_ANISO_D:
        raise ValueError(f"aniso_d must be an int in 0..{MAX_ANISO_D}, got {aniso_d!r}")


def depth_factor(level: int, aniso_d: int) -> int:
    """How much the depth axis is downsampled at in-plane level `level` (SAC rule)."""
    return 2 ** max(level - aniso_d, 0)


def sac_strides(spatial_dims: int, aniso_d: int) -> list[list[int]]:
    """nnU-Net's ``pool_op_kernel_sizes`` for this network: one entry per level 0..5.

    Level 0 has stride 1; level n >= 1 halves the in-plane size and the depth if n > aniso_d.
    For 2D (spatial_dims 2, aniso_d 5) the depth entry is left out.
    """
    _check_aniso_d(aniso_d)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    strides = [[1] * spatial_dims]
    for level in range(1, NUM_LEVELS):
        inplane = [2, 2]
        strides.append(inplane if spatial_dims == 2 else [2 if level > aniso_d else 1, *inplane])
    return strides


def required_patch_divisor(aniso_d: int) -> tuple[int, int]:
    """(depth divisor, in-plane divisor) that a 3D patch must satisfy to reach level 5 exactly."""
    _check_aniso_d(aniso_d)
    return depth_factor(NUM_LEVELS - 1, aniso_d), 2 ** (NUM_LEVELS - 1)


def build_arch_kwargs(
    model: str = "base",
    spatial_dims: int = 3,
    aniso_d: int = 0,
    *,
    decoder_channels: list[int] | None = None,
    full_res_channels: list[int] | None = None,
    pyramid_channels: list[int] | None = None,
    pyramid_blocks: list[int] | None = None,
    vit_overrides: dict | None = None,
    fixed_kernels: bool = True,
    final_norm_on_last_block: bool = False,
) -> dict:
    """JSON-serialisable ``arch_kwargs`` for `PUMITSegNet` (what an nnU-Net plan stores).

    `model` picks the ViT preset ("tiny", "base" or "large") and its default pyramid blocks;
    `vit_overrides` changes single ViT arguments (e.g. ``{"grad_checkpointing": True}``,
    ``{"pos_grid_shape": [12, 12, 12], "norm_eps": 1e-5}``). `fixed_kernels` and
    `final_norm_on_last_block`: see `PUMITSegNet`.
    """
    if model not in VIT_SIZES:
        raise ValueError(f"model must be one of {sorted(VIT_SIZES)}, got {model!r}")
    if spatial_dims == 2 and aniso_d != MAX_ANISO_D:
        raise ValueError(
            f"spatial_dims=2 needs aniso_d={MAX_ANISO_D} (a 2D image is one slice), got {aniso_d}"
        )
    # Read the preset's constructor kwargs without allocating its weights.
    with torch.device("meta"):
        vit_config = dict(build_universal_vit(model, **(vit_overrides or {})).config)
    vit_config.pop("in_channels", None)  # set from nnU-Net's input_channels
    vit_config.pop("fixed_aniso_d", None)  # set from aniso_d and fixed_kernels
    return {
        "arch_version": ARCH_VERSION,
        "spatial_dims": spatial_dims,
        "aniso_d": aniso_d,
        "vit": vit_config,
        "pyramid_blocks": list(pyramid_blocks if pyramid_blocks is not None else PYRAMID_BLOCKS[model]),
        "decoder_channels": list(decoder_channels or DEFAULT_DECODER_CHANNELS),
        "full_res_channels": list(full_res_channels or DEFAULT_FULL_RES_CHANNELS),
        "pyramid_channels": list(pyramid_channels) if pyramid_channels is not None else None,
        "strides": sac_strides(spatial_dims, aniso_d),
        "fixed_kernels": bool(fixed_kernels),
        "final_norm_on_last_block": bool(final_norm_on_last_block),
    }


def _fixed(fixed_aniso_d: int | None, level: int) -> dict:
    """SAC keyword arguments of a layer at in-plane `level`: fixed when `fixed_aniso_d` is an int."""
    if fixed_aniso_d is None:
        return {}
    return {"fixed_aniso_d": fixed_aniso_d, "fixed_num_downsamples": level}


class ConvNormAct(nn.Module):
    """SAC 3x3x3 conv (in-plane stride 1 or 2) -> InstanceNorm3d (affine) -> LeakyReLU, as in nnU-Net.

    `level` is the in-plane level of the input; `fixed_aniso_d` (None: adaptive) fixes the kernel shape.
    """

    def __init__(
        self, in_channels: int, out_channels: int, level: int, fixed_aniso_d: int | None, stride: int = 1
    ):
        super().__init__()
        # no bias: the instance norm right after would cancel it (a dead parameter)
        self.conv = SACConv3d(
            in_channels,
            out_channels,
            kernel_size=3,
            bias=False,
            stride=stride,
            **_fixed(fixed_aniso_d, level),
        )
        self.norm = nn.InstanceNorm3d(out_channels, eps=NORM_EPS, affine=True)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=ACT_INPLACE)

    # Without autograd (prediction: nnU-Net's predictor runs under torch.inference_mode) several inputs are
    # concatenated and convolved once: there is no backward pass to keep the concatenation for, and one
    # convolution skips the per-part kernel-slice copies and the sum of the parts (the same function up to
    # float rounding; benchmarks/results/predict_cpu.md). With autograd the parts stay apart (training memory).
    concat_without_grad = True

    def forward(self, x: torch.Tensor | list[torch.Tensor], aniso_d: int, level: int) -> torch.Tensor:
        """`x`: one map, or several to be read as their channel concatenation (see `SACConv3d.forward`)."""
        if self.concat_without_grad and isinstance(x, list | tuple) and not torch.is_grad_enabled():
            x = torch.cat(x, dim=1)
        return self.act(self.norm(self.conv(x, aniso_d, level)))


class ConvBlock(nn.Module):
    """Two `ConvNormAct` layers at one resolution level."""

    def __init__(self, in_channels: int, out_channels: int, level: int, fixed_aniso_d: int | None):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, level, fixed_aniso_d)
        self.conv2 = ConvNormAct(out_channels, out_channels, level, fixed_aniso_d)

    def forward(self, x: torch.Tensor | list[torch.Tensor], aniso_d: int, level: int) -> torch.Tensor:
        return self.conv2(self.conv1(x, aniso_d, level), aniso_d, level)


class FullResolutionBranch(nn.Module):
    """The reference's full-resolution adapter encoder: one conv-norm-act at level 0 (1/1) on the raw input,
    one strided conv-norm-act to level 1 (1/2); they are the decoder's skips at levels 0 and 1. Kernels are
    1x3x3 and the stride 1x2x2 while depth is not resampled (e.g. BTCV at aniso_d 2)."""

    def __init__(self, in_channels: int, channels: list[int], fixed_aniso_d: int | None):
        super().__init__()
        self.level0 = ConvNormAct(in_channels, channels[0], 0, fixed_aniso_d)
        self.level1 = ConvNormAct(channels[0], channels[1], 0, fixed_aniso_d, stride=2)

    def forward(self, x: torch.Tensor, aniso_d: int) -> list[torch.Tensor]:
        skip0 = self.level0(x, aniso_d, 0)
        skip1 = self.level1(skip0, aniso_d, 0)
        return [skip0, skip1]


class FeaturePyramid(nn.Module):
    """EVA / BEiT-style simple feature pyramid from four ViT block outputs at level 4, as the reference.

    Each block output first passes an affine InstanceNorm (`block_norms`); then level 2: SAC transposed
    conv, InstanceNorm, GELU, SAC transposed conv; level 3: one SAC transposed conv; level 4: as is;
    level 5: max-pooling with the SAC depth stride.
    """

    def __init__(self, embed_dim: int, level2_channels: int, level3_channels: int, fixed_aniso_d: int | None):
        super().__init__()
        # The transposed convs have no bias: an InstanceNorm follows each of them (directly, or after the
        # bias-free 1x1x1 lateral), which would cancel a per-channel constant.
        self.block_norms = nn.ModuleList(
            nn.InstanceNorm3d(embed_dim, eps=NORM_EPS, affine=True) for _ in range(4)
        )
        self.level2_up1 = SACUpsample(
            embed_dim, level2_channels, stride=2, bias=False, **_fixed(fixed_aniso_d, TOKEN_LEVEL)
        )
        self.level2_norm = nn.InstanceNorm3d(level2_channels, eps=NORM_EPS, affine=True)
        self.level2_act = nn.GELU()
        self.level2_up2 = SACUpsample(
            level2_channels, level2_channels, stride=2, bias=False, **_fixed(fixed_aniso_d, TOKEN_LEVEL - 1)
        )
        self.level3_up = SACUpsample(
            embed_dim, level3_channels, stride=2, bias=False, **_fixed(fixed_aniso_d, TOKEN_LEVEL)
        )

    def forward(
        self, features: list[torch.Tensor], aniso_d: int, level2_projection: nn.Conv3d | None = None
    ) -> list[torch.Tensor]:
        """`features`: 4 maps (B, C, d, h, w) at level 4 -> maps at levels 2, 3, 4, 5. `level2_projection`: a
        bias-free 1x1x1 conv that the caller applies to level 2 next (the decoder's lateral); given, it is
        folded into level 2's last transposed conv (`level2_up2_projected`) and level 2 comes out projected."""
        features = [norm(x) for norm, x in zip(self.block_norms, features, strict=True)]
        x2 = self.level2_up1(features[0], aniso_d, TOKEN_LEVEL)
        x2 = self.level2_act(self.level2_norm(x2))
        if level2_projection is None:
            x2 = self.level2_up2(x2, aniso_d, TOKEN_LEVEL - 1)
        else:
            x2 = self.level2_up2_projected(x2, aniso_d, level2_projection)
        x3 = self.level3_up(features[1], aniso_d, TOKEN_LEVEL)
        x4 = features[2]
        pool_depth = depth_downsample_stride(2, aniso_d, TOKEN_LEVEL)
        x5 = F.max_pool3d(features[3], kernel_size=(pool_depth, 2, 2))
        return [x2, x3, x4, x5]

    def level2_up2_projected(self, x: torch.Tensor, aniso_d: int, projection: nn.Conv3d) -> torch.Tensor:
        """``projection(level2_up2(x))`` as one transposed conv: both are linear and bias-free, so the product of
        their kernels (per tap) is the same map, computed on 128 instead of 768 output channels (6x fewer FLOPs
        at 1/4 scale). The product (milliseconds, next to a tile's forward pass) is formed at least in fp32 at
        every call, so no cached copy can go stale when the weights change; its rounding differs from the
        two-step path's, not its function."""
        up = self.level2_up2
        if up.bias is not None or projection.bias is not None:
            raise ValueError("level2_up2_projected needs bias-free layers")
        depth_stride = depth_upsample_stride(up.sac_stride, aniso_d, TOKEN_LEVEL - 1)
        dtype = torch.promote_types(up.weight.dtype, torch.float32)
        with torch.autocast(up.weight.device.type, enabled=False):
            kernel = torch.einsum(
                "icdhw,oc->iodhw",
                sum_pool_depth(up.weight.to(dtype), depth_stride),
                projection.weight.flatten(1).to(dtype),
            )
        stride = (depth_stride, up.sac_stride, up.sac_stride)
        return F.conv_transpose3d(x, kernel.to(x.dtype), None, stride=stride)


class Lateral(nn.Sequential):
    """1x1x1 conv (no bias: the norm follows) -> InstanceNorm3d (affine) -> LeakyReLU, the reference's lateral."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.InstanceNorm3d(out_channels, eps=NORM_EPS, affine=True),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=ACT_INPLACE),
        )

    def after_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Norm and activation of a map the 1x1x1 conv was already applied to (see `level2_up2_projected`)."""
        return self[2](self[1](x))


class UNetDecoder(nn.Module):
    """Plain U-Net decoder from level 5 to level 0 with segmentation heads at levels 0..4.

    `channels[n]` is the width at level n. Lateral 1x1x1 convs bring the pyramid maps (levels 2..5)
    to the decoder widths; every stage upsamples (SAC transposed conv), concatenates the skip and
    applies two conv-norm-act layers. ``deep_supervision`` (set by nnU-Net at run time) selects a
    list of logits at levels 0..4 (full resolution first) or the level-0 logits only.
    """

    def __init__(
        self,
        pyramid_channels: list[int],
        channels: list[int],
        num_classes: int,
        deep_supervision: bool,
        fixed_aniso_d: int | None,
    ):
        super().__init__()
        self.deep_supervision = deep_supervision
        # laterals[i] acts on pyramid level i + 2
        self.laterals = nn.ModuleList(
            Lateral(pyramid_channels[i], channels[i + 2]) for i in range(len(pyramid_channels))
        )
        # upsamples[n] / stages[n] / seg_layers[n] produce level n from level n + 1
        # (`seg_layers` is nnU-Net's name: its weight transfer skips '.seg_layers.' keys)
        self.upsamples = nn.ModuleList(
            SACUpsample(channels[n + 1], channels[n], stride=2, **_fixed(fixed_aniso_d, n + 1))
            for n in range(NUM_LEVELS - 1)
        )
        self.stages = nn.ModuleList(
            ConvBlock(2 * channels[n], channels[n], n, fixed_aniso_d) for n in range(NUM_LEVELS - 1)
        )
        self.seg_layers = nn.ModuleList(
            nn.Conv3d(channels[n], num_classes, kernel_size=1) for n in range(NUM_LEVELS - 1)
        )

    def forward(
        self, skips: list[torch.Tensor], aniso_d: int, level2_projected: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """`skips[n]`: feature map at level n, n = 0..5 (levels 2..5 before the laterals)."""
        levels = [
            lateral.after_projection(x) if index == 0 and level2_projected else lateral(x)
            for index, (lateral, x) in enumerate(zip(self.laterals, skips[2:], strict=True))
        ]  # with `level2_projected` the level-2 lateral's conv was folded into the pyramid
        skips = skips[:2] + levels
        x = skips[NUM_LEVELS - 1]
        logits = []
        for level in reversed(range(NUM_LEVELS - 1)):
            x = self.upsamples[level](x, aniso_d, level + 1)
            x = self.stages[level]([x, skips[level]], aniso_d, level)
            if self.deep_supervision or level == 0:
                logits.append(self.seg_layers[level](x))
        if not self.deep_supervision:
            return logits[0]
        return logits[::-1]  # full resolution first, as nnU-Net's deep supervision expects


def init_conv_weights(module: nn.Module, negative_slope: float = NEGATIVE_SLOPE) -> None:
    """He-normal init for (transposed) convs, zero biases: nnU-Net's InitWeights_He(1e-2)."""
    if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _bf16_supported(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu"


class PUMITSegNet(nn.Module):
    """Universal ViT + SAC feature pyramid + U-Net decoder + full-resolution branch (docs/method.md, "Segmentation network").

    Args:
        input_channels: image channels (any number; the ViT patch kernel takes them all).
        num_classes: output channels (logits).
        deep_supervision: return logits at levels 0..4 (full resolution first) instead of level 0 only.
            nnU-Net toggles it at run time through ``network.decoder.deep_supervision``.
        spatial_dims: 2 (input (B, C, H, W), needs aniso_d 5) or 3 (input (B, C, D, H, W)).
        aniso_d: degree of anisotropy of the (fixed) target spacing, 0..5 (docs/method.md).
        vit: `UniversalViT` keyword arguments except ``in_channels``.
        pyramid_blocks: 4 block indices (0-based) feeding pyramid levels 2, 3, 4, 5; their raw outputs
            pass an affine InstanceNorm each (the reference).
        decoder_channels: decoder widths at levels 2, 3, 4, 5 (the lateral convs' outputs).
        full_res_channels: widths of the full-resolution branch and decoder at levels 0 and 1.
        strides: nnU-Net's pool_op_kernel_sizes, must equal `sac_strides(spatial_dims, aniso_d)`.
        pyramid_channels: channels of pyramid levels 2 and 3; None keeps the ViT width (EVA / BEiT).
        fixed_kernels: True (default, the reference's ``adaptive_patch_embed: false``): every SAC layer
            stores the kernel shape it uses at this ``aniso_d`` (patch kernel 4x16x16 at aniso_d 2,
            1x3x3 convs while depth is not downsampled), so training moves each tap as a plain conv
            would. False keeps isotropic kernels pooled at every step (outputs are the same at equal
            weights, training is not: pooled taps move 2^k times faster under Adam).
        final_norm_on_last_block: False (the reference): the ViT's final LayerNorm is not used (the
            InstanceNorm before the pyramid normalises) and is removed, so no dead parameter remains
            (DDP would refuse one); its pre-trained weights are reported as skipped. True takes the last
            pyramid block after the final LayerNorm (pumit-seg's architecture version 1 did this).
        arch_version: the version of this layout written by `build_arch_kwargs`; version 1 plans (from
            before the reference pyramid) are refused with a message to re-plan.
    """

    # Run in bf16 where an fp16 autocast is open and the device supports bf16: the trainer trains in bf16,
    # and nnU-Net's predictor opens a plain (fp16) autocast; this keeps prediction in the training precision.
    # A class attribute, not an arch kwarg: it changes no parameter and no plan.
    prefer_bf16_autocast = True
    # Prediction only (no autograd): fold the decoder's level-2 lateral 1x1x1 conv into the pyramid's last level-2
    # transposed conv (`FeaturePyramid.level2_up2_projected`; benchmarks/results/predict_cpu.md). Training keeps
    # the two layers apart: same function, and their separate gradients are what the optimiser sees.
    fold_level2_lateral = True

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        deep_supervision: bool = True,
        *,
        spatial_dims: int,
        aniso_d: int,
        vit: dict,
        pyramid_blocks: list[int],
        decoder_channels: list[int] = DEFAULT_DECODER_CHANNELS,
        full_res_channels: list[int] = DEFAULT_FULL_RES_CHANNELS,
        strides: list[list[int]],
        pyramid_channels: list[int] | None = None,
        fixed_kernels: bool = True,
        final_norm_on_last_block: bool = False,
        arch_version: int = 1,
    ):
        super().__init__()
        if arch_version != ARCH_VERSION:
            raise ValueError(
                f"PUMITSegNet arch_kwargs of architecture version {arch_version} (this pumit-seg builds version "
                f"{ARCH_VERSION}: fixed-aniso_d kernels and the reference pyramid / decoder, see the README). The "
                "plans were written by an older pumit-seg: re-run pumit_plan_and_preprocess for this dataset and "
                "retrain; old checkpoints do not fit the new layout"
            )
        _check_aniso_d(aniso_d)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if spatial_dims == 2 and aniso_d != MAX_ANISO_D:
            raise ValueError(
                f"spatial_dims=2 needs aniso_d={MAX_ANISO_D} (a 2D image is one slice), got {aniso_d}"
            )
        expected_strides = sac_strides(spatial_dims, aniso_d)
        if [list(s) for s in strides] != expected_strides:
            raise ValueError(
                f"strides {[list(s) for s in strides]} do not follow the SAC rule for spatial_dims={spatial_dims}, "
                f"aniso_d={aniso_d}: expected {expected_strides}"
            )
        for name, value, length in [
            ("pyramid_blocks", pyramid_blocks, 4),
            ("decoder_channels", decoder_channels, 4),
            ("full_res_channels", full_res_channels, 2),
            ("pyramid_channels", pyramid_channels if pyramid_channels is not None else [None] * 2, 2),
        ]:
            if len(value) != length:
                raise ValueError(f"{name} needs {length} entries, got {list(value)}")
        if "in_channels" in vit:
            raise ValueError("vit must not contain 'in_channels': it is set from input_channels")

        self.input_channels = input_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.aniso_d = aniso_d  # a plain int: torch.compile / checkpoint friendly
        self.pyramid_blocks = list(pyramid_blocks)
        self.strides = expected_strides
        self.config = {
            "input_channels": input_channels,
            "num_classes": num_classes,
            "deep_supervision": deep_supervision,
            "spatial_dims": spatial_dims,
            "aniso_d": aniso_d,
            "vit": dict(vit),
            "pyramid_blocks": list(pyramid_blocks),
            "decoder_channels": list(decoder_channels),
            "full_res_channels": list(full_res_channels),
            "strides": expected_strides,
            "pyramid_channels": list(pyramid_channels) if pyramid_channels is not None else None,
            "fixed_kernels": bool(fixed_kernels),
            "final_norm_on_last_block": bool(final_norm_on_last_block),
            "arch_version": ARCH_VERSION,
        }
        if "fixed_aniso_d" in vit:
            raise ValueError("vit must not contain 'fixed_aniso_d': it is set from aniso_d and fixed_kernels")
        fixed_aniso_d = aniso_d if fixed_kernels else None
        self.fixed_kernels = bool(fixed_kernels)

        self.encoder = UniversalViT(in_channels=input_channels, fixed_aniso_d=fixed_aniso_d, **vit)
        if self.encoder.num_downsamples != TOKEN_LEVEL:
            raise ValueError(
                f"the ViT patch size must be {2**TOKEN_LEVEL}, got {2**self.encoder.num_downsamples}"
            )
        vit_depth = len(self.encoder.blocks)
        if (
            sorted(set(pyramid_blocks)) != list(pyramid_blocks)
            or not 0 <= pyramid_blocks[0] <= pyramid_blocks[-1] < vit_depth
        ):
            raise ValueError(
                f"pyramid_blocks must be 4 increasing block indices below {vit_depth}, got {pyramid_blocks}"
            )
        self.last_block_after_norm = bool(final_norm_on_last_block) and pyramid_blocks[-1] == vit_depth - 1
        if not self.last_block_after_norm:
            # unused otherwise: a dead parameter would stay at its loaded value and break DDP
            self.encoder.norm = nn.Identity()

        embed_dim = self.encoder.config["embed_dim"]
        level23_channels = list(pyramid_channels) if pyramid_channels is not None else [embed_dim, embed_dim]
        self.pyramid = FeaturePyramid(embed_dim, *level23_channels, fixed_aniso_d)
        self.full_res_branch = FullResolutionBranch(input_channels, list(full_res_channels), fixed_aniso_d)
        self.decoder = UNetDecoder(
            pyramid_channels=[*level23_channels, embed_dim, embed_dim],
            channels=[*full_res_channels, *decoder_channels],
            num_classes=num_classes,
            deep_supervision=deep_supervision,
            fixed_aniso_d=fixed_aniso_d,
        )
        self.init_non_encoder_weights()

    def init_non_encoder_weights(self) -> None:
        """He init of the pyramid, full-resolution branch and decoder; the encoder keeps its own init
        (and usually pre-trained weights). Deliberately not named `initialize`: nnU-Net would call it."""
        for part in (self.pyramid, self.full_res_branch, self.decoder):
            part.apply(init_conv_weights)

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected layout and divisors if `x` does not fit."""
        depth_divisor, inplane_divisor = required_patch_divisor(self.aniso_d)
        layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.input_channels:
            raise ValueError(
                f"PUMITSegNet (spatial_dims={self.spatial_dims}) expects input {layout} with C={self.input_channels}, "
                f"got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        divisors = (
            (inplane_divisor, inplane_divisor)
            if self.spatial_dims == 2
            else (depth_divisor, inplane_divisor, inplane_divisor)
        )
        if any(size % divisor for size, divisor in zip(spatial, divisors, strict=True)):
            raise ValueError(
                f"PUMITSegNet input spatial shape {spatial} must be divisible by {divisors} "
                f"({'depth, ' if self.spatial_dims == 3 else ''}height, width) at aniso_d={self.aniso_d}"
            )
        level5_voxels = 1  # a plain loop: torch.compile (fullgraph) does not trace math.prod over a generator
        for size, divisor in zip(spatial, divisors, strict=True):
            level5_voxels *= size // divisor
        if level5_voxels < 2:
            raise ValueError(
                f"PUMITSegNet input spatial shape {spatial} leaves one voxel at the 1/32 level; its InstanceNorm "
                f"needs at least two: make one axis twice {divisors}"
            )

    def autocast_context(self, x: torch.Tensor):
        """Switch an enclosing fp16 autocast to bf16 where the device supports it (see `prefer_bf16_autocast`)."""
        device_type = x.device.type
        if (
            self.prefer_bf16_autocast
            and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.float16
            and _bf16_supported(device_type)
        ):
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        with self.autocast_context(x):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input_shape(x)
        if self.spatial_dims == 2:
            x = x.unsqueeze(2)  # a 2D image is a volume with one slice
        aniso_d = self.aniso_d

        encoded = self.encoder(x, aniso_d, return_blocks=tuple(self.pyramid_blocks))
        block_tokens = list(encoded.block_outputs)
        if self.last_block_after_norm:
            block_tokens[-1] = encoded.tokens
        features = [tokens_to_grid(tokens[:, 1:], encoded.grid) for tokens in block_tokens]  # drop CLS

        # without autograd (prediction) the level-2 lateral conv is folded into the pyramid's last level-2 conv
        fold = self.fold_level2_lateral and not torch.is_grad_enabled()
        projection = self.decoder.laterals[0][0] if fold else None
        pyramid = self.pyramid(features, aniso_d, level2_projection=projection)
        skips = self.full_res_branch(x, aniso_d) + pyramid
        logits = self.decoder(skips, aniso_d, level2_projected=fold)

        if self.spatial_dims == 2:
            if isinstance(logits, list):
                return [y.squeeze(2) for y in logits]
            return logits.squeeze(2)
        return logits
