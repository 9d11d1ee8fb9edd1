"""SAC patch discriminator and hinge losses for the tokenizer's GAN term (docs/method.md, "Visual tokenizer").

Layout of the authors' ``SimplePatchDiscriminator`` (an nn.Sequential): per width in
``channels`` a SAC 3x3x3 conv with stride 2, GroupNorm(16), LeakyReLU; ``num_post_convs``
SAC 3x3x3 convs at the last width (GroupNorm, LeakyReLU); a SAC 3x3x3 conv to one channel
giving one real/fake score per patch.

A strided SAC conv follows SAC section 2: the depth stride is ``max(2 >> pending, 1)``;
while in-plane downsamplings are pending the kernel's depth taps are summed to one and
depth is neither padded nor strided (thin slices are not mixed before depth may shrink).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pumit_seg.models.sac import SACConv3d, depth_downsample_stride, sum_pool_depth

__all__ = ["SACStridedConv3d", "PatchDiscriminator", "hinge_discriminator_loss", "generator_adversarial_loss"]


class SACStridedConv3d(nn.Conv3d):
    """k x k x k conv with padding k // 2 and isotropic stride 2 whose depth adapts to aniso_d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2):
        if kernel_size % 2 != 1:
            raise ValueError(f"SACStridedConv3d needs an odd kernel size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        self.sac_stride = stride

    def forward(self, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:  # type: ignore[override]
        depth_stride = depth_downsample_stride(self.sac_stride, aniso_d, num_downsamples)
        pad = self.padding[1]
        if depth_stride == self.sac_stride:
            return F.conv3d(x, self.weight, self.bias, stride=self.sac_stride, padding=pad)
        return F.conv3d(
            x,
            sum_pool_depth(self.weight, 1),
            self.bias,
            stride=(depth_stride, self.sac_stride, self.sac_stride),
            padding=(0, pad, pad),
        )


class PatchDiscriminator(nn.Sequential):
    """Patch discriminator of SAC convs; forward(x, aniso_d) -> scores (B, 1, d, h, w)."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (128, 256, 512),
        num_post_convs: int = 1,
        num_groups: int = 16,
    ):
        channels = [int(c) for c in channels]
        layers: list[nn.Module] = []
        for i, width in enumerate(channels):
            layers += [
                SACStridedConv3d(in_channels if i == 0 else channels[i - 1], width),
                nn.GroupNorm(num_groups, width),
                nn.LeakyReLU(inplace=True),
            ]
        for _ in range(num_post_convs):
            layers += [
                SACConv3d(channels[-1], channels[-1], 3),
                nn.GroupNorm(num_groups, channels[-1]),
                nn.LeakyReLU(inplace=True),
            ]
        layers.append(SACConv3d(channels[-1], 1, 3))
        super().__init__(*layers)
        self.config = {
            "in_channels": in_channels,
            "channels": channels,
            "num_post_convs": num_post_convs,
            "num_groups": num_groups,
        }

    def forward(self, x: Tensor, aniso_d: int) -> Tensor:  # type: ignore[override]
        level = 0
        for layer in self:
            if isinstance(layer, SACStridedConv3d):
                x = layer(x, aniso_d, level)
                level += 1
            elif isinstance(layer, SACConv3d):
                x = layer(x, aniso_d, level)
            else:
                x = layer(x)
        return x


def hinge_discriminator_loss(score_real: Tensor, score_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))), as the authors' ``forward_disc``."""
    return 0.5 * (F.relu(1 - score_real.float()).mean() + F.relu(1 + score_fake.float()).mean())


def generator_adversarial_loss(score_fake: Tensor) -> Tensor:
    """The generator's hinge term: -mean D(x_rec)."""
    return -score_fake.float().mean()
