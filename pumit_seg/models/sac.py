"""Spatially adaptive convolution (SAC), SPEC section 2.

A SAC layer is built as an ordinary 3D layer with an isotropic kernel and an isotropic
power-of-two stride. At run time its depth kernel and depth stride adapt to how
anisotropic the input is, so one set of weights serves 2D images, thick-slice volumes
and isotropic volumes alike.

Two plain ints travel with every call (never a tensor subclass):

* ``aniso_d``: the degree of anisotropy of the batch, ``floor(log2(s_d / s_inplane))``
  clipped to 0..5. A 2D image is a volume with D = 1 and ``aniso_d = 5``.
* ``num_downsamples``: how many in-plane 2x downsamplings happened before this layer.

``pending = max(aniso_d - num_downsamples, 0)`` in-plane downsamplings still happen
before the depth axis may be downsampled. The depth factor of a feature map at in-plane
level n is ``2 ** max(n - aniso_d, 0)``.

Kernels are shrunk along depth by **summing** contiguous groups of taps. On an input that
is constant along depth (which is what a not-yet-downsampled thick-slice axis looks like
to the layer) the summed kernel gives exactly the output of the full kernel, the same
argument as 2D-to-3D weight inflation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MAX_ANISO_D",
    "pending_downsamples",
    "depth_downsample_stride",
    "depth_upsample_stride",
    "sum_pool_depth",
    "inflate_depth",
    "aniso_d_from_spacing",
    "SACDownsample",
    "SACConv3d",
    "SACUpsample",
]

# aniso_d is clipped to 0..MAX_ANISO_D; a 2D image is treated as aniso_d = MAX_ANISO_D.
MAX_ANISO_D = 5


def pending_downsamples(aniso_d: int, num_downsamples: int) -> int:
    """In-plane downsamplings still to happen before depth may be downsampled."""
    return max(aniso_d - num_downsamples, 0)


def depth_downsample_stride(stride: int, aniso_d: int, num_downsamples: int) -> int:
    """Depth stride of a downsampling SAC layer built with isotropic `stride`."""
    return max(stride >> pending_downsamples(aniso_d, num_downsamples), 1)


def depth_upsample_stride(stride: int, aniso_d: int, num_downsamples: int) -> int:
    """Depth stride of an upsampling SAC layer; `num_downsamples` is the level BEFORE upsampling.

    Depth is only upsampled where it was downsampled: the depth factor at level n is
    ``2 ** max(n - aniso_d, 0)``, and the layer undoes at most `stride` of it.
    """
    return min(2 ** max(num_downsamples - aniso_d, 0), stride)


def sum_pool_depth(weight: Tensor, depth: int) -> Tensor:
    """Sum contiguous groups of depth taps (dim 2) of a 5D kernel down to `depth` taps."""
    if weight.dim() != 5:
        raise ValueError(f"sum_pool_depth expects a 5D kernel, got shape {tuple(weight.shape)}")
    kernel_depth = weight.shape[2]
    if depth == kernel_depth:
        return weight
    if depth < 1 or kernel_depth % depth != 0:
        raise ValueError(f"cannot sum-pool a kernel of depth {kernel_depth} to depth {depth} (not a divisor)")
    out_c, in_c, _, kh, kw = weight.shape
    return weight.reshape(out_c, in_c, depth, kernel_depth // depth, kh, kw).sum(dim=3)


def inflate_depth(weight: Tensor, depth: int) -> Tensor:
    """Inflate a 2D kernel (O, I, h, w) or a shallower 5D kernel to `depth` taps.

    Each tap is repeated ``depth // kernel_depth`` times and divided by that factor, so
    on a depth-constant input the inflated kernel gives the original kernel's output,
    and ``sum_pool_depth(inflate_depth(w, d), w.shape[2]) == w``.
    """
    if weight.dim() == 4:
        weight = weight.unsqueeze(2)
    if weight.dim() != 5:
        raise ValueError(f"inflate_depth expects a 4D or 5D kernel, got shape {tuple(weight.shape)}")
    kernel_depth = weight.shape[2]
    if depth == kernel_depth:
        return weight
    if depth % kernel_depth != 0:
        raise ValueError(f"cannot inflate a kernel of depth {kernel_depth} to depth {depth} (not a multiple)")
    factor = depth // kernel_depth
    return weight.repeat_interleave(factor, dim=2) / factor


def aniso_d_from_spacing(spacing_dhw: Sequence[float], log_tolerance: float = 1e-6) -> int:
    """Degree of anisotropy: ``floor(log2(clip(s_d / min(s_h, s_w), 1, 32)))``, in 0..5.

    `log_tolerance` absorbs floating-point noise in the spacing ratio (2.4 / 0.3 is
    7.999999999999999 in binary floating point, which must still give 3).
    """
    if len(spacing_dhw) != 3:
        raise ValueError(f"spacing must be (s_d, s_h, s_w), got {tuple(spacing_dhw)}")
    s_d, s_h, s_w = (float(s) for s in spacing_dhw)
    if min(s_d, s_h, s_w) <= 0 or not all(math.isfinite(s) for s in (s_d, s_h, s_w)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(spacing_dhw)}")
    ratio = min(max(s_d / min(s_h, s_w), 1.0), 2.0**MAX_ANISO_D)
    return min(int(math.floor(math.log2(ratio) + log_tolerance)), MAX_ANISO_D)


def _check_power_of_two(stride: int) -> None:
    if stride < 1 or stride & (stride - 1) != 0:
        raise ValueError(f"SAC stride must be a power of two, got {stride}")


def _check_5d(x: Tensor, layer: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{layer} expects a 5D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")


class _InflateOnLoadMixin:
    """Let `load_state_dict` take 2D (4D tensor) or shallower kernels: they are inflated over depth."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        weight = state_dict.get(key)
        target_depth = self.weight.shape[2]
        if isinstance(weight, Tensor) and weight.dim() in (4, 5):
            source_depth = 1 if weight.dim() == 4 else weight.shape[2]
            if (weight.dim() == 4 or source_depth < target_depth) and target_depth % source_depth == 0:
                # Module.load_state_dict hands each module a shallow copy: the caller's dict is untouched.
                state_dict[key] = inflate_depth(weight, target_depth)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class SACDownsample(_InflateOnLoadMixin, nn.Conv3d):
    """Patchify / downsampling conv: kernel = stride = `stride` (a power of two), no padding.

    forward(x, aniso_d, num_downsamples): `num_downsamples` is the in-plane level BEFORE
    this layer; the caller adds log2(stride) afterwards. The depth stride is
    ``max(stride >> pending, 1)``; a smaller depth stride sum-pools the kernel's depth.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool = True):
        _check_power_of_two(stride)
        super().__init__(in_channels, out_channels, kernel_size=stride, stride=stride, bias=bias)
        self.sac_stride = stride

    def forward(self, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:  # type: ignore[override]
        _check_5d(x, type(self).__name__)
        depth_stride = depth_downsample_stride(self.sac_stride, aniso_d, num_downsamples)
        _, _, d, h, w = x.shape
        if d % depth_stride or h % self.sac_stride or w % self.sac_stride:
            raise ValueError(
                f"{type(self).__name__}: input spatial shape {(d, h, w)} is not divisible by the "
                f"stride {(depth_stride, self.sac_stride, self.sac_stride)} (aniso_d={aniso_d}, "
                f"num_downsamples={num_downsamples})"
            )
        weight = sum_pool_depth(self.weight, depth_stride)
        return F.conv3d(x, weight, self.bias, stride=(depth_stride, self.sac_stride, self.sac_stride))


class SACConv3d(_InflateOnLoadMixin, nn.Conv3d):
    """Stride-1 'same' conv; while in-plane downsamplings are pending it runs as a 1 x k x k conv.

    The depth taps are summed into one (exact on depth-constant input) and the depth
    padding becomes 0, so thin slices never mix before depth has been downsampled.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        if kernel_size % 2 != 1:
            raise ValueError(f"SACConv3d needs an odd kernel size for 'same' padding, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:  # type: ignore[override]
        _check_5d(x, type(self).__name__)
        if pending_downsamples(aniso_d, num_downsamples) > 0:
            pad = self.padding[1]
            weight = sum_pool_depth(self.weight, 1)
            return F.conv3d(x, weight, self.bias, padding=(0, pad, pad))
        return F.conv3d(x, self.weight, self.bias, padding=self.padding)


class SACUpsample(_InflateOnLoadMixin, nn.ConvTranspose3d):
    """Upsampling transposed conv: kernel = stride = `stride` (a power of two).

    forward(x, aniso_d, num_downsamples): `num_downsamples` is the level BEFORE upsampling;
    the caller subtracts log2(stride) afterwards. Depth stride
    ``min(2 ** max(num_downsamples - aniso_d, 0), stride)``; a smaller depth stride
    sum-pools the kernel's depth taps, as SPEC section 2 says ("weights sum-pooled the same
    way"), matching the reference implementation. Note that for a transposed conv the
    exact depth-constant equivalent would be the mean of the taps (sum / group size);
    summing scales that path by the group size, which training absorbs.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool = True):
        _check_power_of_two(stride)
        super().__init__(in_channels, out_channels, kernel_size=stride, stride=stride, bias=bias)
        self.sac_stride = stride

    def forward(self, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:  # type: ignore[override]
        _check_5d(x, type(self).__name__)
        depth_stride = depth_upsample_stride(self.sac_stride, aniso_d, num_downsamples)
        weight = sum_pool_depth(self.weight, depth_stride)
        return F.conv_transpose3d(
            x, weight, self.bias, stride=(depth_stride, self.sac_stride, self.sac_stride)
        )
