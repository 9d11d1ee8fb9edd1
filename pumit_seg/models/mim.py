"""Masked image modelling (MIM) of the universal ViT with soft visual tokens (docs/method.md, section 4).

A frozen tokenizer turns a crop into a distribution over its K codebook entries at every token
position (its stride equals the ViT's patch size, so its grid is the ViT's token grid). The ViT sees
the same crop with a random subset of its patch embeddings replaced by a learnable mask token, after
the absolute position embedding was added: a masked token keeps its position only through RoPE. A
head (Linear, GELU, Linear to K) predicts the tokenizer's distribution at the masked positions; the
loss is the cross entropy against the soft target there, nothing else.

Inputs come from the pre-training store as 3 channels in [0, 1]. The tokenizer sees ``2x - 1``, the
ViT the ImageNet mean / std normalisation EVA-02 was trained with (`normalize_for_vit`).

How many tokens are masked per sample (L tokens, ratio r = 0.55 by default), ``mask_count_rule``:

* ``"round"`` (default): exactly ``round(r L)`` (halves round up);
* ``"reference"``: ``L - int((1 - r) L)``, what the authors' code does (it draws
  ``int(L (1 - r))`` visible tokens, in floating point: for L = 500 that is 224 visible, 276 masked,
  where ``round`` masks 275).

The gradient reaching the patch embedding is scaled by ``patch_embed_grad_scale`` (0.1, the authors'
MIM setting) so an EVA-02-initialised patch kernel is not torn up early; forward values are unchanged.
The authors' optional MAE-style path (some blocks see only the visible tokens) is not implemented:
it is off in their configuration, every block sees every token here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pumit_seg.models.sac import depth_downsample_stride
from pumit_seg.models.vit import INIT_STD, UniversalViT, ViTOutput

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASK_COUNT_RULES",
    "MIMModel",
    "MIMOutput",
    "MIMStepResult",
    "num_masked_tokens",
    "random_token_mask",
    "tokens_from_grid",
    "soft_cross_entropy",
    "mim_step",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN (EVA-02's input normalisation)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_COUNT_RULES = ("round", "reference")


def num_masked_tokens(num_tokens: int, mask_ratio: float, rule: str = "round") -> int:
    """How many of `num_tokens` tokens one sample masks (see the module docstring for the rules)."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    if rule == "round":
        return int(math.floor(mask_ratio * num_tokens + 0.5))
    if rule == "reference":
        return num_tokens - int(num_tokens * (1 - mask_ratio))
    raise ValueError(f"mask_count_rule must be one of {MASK_COUNT_RULES}, got {rule!r}")


