"""Spatially adaptive convolution (SAC); see docs/method.md, "Degree of anisotropy and SAC".

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

**Adaptive and fixed layers.** By default a layer keeps its isotropic kernel and pools it
at every call, which is what mixed-``aniso_d`` pre-training needs. A layer built with
``fixed_aniso_d=A, fixed_num_downsamples=N`` (a segmentation network, whose ``aniso_d`` is
fixed by its plan) stores the kernel in the shape it actually uses at that anisotropy and
level, e.g. 4x16x16 for the patch embedding at ``aniso_d`` 2, as the reference does
(``adaptive_patch_embed: false``). This matters for training, not for the output: when an
adaptive layer sum-pools, every tap of a pooled group receives the same gradient, so Adam
moves the effective kernel ``group size`` times faster than a plain conv of the used shape
(4x for the patch kernel at ``aniso_d`` 2, 16x for 2D). A fixed layer is a plain conv of the
used shape. Isotropic (or any deeper) kernels loaded into a fixed layer with
``load_state_dict`` are sum-pooled once; shallower ones are inflated, so pre-trained weights
give the same output as the adaptive layer with the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pumit_seg.models.anisotropy import ANISO_D_2D, MAX_ANISO_D, aniso_d_from_spacing

__all__ = [
    "MAX_ANISO_D",
    "ANISO_D_2D",
    "pending_downsamples",
    "depth_downsample_stride",
    "depth_upsample_stride",
    "sum_pool_depth",
    "inflate_depth",
    "aniso_d_from_spacing",
    "SACDownsample",
    "SACConv3d",
    "SACUpsample",
    "sac_layers",
]



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


def _check_power_of_two(stride: int) -> None:
    if stride < 1 or stride & (stride - 1) != 0:
        raise ValueError(f"SAC stride must be a power of two, got {stride}")


def _check_5d(x: Tensor, layer: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{layer} expects a 5D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")


class _InflateOnLoadMixin:
    """Let `load_state_dict` take 2D (4D tensor) or shallower kernels: they are inflated over depth.

    A fixed-aniso_d layer also takes deeper kernels (e.g. the isotropic kernel of an adaptive layer):
    they are sum-pooled once to the stored depth, exactly what the adaptive layer does at every call.
    """

    fixed_aniso_d: int | None = None

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
            elif (
                self.fixed_aniso_d is not None
                and source_depth > target_depth
                and source_depth % target_depth == 0
                and weight.shape[3:] == self.weight.shape[3:]
            ):
                state_dict[key] = sum_pool_depth(weight, target_depth)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _check_fixed(fixed_aniso_d: int | None, fixed_num_downsamples: int | None, layer: str) -> None:
    if fixed_aniso_d is None:
        if fixed_num_downsamples is not None:
            raise ValueError(f"{layer}: fixed_num_downsamples needs fixed_aniso_d")
        return
    if (
        isinstance(fixed_aniso_d, bool)
        or not isinstance(fixed_aniso_d, int)
        or not 0 <= fixed_aniso_d <= MAX_ANISO_D
    ):
        raise ValueError(f"{layer}: fixed_aniso_d must be an int in 0..{MAX_ANISO_D}, got {fixed_aniso_d!r}")
    if not isinstance(fixed_num_downsamples, int) or fixed_num_downsamples < 0:
        raise ValueError(
            f"{layer}: a fixed layer needs fixed_num_downsamples (its in-plane level, an int >= 0), "
            f"got {fixed_num_downsamples!r}"
        )


def _resampling_kernel_depth(
    layer: str, stride: int, fixed_aniso_d: int | None, fixed_num_downsamples: int | None, depth_rule
) -> int:
    """Stored kernel depth of a down- or upsampling layer (kernel = stride): the isotropic `stride`, or for a
    fixed layer the depth stride `depth_rule(stride, aniso_d, num_downsamples)` it uses."""
    _check_power_of_two(stride)
    _check_fixed(fixed_aniso_d, fixed_num_downsamples, layer)
    if fixed_aniso_d is None:
        return stride
    return depth_rule(stride, fixed_aniso_d, fixed_num_downsamples)


class _FixedMixin:
    """Shared by the three layers: the run-time (aniso_d, num_downsamples) of a fixed layer must be its own."""

    fixed_aniso_d: int | None = None
    fixed_num_downsamples: int | None = None

    def _set_sac_attributes(self, stride: int, fixed_aniso_d: int | None, fixed_num_downsamples: int | None):
        self.sac_stride = stride
        self.fixed_aniso_d = fixed_aniso_d
        self.fixed_num_downsamples = fixed_num_downsamples

    @property
    def is_fixed(self) -> bool:
        return self.fixed_aniso_d is not None

    def _check_call(self, aniso_d: int, num_downsamples: int) -> None:
        if self.fixed_aniso_d is not None and (aniso_d, num_downsamples) != (
            self.fixed_aniso_d,
            self.fixed_num_downsamples,
        ):
            raise ValueError(
                f"{type(self).__name__} was built for aniso_d={self.fixed_aniso_d}, "
                f"num_downsamples={self.fixed_num_downsamples} (fixed kernel {tuple(self.weight.shape[2:])}), "
                f"called with aniso_d={aniso_d}, num_downsamples={num_downsamples}"
            )

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.fixed_aniso_d is None:
            return base + ", adaptive"
        return (
            base + f", fixed_aniso_d={self.fixed_aniso_d}, fixed_num_downsamples={self.fixed_num_downsamples}"
        )


def sac_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every SAC layer inside `module`."""
    return [
        (n, m) for n, m in module.named_modules() if isinstance(m, SACDownsample | SACConv3d | SACUpsample)
    ]


