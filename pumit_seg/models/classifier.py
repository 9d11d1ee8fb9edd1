"""Image classifier: the universal ViT with a linear head on the final normed CLS token.

See docs/method.md, "Classification head", and docs/classification.md.

``ViTClassifier(num_classes, encoder=...)`` holds ``encoder`` (a `UniversalViT`, so
`load_pretrained_encoder(model.encoder, ...)` fills it from our safetensors files, the
authors' weights or EVA-02) and ``head`` (``nn.Linear(width, num_classes)``). Its ``config``
is JSON, so `pumit_seg.weights.save_model` / `load_model` write and rebuild it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import Tensor, nn

from pumit_seg.models.vit import INIT_STD, UniversalViT

__all__ = ["ViTClassifier", "DEFAULT_PATCH_SIZE"]

DEFAULT_PATCH_SIZE = inspect.signature(UniversalViT).parameters["patch_size"].default  # no preset changes it


class ViTClassifier(nn.Module):
    """Universal ViT + ``Linear`` on the CLS token after the final LayerNorm."""

    def __init__(self, num_classes: int, encoder: Mapping | UniversalViT):
        """`encoder`: a `UniversalViT`, or its constructor kwargs (what ``config`` stores)."""
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.encoder = encoder if isinstance(encoder, UniversalViT) else UniversalViT(**encoder)
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=INIT_STD)
        nn.init.zeros_(self.head.bias)
        self.config = {"num_classes": int(num_classes), "encoder": dict(self.encoder.config)}

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor, aniso_d: int) -> Tensor:
        """(B, C, D, H, W) -> logits (B, num_classes)."""
        return self.head(self.encoder(x, aniso_d).tokens[:, 0])