def random_token_mask(
    batch_size: int,
    num_tokens: int,
    num_masked: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, L) bool mask, True = masked: `num_masked` positions per sample, uniformly without replacement."""
    if not 0 <= num_masked <= num_tokens:
        raise ValueError(f"cannot mask {num_masked} of {num_tokens} tokens")
    noise = torch.rand(
        batch_size, num_tokens, generator=generator, device=generator.device if generator else None
    )
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, order[:, :num_masked], True)
    return mask.to(device) if device is not None else mask


def tokens_from_grid(grid_values: Tensor) -> Tensor:
    """(B, K, d, h, w) per-position values -> (B, L, K) in the ViT's token order (d, h, w row-major)."""
    if grid_values.dim() != 5:
        raise ValueError(f"expected (B, K, d, h, w), got shape {tuple(grid_values.shape)}")
    return grid_values.flatten(2).transpose(1, 2)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over rows of -sum_k p_k log softmax(logits)_k, computed in fp32."""
    return F.cross_entropy(logits.float(), target_probs.float())


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


@dataclass
class MIMOutput:
    tokens: Tensor  # (B, L, C) patch tokens after the final norm (CLS dropped)
    grid: tuple[int, int, int]
    masked_logits: Tensor  # (M, K) head output at the masked positions, M = mask.sum(), batch-major order


class MIMModel(nn.Module):
    """Universal ViT + mask token + MIM head. `encoder` is what gets exported for fine-tuning.

    ``encoder`` holds the `UniversalViT` constructor arguments (so `save_model` / `load_model`
    rebuild the whole MIM model from its header); ``codebook_size`` is the tokenizer's K.
    """

    def __init__(
        self,
        *,
        encoder: dict,
        codebook_size: int,
        mask_ratio: float = 0.55,
        mask_count_rule: str = "round",
        patch_embed_grad_scale: float = 0.1,
    ):
        super().__init__()
        if mask_count_rule not in MASK_COUNT_RULES:
            raise ValueError(f"mask_count_rule must be one of {MASK_COUNT_RULES}, got {mask_count_rule!r}")
        num_masked_tokens(1, mask_ratio, mask_count_rule)  # validates the ratio
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
        self.encoder = UniversalViT(**encoder)
        self.config = {
            "encoder": dict(self.encoder.config),
            "codebook_size": int(codebook_size),
            "mask_ratio": float(mask_ratio),
            "mask_count_rule": mask_count_rule,
            "patch_embed_grad_scale": float(patch_embed_grad_scale),
        }
        in_channels = self.encoder.config["in_channels"]
        if in_channels != len(IMAGENET_MEAN):
            raise ValueError(
                f"MIM feeds {len(IMAGENET_MEAN)}-channel images (grey replicated, ImageNet normalisation); "
                f"the encoder has in_channels={in_channels}"
            )
        width = self.encoder.embed_dim
        self.codebook_size = codebook_size
        self.mask_ratio = mask_ratio
        self.mask_count_rule = mask_count_rule
        self.patch_embed_grad_scale = patch_embed_grad_scale
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mim_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, codebook_size))
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, -1, 1, 1, 1), persistent=False)
        # The reference left the mask token uninitialised (torch.empty); we initialise it.
        nn.init.trunc_normal_(self.mask_token, std=INIT_STD)
        for module in self.mim_head.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
        if patch_embed_grad_scale != 1.0:
            self.encoder.patch_embed.proj.register_forward_hook(self._scale_patch_embed_gradient)

    def load_mask_token_and_head(self, state_dict: dict[str, Tensor], source: str) -> list[str]:
        """Copy the mask token and the MIM head from a MIM model's state dict (a ``pumit_pretrain import
        --kind mim`` file, one of our MIM checkpoints, under any key prefix) where their shapes fit; returns a
        report line each. The head is taken whole or not at all: a file made with another tokenizer has
        another codebook size, and its head is then left at its initialisation (reported)."""
        prefix = next(
            (name.removesuffix("mask_token") for name in state_dict if name.split(".")[-1] == "mask_token"),
            None,
        )
        if prefix is None:
            return [
                f"{source}: no mask token / MIM head (an encoder file): both start from their initialisation"
            ]
        lines = []
        for part, targets in (
            ("mask_token", {"mask_token": self.mask_token}),
            ("mim_head", {f"mim_head.{k}": v for k, v in self.mim_head.named_parameters()}),
        ):
            found = {name: state_dict.get(prefix + name) for name in targets}
            problems = [
                f"{name} {'missing' if tensor is None else f'of shape {tuple(tensor.shape)}'}, "
                f"expected {tuple(targets[name].shape)}"
                for name, tensor in found.items()
                if tensor is None or tensor.shape != targets[name].shape
            ]
            problems += [
                f"{name} holds NaN / inf"
                for name, t in found.items()
                if t is not None and not t.isfinite().all()
            ]
            if problems:
                lines.append(
                    f"{part}: not loaded from {source} ({'; '.join(problems)}), kept at its initialisation"
                )
                continue
            with torch.no_grad():
                for name, tensor in found.items():
                    targets[name].copy_(tensor)
            lines.append(f"{part}: loaded from {source} ({', '.join(prefix + n for n in found)})")
        return lines

    def _scale_patch_embed_gradient(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return _ScaleGradient.apply(output, self.patch_embed_grad_scale)

    def normalize_for_vit(self, image: Tensor) -> Tensor:
        """[0, 1] 3-channel image -> ImageNet mean / std normalisation (what the ViT sees)."""
        return (image - self.input_mean.to(image.dtype)) / self.input_std.to(image.dtype)

    def num_masked(self, num_tokens: int) -> int:
        return num_masked_tokens(num_tokens, self.mask_ratio, self.mask_count_rule)

    def token_grid(self, spatial_shape, aniso_d: int) -> tuple[int, int, int]:
        """The token grid of an input of spatial shape (D, H, W)."""
        patch = self.encoder.patch_size
        depth, height, width = spatial_shape
        return (depth // depth_downsample_stride(patch, aniso_d, 0), height // patch, width // patch)

    def random_mask(
        self, batch_size: int, num_tokens: int, generator: torch.Generator | None = None
    ) -> Tensor:
        return random_token_mask(
            batch_size,
            num_tokens,
            self.num_masked(num_tokens),
            generator=generator,
            device=self.mask_token.device,
        )

    def encode(self, x: Tensor, aniso_d: int, mask: Tensor | None = None) -> ViTOutput:
        """ViT forward with the masked patch embeddings (mask (B, L), True = masked) replaced by the mask token.

        `x` is the already normalised ViT input. Without a mask (or with an all-False one) this is the
        plain encoder's forward.
        """
        tokens, grid = self.encoder.embed(x, aniso_d)
        if mask is not None:
            if mask.shape != tokens.shape[:2]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not fit {tuple(tokens.shape[:2])} tokens"
                )
            mask_token = self.mask_token.to(tokens.dtype).expand_as(tokens)
            tokens = torch.where(mask.unsqueeze(-1), mask_token, tokens)
        return self.encoder.forward_tokens(tokens, grid)

    def forward(self, x: Tensor, aniso_d: int, mask: Tensor) -> MIMOutput:
        """Normalised input, token mask -> patch tokens and the head's logits at the masked positions."""
        output = self.encode(x, aniso_d, mask)
        patch_tokens = output.tokens[:, 1:]
        return MIMOutput(patch_tokens, output.grid, self.mim_head(patch_tokens[mask]))