class SACDownsample(_InflateOnLoadMixin, _FixedMixin, nn.Conv3d):
    """Patchify / downsampling conv: kernel = stride = `stride` (a power of two), no padding.

    forward(x, aniso_d, num_downsamples): `num_downsamples` is the in-plane level BEFORE
    this layer; the caller adds log2(stride) afterwards. The depth stride is
    ``max(stride >> pending, 1)``; a smaller depth stride sum-pools the kernel's depth
    (adaptive), or the kernel is stored at that depth (``fixed_aniso_d``, see the module doc).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        bias: bool = True,
        *,
        fixed_aniso_d: int | None = None,
        fixed_num_downsamples: int | None = None,
    ):
        depth = _resampling_kernel_depth(
            type(self).__name__, stride, fixed_aniso_d, fixed_num_downsamples, depth_downsample_stride
        )
        super().__init__(
            in_channels, out_channels, kernel_size=(depth, stride, stride), stride=stride, bias=bias
        )
        self._set_sac_attributes(stride, fixed_aniso_d, fixed_num_downsamples)

    def forward(self, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:  # type: ignore[override]
        _check_5d(x, type(self).__name__)
        self._check_call(aniso_d, num_downsamples)
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


class SACConv3d(_InflateOnLoadMixin, _FixedMixin, nn.Conv3d):
    """'Same' conv with in-plane stride 1 or 2; while in-plane downsamplings are pending it runs as 1 x k x k.

    The depth taps are summed into one (exact on depth-constant input) and the depth
    padding becomes 0, so thin slices never mix before depth has been downsampled. With
    ``stride=2`` the depth stride follows the downsampling rule (2 once nothing is pending).
    A fixed layer (``fixed_aniso_d``) stores the 1 x k x k or k x k x k kernel it uses.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        *,
        stride: int = 1,
        fixed_aniso_d: int | None = None,
        fixed_num_downsamples: int | None = None,
    ):
        if kernel_size % 2 != 1:
            raise ValueError(f"SACConv3d needs an odd kernel size for 'same' padding, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"SACConv3d stride must be 1 or 2, got {stride}")
        _check_fixed(fixed_aniso_d, fixed_num_downsamples, type(self).__name__)
        depth = kernel_size
        if fixed_aniso_d is not None and pending_downsamples(fixed_aniso_d, fixed_num_downsamples) > 0:
            depth = 1
        super().__init__(
            in_channels,
            out_channels,
            (depth, kernel_size, kernel_size),
            stride=stride,
            padding=(depth // 2, kernel_size // 2, kernel_size // 2),
            bias=bias,
        )
        self._set_sac_attributes(stride, fixed_aniso_d, fixed_num_downsamples)

    def forward(self, x: Tensor | Sequence[Tensor], aniso_d: int, num_downsamples: int) -> Tensor:  # type: ignore[override]
        """`x` is one input or several whose channel concatenation is the input (a U-Net stage's upsampled
        map and skip): each part is convolved with its slice of the kernel and the results summed, the same
        output as on ``torch.cat(x, 1)`` without keeping that concatenation for the backward pass."""
        parts = [x] if isinstance(x, Tensor) else list(x)
        for part in parts:
            _check_5d(part, type(self).__name__)
        if sum(part.shape[1] for part in parts) != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: inputs with {[part.shape[1] for part in parts]} channels, "
                f"expected {self.in_channels} in all"
            )
        self._check_call(aniso_d, num_downsamples)
        depth_stride = depth_downsample_stride(self.sac_stride, aniso_d, num_downsamples)
        stride = (depth_stride, self.sac_stride, self.sac_stride)
        pad = self.padding[1]
        weight, depth_pad = self.weight, self.weight.shape[2] // 2
        if pending_downsamples(aniso_d, num_downsamples) > 0:
            weight, depth_pad = sum_pool_depth(self.weight, 1), 0
        output, start = None, 0
        for part in parts:
            end = start + part.shape[1]
            part_weight = weight if len(parts) == 1 else weight[:, start:end]
            # the bias is added once, with the first part
            y = F.conv3d(
                part,
                part_weight,
                self.bias if start == 0 else None,
                stride=stride,
                padding=(depth_pad, pad, pad),
            )
            output = y if output is None else output.add_(y)  # in place: a conv's backward needs no output
            start = end
        return output


class SACUpsample(_InflateOnLoadMixin, _FixedMixin, nn.ConvTranspose3d):
    """Upsampling transposed conv: kernel = stride = `stride` (a power of two).

    forward(x, aniso_d, num_downsamples): `num_downsamples` is the level BEFORE upsampling;
    the caller subtracts log2(stride) afterwards. Depth stride
    ``min(2 ** max(num_downsamples - aniso_d, 0), stride)``; a smaller depth stride
    sum-pools the kernel's depth taps, as the paper says ("weights sum-pooled the same
    way"), matching the reference implementation. Note that for a transposed conv the
    exact depth-constant equivalent would be the mean of the taps (sum / group size);
    summing scales that path by the group size, which training absorbs. A fixed layer
    (``fixed_aniso_d``; `fixed_num_downsamples` is the level before upsampling) stores the
    kernel at the depth stride it uses.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        bias: bool = True,
        *,
        fixed_aniso_d: int | None = None,
        fixed_num_downsamples: int | None = None,
    ):
        depth = _resampling_kernel_depth(
            type(self).__name__, stride, fixed_aniso_d, fixed_num_downsamples, depth_upsample_stride
        )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=(depth, stride, stride),
            stride=(depth, stride, stride),
            bias=bias,
        )
        self._set_sac_attributes(stride, fixed_aniso_d, fixed_num_downsamples)

    def forward(self, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:  # type: ignore[override]
        _check_5d(x, type(self).__name__)
        self._check_call(aniso_d, num_downsamples)
        depth_stride = depth_upsample_stride(self.sac_stride, aniso_d, num_downsamples)
        weight = sum_pool_depth(self.weight, depth_stride)
        return F.conv_transpose3d(
            x, weight, self.bias, stride=(depth_stride, self.sac_stride, self.sac_stride)
        )
