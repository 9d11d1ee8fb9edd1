"""LPIPS perceptual distance (VGG16 variant) in plain torch, weights from user-given files.

Nothing can be downloaded at training time, and torchvision must not be imported by our
modules, so the VGG16 feature stack is written here (the same layer indices as
torchvision's ``vgg16().features``) and its weights, with the LPIPS linear heads, come from
files the user names. Accepted key layouts (any mix, across one or several files):

* torchvision's ``vgg16`` state dict: ``features.{i}.weight`` / ``.bias`` (``classifier.*`` is
  ignored);
* the ``lpips`` package's full ``LPIPS`` state dict: ``net.slice{k}.{i}.weight`` / ``.bias`` and
  ``lin{k}.model.1.weight`` (``scaling_layer.*`` buffers ignored);
* the public LPIPS heads file (``vgg.pth`` of the lpips / taming-transformers repositories):
  ``lin{k}.model.1.weight`` of shape (1, C, 1, 1);
* our own layout: ``features.{i}.*`` and ``heads.{k}.weight``.

LPIPS(x, y) = sum over the five taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) of the
spatial mean of ``head_k((f_k(x) / |f_k(x)| - f_k(y) / |f_k(y)|)^2)``, inputs in [-1, 1]
shifted / scaled to ImageNet statistics (LPIPS's scaling layer). Note the authors' copy
multiplies this by 2; we keep the standard LPIPS value (the perceptual weight is a flag).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pumit_seg.weights import load_state_dict_file

__all__ = [
    "VGG16_CONV_INDICES",
    "LPIPS_TAPS",
    "LPIPS",
    "map_lpips_keys",
    "build_perceptual_loss",
]

# torchvision vgg16 "features": conv widths; "M" = max-pool. Index i of a conv is its layer index.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # ReLU layer indices after which LPIPS compares features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's scaling layer: [-1, 1] input -> ImageNet-normalised (shift = 2 mean - 1, scale = 2 std)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in _VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = entry
    return nn.Sequential(*layers)  # indices 0..29, as torchvision up to relu5_3


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG; forward(x, y) -> mean distance over the batch (inputs (N, 3, H, W) in [-1, 1])."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.heads = nn.ModuleList([nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:  # always frozen: no dropout, no updates
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        x = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (N, 3, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        total = x.new_zeros(x.shape[0])
        for head, fx, fy in zip(self.heads, self._taps(x), self._taps(y), strict=True):
            fx = fx / (fx.norm(dim=1, keepdim=True) + _NORM_EPS)
            fy = fy / (fy.norm(dim=1, keepdim=True) + _NORM_EPS)
            total = total + head((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total.mean()

    def load_weights(self, paths: Sequence[str | os.PathLike]) -> None:
        """Fill VGG16 and the heads from one or several files (see the module docstring for layouts)."""
        mapped: dict[str, Tensor] = {}
        for path in paths:
            mapped.update(map_lpips_keys(load_state_dict_file(path), source=str(path)))
        expected = self.state_dict()
        missing = sorted(set(expected) - set(mapped))
        if missing:
            raise ValueError(
                f"LPIPS weights from {[str(p) for p in paths]} lack {len(missing)} entries, e.g. {missing[:4]}; "
                "give torchvision's vgg16 weights and the LPIPS heads (vgg.pth), or an lpips LPIPS state dict"
            )
        for key, tensor in mapped.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"LPIPS weights from {[str(p) for p in paths]}: {key} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[key].shape)}"
                )
        self.load_state_dict(mapped, strict=True)


_FEATURES = re.compile(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"^(?:lin(\d)\.model\.1|heads\.(\d))\.weight$")


def map_lpips_keys(state_dict: dict[str, Tensor], source: str = "") -> dict[str, Tensor]:
    """Keys of torchvision vgg16 / lpips LPIPS / LPIPS heads files -> this module's keys (others dropped)."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.").removeprefix("perceptual_loss.")
        if match := _FEATURES.match(key):
            index = int(match.group(1))
            if index in VGG16_CONV_INDICES:
                out[f"features.{index}.{match.group(2)}"] = tensor.float()
        elif match := _HEAD.match(key):
            head = int(match.group(1) or match.group(2))
            if head < len(LPIPS_CHANNELS):
                out[f"heads.{head}.weight"] = tensor.float().reshape(1, -1, 1, 1)
    if not out:
        raise ValueError(
            f"{source}: no VGG16 or LPIPS head weights recognised (keys like {list(state_dict)[:3]})"
        )
    return out


def build_perceptual_loss(paths: Sequence[str | os.PathLike]) -> LPIPS | None:
    """An LPIPS loaded from `paths`; with no paths a loud warning and None (train without the term)."""
    paths = [p for p in paths if p]
    if not paths:
        message = (
            "NO PERCEPTUAL LOSS: no VGG16 / LPIPS weight files were given (--lpips-weights), so the "
            "tokenizer trains WITHOUT the LPIPS term of the paper. Point --lpips-weights at torchvision's "
            "vgg16 weights and the LPIPS heads file (vgg.pth) to enable it."
        )
        warnings.warn(message, stacklevel=2)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
        return None
    model = LPIPS()
    model.load_weights(paths)
    return model