@dataclass
class MIMStepResult:
    loss: Tensor  # scalar, differentiable
    accuracy: Tensor  # scalar: masked positions where the head's argmax equals the target's argmax
    mask: Tensor  # (B, L) bool
    masked_logits: Tensor  # (M, K)
    target_probs: Tensor  # (B, L, K) the tokenizer's distributions
    grid: tuple[int, int, int]


def mim_step(
    model: nn.Module,
    tokenizer: nn.Module,
    image: Tensor,
    aniso_d: int,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MIMStepResult:
    """One MIM forward on a [0, 1] 3-channel batch: targets from the frozen tokenizer, random mask, loss.

    `model` is a `MIMModel` or a DDP wrapper around one (its forward is what runs, so DDP's gradient
    hooks see it); `tokenizer` offers ``token_distribution(x, aniso_d) -> (B, K, d, h, w)`` on inputs
    in [-1, 1].
    """
    mim = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with torch.no_grad():
        target = tokens_from_grid(tokenizer.token_distribution(2 * image - 1, aniso_d)).float()
    grid = mim.token_grid(image.shape[2:], aniso_d)
    if target.shape[1] != math.prod(grid) or target.shape[2] != mim.codebook_size:
        raise ValueError(
            f"tokenizer targets of shape {tuple(target.shape)} do not fit the ViT's token grid {grid} "
            f"and codebook size {mim.codebook_size} (the tokenizer's stride must equal the patch size)"
        )
    if mask is None:
        mask = mim.random_mask(image.shape[0], target.shape[1], generator)
    output = model(mim.normalize_for_vit(image), aniso_d, mask)
    masked_target = target[mask]
    loss = soft_cross_entropy(output.masked_logits, masked_target)
    with torch.no_grad():
        accuracy = (output.masked_logits.argmax(-1) == masked_target.argmax(-1)).float().mean()
    return MIMStepResult(loss, accuracy, mask, output.masked_logits, target, output.grid)
