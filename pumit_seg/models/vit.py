"""The universal ViT (PUMIT encoder) and pretrained-weight import; see docs/method.md, "Universal ViT".

Macro: SAC patch embedding (kernel = stride = patch size) -> patch tokens + absolute
position embedding (a learnable grid resampled to the token grid) -> CLS token prepended
-> EVA-02 blocks with additive 3D RoPE -> final LayerNorm.

Parameter names follow the authors' checkpoint layout (docs/weights_format.md), so their
``pumit.ckpt`` and our own safetensors files load by name. `load_pretrained_encoder`
also imports EVA-02 checkpoints (timm or official EVA key layout) and reports every key.

Any input runs through one model: 2D images are (B, C, 1, H, W) with ``aniso_d = 5``;
volumes are (B, C, D, H, W) with their own ``aniso_d`` (see `pumit_seg.models.sac`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pumit_seg.models.rope import RotaryEmbedding3D, apply_rope
from pumit_seg.models.sac import SACDownsample, inflate_depth, sum_pool_depth
from pumit_seg.weights import load_state_dict_file, unwrap_state_dict

__all__ = [
    "PYRAMID_BLOCKS",
    "ViTOutput",
    "UniversalViT",
    "tokens_to_grid",
    "resample_pos_grid",
    "universal_vit_tiny",
    "universal_vit_base",
    "universal_vit_large",
    "VIT_SIZES",
    "build_universal_vit",
    "WeightReport",
    "PretrainedWeightsError",
    "MIN_FILLED_FRACTION",
    "load_pretrained_encoder",
]

# Blocks whose outputs feed the segmentation decoder's feature pyramid, per preset.
PYRAMID_BLOCKS = {"tiny": [0, 1, 2, 3], "base": [3, 5, 7, 11], "large": [7, 11, 15, 23]}

INIT_STD = 0.02  # timm / EVA-02 initialisation of linear layers, CLS token and position grid
EVA02_NORM_EPS = 1e-6  # the LayerNorm eps of EVA-02 (timm's Eva), our ViT presets' default


@dataclass
class ViTOutput:
    tokens: Tensor  # (B, 1 + N, C) after the final norm, index 0 = CLS
    grid: tuple[int, int, int]  # token grid (d, h, w)
    block_outputs: list[Tensor] = field(default_factory=list)  # raw outputs of the requested blocks


def tokens_to_grid(tokens_without_cls: Tensor, grid: Sequence[int]) -> Tensor:
    """(B, N, C) patch tokens -> (B, C, d, h, w) feature map."""
    batch, num_tokens, channels = tokens_without_cls.shape
    if num_tokens != math.prod(grid):
        raise ValueError(f"{num_tokens} tokens do not fill a grid of shape {tuple(grid)}")
    return tokens_without_cls.transpose(1, 2).reshape(batch, channels, *grid)


def resample_pos_grid(pos_grid: Tensor, size: Sequence[int]) -> Tensor:
    """Resample a (1, C, d, h, w) position grid to `size`, one axis at a time.

    Shrinking an axis averages (area / adaptive average pooling), growing it interpolates
    linearly (align_corners=False; separable, so equal to trilinear when all axes grow),
    an axis of the right size is left alone.
    """
    out = pos_grid
    for axis, target in enumerate(size):
        dim = 2 + axis
        source = out.shape[dim]
        if source == target:
            continue
        moved = out.movedim(dim, -1)
        lines = moved.reshape(-1, 1, source)
        if target < source:
            lines = F.adaptive_avg_pool1d(lines, target)
        else:
            lines = F.interpolate(lines, size=target, mode="linear", align_corners=False)
        out = lines.reshape(*moved.shape[:-1], target).movedim(-1, dim)
    return out


class Attention(nn.Module):
    """EVA-02 attention: q/k/v projections without bias, learnable q and v biases (no k bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope_sin: Tensor, rope_cos: Tensor) -> Tensor:
        batch, length, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.reshape(batch, length, self.num_heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        # RoPE on patch tokens only; the CLS token (index 0) has no position.
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], rope_sin, rope_cos)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], rope_sin, rope_cos)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, length, dim))


class SwiGLU(nn.Module):
    """EVA-02 MLP: SiLU(w1 x) * w2 x -> LayerNorm (sub-LN) -> w3."""

    def __init__(self, dim: int, hidden_dim: int, norm_eps: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.ffn_ln = nn.LayerNorm(hidden_dim, eps=norm_eps)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    """Pre-norm transformer block, no layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden_dim, norm_eps)

    def forward(self, x: Tensor, rope_sin: Tensor, rope_cos: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), rope_sin, rope_cos)
        return x + self.mlp(self.norm2(x))


class UniversalViT(nn.Module):
    """Plain ViT for 2D and 3D images of any anisotropy (PUMIT encoder)."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden_dim: int | None = None,
        pos_grid_shape: Sequence[int] = (5, 10, 10),
        rope_base: float = 10000.0,
        rope_base_depth: float = 2333.0,
        norm_eps: float = EVA02_NORM_EPS,
        grad_checkpointing: bool = False,
        fixed_aniso_d: int | None = None,
    ):
        """`fixed_aniso_d`: None (default) keeps the adaptive patch embedding that takes any
        ``aniso_d`` at run time (pre-training); an int stores the patch kernel at the depth that
        anisotropy uses (e.g. 4x16x16 at 2), as a segmentation network with a fixed plan needs
        (see `pumit_seg.models.sac`); the model then only accepts that ``aniso_d``."""
        super().__init__()
        if mlp_hidden_dim is None:
            mlp_hidden_dim = int(embed_dim * 8 / 3)
        if len(pos_grid_shape) != 3:
            raise ValueError(f"pos_grid_shape must be (d, h, w), got {tuple(pos_grid_shape)}")
        self.config = {
            "in_channels": in_channels,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_hidden_dim": mlp_hidden_dim,
            "pos_grid_shape": [int(s) for s in pos_grid_shape],
            "rope_base": float(rope_base),
            "rope_base_depth": float(rope_base_depth),
            "norm_eps": float(norm_eps),
            "grad_checkpointing": bool(grad_checkpointing),
            "fixed_aniso_d": fixed_aniso_d,
        }
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = nn.Module()
        self.patch_embed.proj = SACDownsample(
            in_channels,
            embed_dim,
            stride=patch_size,
            bias=True,
            fixed_aniso_d=fixed_aniso_d,
            fixed_num_downsamples=None if fixed_aniso_d is None else 0,
        )
        self.fixed_aniso_d = fixed_aniso_d
        self.num_downsamples = int(math.log2(patch_size))  # in-plane level of the token grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *pos_grid_shape))
        self.rope = RotaryEmbedding3D(embed_dim // num_heads, rope_base, rope_base_depth)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_hidden_dim, norm_eps) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm / EVA-02 initialisation: truncated normal (std 0.02) linears, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks, start=1):
                # BEiT / EVA rescaling of the residual-branch outputs by depth (timm's fix_init_weight).
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.w3.weight.div_(math.sqrt(2.0 * layer_id))

    def embed(self, x: Tensor, aniso_d: int) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, C, D, H, W) -> patch tokens (B, N, C) with the absolute position embedding, and the grid."""
        if x.dim() != 5:
            raise ValueError(f"UniversalViT expects (B, C, D, H, W); got shape {tuple(x.shape)}")
        feature_map = self.patch_embed.proj(x, aniso_d, 0)
        grid = tuple(feature_map.shape[2:])
        pos = resample_pos_grid(self.pos_embed, grid)
        tokens = (feature_map + pos).flatten(2).transpose(1, 2)
        return tokens, grid

    def forward_tokens(
        self, tokens: Tensor, grid: Sequence[int], return_blocks: Sequence[int] = ()
    ) -> ViTOutput:
        """Prepend CLS, run the blocks with 3D RoPE on the patch tokens, apply the final norm."""
        grid = tuple(int(s) for s in grid)
        if tokens.shape[1] != math.prod(grid):
            raise ValueError(f"{tokens.shape[1]} tokens do not fill a grid of shape {grid}")
        for index in return_blocks:
            if not 0 <= index < len(self.blocks):
                raise ValueError(f"return_blocks index {index} is outside 0..{len(self.blocks) - 1}")
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        rope_sin, rope_cos = self.rope(grid, tokens.device)
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        outputs: dict[int, Tensor] = {}
        for index, block in enumerate(self.blocks):
            if use_checkpoint:
                x = checkpoint(block, x, rope_sin, rope_cos, use_reentrant=False)
            else:
                x = block(x, rope_sin, rope_cos)
            if index in return_blocks:
                outputs[index] = x
        return ViTOutput(self.norm(x), grid, [outputs[i] for i in return_blocks])

    def forward(self, x: Tensor, aniso_d: int, return_blocks: Sequence[int] = ()) -> ViTOutput:
        tokens, grid = self.embed(x, aniso_d)
        return self.forward_tokens(tokens, grid, return_blocks)


def universal_vit_tiny(**overrides) -> UniversalViT:
    """Test-size model: width 64, 4 blocks, 1 head (head dim 64)."""
    return UniversalViT(**{"embed_dim": 64, "depth": 4, "num_heads": 1, **overrides})


def universal_vit_base(**overrides) -> UniversalViT:
    """PUMIT-B: width 768, 12 blocks, 12 heads."""
    return UniversalViT(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **overrides})


def universal_vit_large(**overrides) -> UniversalViT:
    """PUMIT-L: width 1024, 24 blocks, 16 heads."""
    return UniversalViT(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **overrides})


# The one registry of model sizes: every command's --model / preset name resolves here.
VIT_SIZES = {"tiny": universal_vit_tiny, "base": universal_vit_base, "large": universal_vit_large}


def build_universal_vit(size: str, **overrides) -> UniversalViT:
    """The named size (`VIT_SIZES`) with `overrides` of its constructor arguments."""
    if size not in VIT_SIZES:
        raise ValueError(f"ViT size must be one of {sorted(VIT_SIZES)}, got {size!r}")
    return VIT_SIZES[size](**overrides)


# --------------------------------------------------------------------------------------
# Pretrained-weight import
# --------------------------------------------------------------------------------------


@dataclass
class WeightReport:
    """Where every source key went. Keys are the source checkpoint's names."""

    # copied unchanged (same name once the prefix is stripped)
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # renamed / reshaped / resampled: how
    skipped: dict[str, str] = field(default_factory=dict)  # not used: why
    missing: list[str] = field(default_factory=list)  # model parameters nothing was loaded into
    encoder_prefix: str = ""  # prefix stripped from the source keys ("" when none)

    def summary(self) -> str:
        lines = [
            f"weights: {len(self.loaded)} loaded, {len(self.adapted)} adapted, "
            f"{len(self.skipped)} skipped, {len(self.missing)} model keys missing"
            + (f" (encoder prefix {self.encoder_prefix!r})" if self.encoder_prefix else "")
        ]
        lines += [f"  adapted {key}: {how}" for key, how in self.adapted.items()]
        lines += [f"  skipped {key}: {why}" for key, why in self.skipped.items()]
        lines += [f"  missing {key}" for key in self.missing]
        return "\n".join(lines)


class PretrainedWeightsError(ValueError):
    """Pre-trained weights that would silently give a wrong model (non-finite values, encoder mostly unfilled)."""


# Below this share of the encoder's parameter elements filled from the source, loading is an error
# unless allowed: a file of another width or layout would otherwise fine-tune a random encoder silently.
MIN_FILLED_FRACTION = 0.9

# How the caller's user lifts each check; a tool passes its own flag / environment variable names.
DEFAULT_LOAD_HINTS = {
    "allow_pickle": "pass allow_pickle=True",
    "allow_non_finite": "pass allow_non_finite=True",
    "allow_partial": "pass allow_partial=True",
}


# Renames from EVA-02 layouts (timm, and the official EVA repository) to ours.
_EVA_RENAMES = [
    (re.compile(r"^(blocks\.\d+\.attn)\.q_proj\.bias$"), r"\1.q_bias"),
    (re.compile(r"^(blocks\.\d+\.attn)\.v_proj\.bias$"), r"\1.v_bias"),
    (re.compile(r"^(blocks\.\d+\.mlp)\.fc1_g\.(weight|bias)$"), r"\1.w1.\2"),
    (re.compile(r"^(blocks\.\d+\.mlp)\.fc1_x\.(weight|bias)$"), r"\1.w2.\2"),
    (re.compile(r"^(blocks\.\d+\.mlp)\.norm\.(weight|bias)$"), r"\1.ffn_ln.\2"),
    (re.compile(r"^(blocks\.\d+\.mlp)\.fc2\.(weight|bias)$"), r"\1.w3.\2"),
]
_HEAD_PREFIXES = ("head.", "fc_norm.", "lm_head.", "mim_head.", "attn_pool.", "mask_token")
_FUSED_QKV = re.compile(r"^(blocks\.\d+\.attn)\.qkv\.(weight|bias)$")
_FUSED_MLP_IN = re.compile(r"^(blocks\.\d+\.mlp)\.(?:fc1|w12)\.(weight|bias)$")
_K_BIAS = re.compile(r"^blocks\.\d+\.attn\.k_(?:proj\.)?bias$")
_INNER_ATTN_NORM = re.compile(r"^blocks\.\d+\.attn\.(?:norm|inner_attn_ln)\.(weight|bias)$")
_LAYER_SCALE = re.compile(r"^blocks\.\d+\.(?:gamma_[12]|ls[12]\.gamma)$")


def _encoder_prefix(keys: Sequence[str]) -> str:
    """The prefix in front of the encoder's keys ("", "encoder.", "model.encoder.", "visual.trunk.", ...)."""
    anchor = "patch_embed.proj.weight"
    candidates = [key[: -len(anchor)] for key in keys if key.endswith(anchor)]
    if not candidates:
        anchor = "cls_token"
        candidates = [key[: -len(anchor)] for key in keys if key.endswith(anchor)]
    candidates = [c for c in candidates if c == "" or c.endswith(".")]
    return min(candidates, key=len) if candidates else ""


def _adapt_patch_kernel(weight: Tensor, target_shape: torch.Size) -> tuple[Tensor, list[str]]:
    """Resize / inflate / pool a patch-embedding kernel to (C_out, C_in, P, P, P)."""
    out_c, in_c, depth, height, width = target_shape
    if weight.shape[0] != out_c:
        raise ValueError(f"output channels {weight.shape[0]} != model's {out_c}")
    steps = []
    if weight.dim() == 4:
        weight = weight.unsqueeze(2)
        steps.append("2D kernel")
    if weight.shape[-2:] != (height, width):
        source_size = tuple(weight.shape[-2:])
        flat = weight.reshape(-1, 1, *source_size).float()
        flat = F.interpolate(flat, size=(height, width), mode="bicubic", align_corners=False)
        weight = flat.reshape(*weight.shape[:3], height, width)
        steps.append(f"in-plane {source_size[0]}x{source_size[1]} resized bicubically to {height}x{width}")
    if weight.shape[2] < depth:
        steps.append(f"depth {weight.shape[2]} inflated to {depth} (repeat, divide)")
        weight = inflate_depth(weight, depth)
    elif weight.shape[2] > depth:
        steps.append(f"depth {weight.shape[2]} sum-pooled to {depth}")
        weight = sum_pool_depth(weight, depth)
    if weight.shape[1] != in_c:
        steps.append(f"input channels {weight.shape[1]} summed, then spread over {in_c} (repeat, divide)")
        weight = weight.sum(dim=1, keepdim=True).repeat(1, in_c, 1, 1, 1) / in_c
    return weight, steps


def _split_pos_embed(pos: Tensor) -> tuple[Tensor | None, Tensor, str]:
    """Sequence position embedding (1, T, C) -> (CLS entry or None, grid (1, C, 1, g, g), description)."""
    length = pos.shape[1]
    side = math.isqrt(length)
    if side * side == length:
        return None, pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).unsqueeze(2), f"2D grid {side}x{side}"
    side = math.isqrt(length - 1)
    if side * side != length - 1:
        raise ValueError(f"{length} position entries are neither a square grid nor CLS + a square grid")
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).unsqueeze(2)
    return pos[:, 0], grid, f"CLS entry (index 0) + 2D grid {side}x{side}"


def load_pretrained_encoder(
    model: UniversalViT,
    path_or_state_dict: str | PathLike | Mapping[str, Tensor],
    allow_pickle: bool = False,
    *,
    allow_non_finite: bool = False,
    allow_partial: bool = False,
    min_filled_fraction: float = MIN_FILLED_FRACTION,
    hints: Mapping[str, str] | None = None,
    source_name: str | None = None,
) -> WeightReport:
    """Load a pretrained encoder into `model` (non-strict) and report what happened to every key.

    `path_or_state_dict` is a file or a state dict already read (e.g. by a caller that also needs other
    entries of the file); `source_name` then names where it came from in messages.

    Accepts our safetensors files (a UniversalViT, or a model holding one under a prefix
    such as ``encoder.``), the authors' ``pumit.ckpt`` (``allow_pickle=True`` needed, see
    `pumit_seg.weights.load_state_dict_file`), and EVA-02 checkpoints in timm or official
    EVA layout. Adaptations: patch kernel (in-plane bicubic resize, depth inflation or
    sum-pooling, input channels summed then spread), position grid (EVA's CLS entry moved
    into ``cls_token``, the 2D grid repeated over depth, then resampled), key renames.
    EVA-02's inner attention LayerNorm (``attn.norm`` / ``inner_attn_ln``) is *dropped and
    reported*: PUMIT blocks, and the authors' weights, have none.

    Into a fixed-``aniso_d`` model (``UniversalViT(fixed_aniso_d=...)``) the patch kernel is
    sum-pooled once here to the stored depth, and the report says so.

    Raises `PretrainedWeightsError` (nothing loaded) when a used source tensor holds NaN / inf
    (unless `allow_non_finite`) or when less than `min_filled_fraction` of the encoder's
    parameter elements would be filled (unless `allow_partial`). `hints` maps
    ``allow_pickle`` / ``allow_non_finite`` / ``allow_partial`` to how the calling tool's user
    sets them (e.g. an environment variable); the error messages name them.
    """
    hints = {**DEFAULT_LOAD_HINTS, **(hints or {})}
    if isinstance(path_or_state_dict, Mapping):
        where = source_name or "the given state dict"
        source = unwrap_state_dict(path_or_state_dict, source=where)
    else:
        where = str(path_or_state_dict)
        source = load_state_dict_file(
            path_or_state_dict, allow_pickle=allow_pickle, allow_pickle_hint=hints["allow_pickle"]
        )

    prefix = _encoder_prefix(list(source))
    report = WeightReport(encoder_prefix=prefix)
    target = model.state_dict()
    filled: dict[str, Tensor] = {}

    def place(source_key: str, parts: list[tuple[str, Tensor]], how: str | None) -> None:
        """Fill model keys from one source key (all parts or none); `how` None means unchanged."""
        for name, tensor in parts:
            if name not in target:
                if name.startswith("norm.") and isinstance(model.norm, nn.Identity):
                    report.skipped[source_key] = (
                        "final LayerNorm: the model does not use one (PUMITSegNet normalises each pyramid "
                        "block output with an InstanceNorm instead, as the reference)"
                    )
                else:
                    report.skipped[source_key] = f"no parameter {name!r} in UniversalViT"
                return
            if tuple(tensor.shape) != tuple(target[name].shape):
                report.skipped[source_key] = (
                    f"shape {tuple(tensor.shape)} does not match the model's {name} {tuple(target[name].shape)}"
                )
                return
            if name in filled:
                report.skipped[source_key] = f"{name!r} was already filled from another key"
                return
        filled.update(parts)
        if how is None:
            report.loaded.append(source_key)
        else:
            report.adapted[source_key] = f"-> {', '.join(name for name, _ in parts)}: {how}"

    # Pass 1: the position embedding (an EVA CLS entry belongs to cls_token).
    cls_position = None
    pos_key = prefix + "pos_embed"
    if pos_key in source:
        pos = source[pos_key]
        grid_shape = tuple(target["pos_embed"].shape[2:])
        try:
            if pos.dim() == 3:
                cls_position, grid, how = _split_pos_embed(pos)
                grid = grid.expand(-1, -1, grid_shape[0], -1, -1)
                how += f", repeated over depth {grid_shape[0]}"
            elif pos.dim() == 5:
                grid, how = pos, None
            else:
                raise ValueError(f"unexpected shape {tuple(pos.shape)}")
        except ValueError as error:
            report.skipped[pos_key] = f"cannot adapt the position embedding: {error}"
        else:
            if tuple(grid.shape[2:]) != grid_shape:
                resampled = (
                    f"grid {'x'.join(map(str, grid.shape[2:]))} resampled to {'x'.join(map(str, grid_shape))}"
                )
                how = resampled if how is None else f"{how}, {resampled}"
                grid = resample_pos_grid(grid.float(), grid_shape)
            place(pos_key, [("pos_embed", grid)], how)

    # Pass 2: everything else.
    for key, tensor in source.items():
        if key == pos_key:
            continue
        if not key.startswith(prefix):
            report.skipped[key] = f"outside the encoder (prefix {prefix!r})"
            continue
        name = key[len(prefix) :]
        renamed = name
        for pattern, replacement in _EVA_RENAMES:
            renamed = pattern.sub(replacement, renamed)

        if "rope" in name.split("."):
            report.skipped[key] = "RoPE table: derived from the token grid, recomputed"
        elif name.startswith("fc_norm.") and prefix + "norm.weight" not in source:
            # timm keeps EVA-02's final LayerNorm as fc_norm (applied after average pooling).
            place(
                key,
                [(name[len("fc_") :], tensor)],
                "timm's fc_norm used as the final norm (source has no norm)",
            )
        elif name.startswith(_HEAD_PREFIXES):
            report.skipped[key] = "classification / pre-training head: not part of the encoder"
        elif _K_BIAS.match(name):
            if torch.count_nonzero(tensor) == 0:
                report.skipped[key] = "all-zero k bias: equivalent to PUMIT's attention without k bias"
            else:
                report.skipped[key] = "NON-ZERO k bias dropped: PUMIT attention has none (outputs change)"
        elif _INNER_ATTN_NORM.match(name):
            report.skipped[key] = (
                "EVA-02 inner attention LayerNorm (sub-LN): PUMIT blocks have none, dropped by design"
            )
        elif _LAYER_SCALE.match(name):
            report.skipped[key] = "layer scale: PUMIT blocks have none (outputs change)"
        elif (match := _FUSED_QKV.match(name)) is not None:
            attn, kind = match.groups()
            q, k, v = tensor.chunk(3, dim=0)
            if kind == "weight":
                parts = [
                    (f"{attn}.{p}.weight", w)
                    for p, w in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True)
                ]
                place(key, parts, "split from fused qkv")
            elif torch.count_nonzero(k) != 0:
                report.skipped[key] = "fused qkv bias with a NON-ZERO k part: PUMIT attention has no k bias"
            else:
                place(
                    key,
                    [(f"{attn}.q_bias", q), (f"{attn}.v_bias", v)],
                    "split from fused qkv bias (k part zero)",
                )
        elif (match := _FUSED_MLP_IN.match(name)) is not None:
            mlp, kind = match.groups()
            gate, value = tensor.chunk(2, dim=0)  # timm GluMlp / EVA w12: the first half is the SiLU gate
            place(key, [(f"{mlp}.w1.{kind}", gate), (f"{mlp}.w2.{kind}", value)], "split fused SwiGLU input")
        elif name == "cls_token" and cls_position is not None:
            place(
                key,
                [(name, tensor + cls_position.reshape(tensor.shape))],
                "+ pos_embed[:, 0] (EVA CLS position)",
            )
        elif name == "patch_embed.proj.weight":
            try:
                weight, steps = _adapt_patch_kernel(tensor, target[name].shape)
            except ValueError as error:
                report.skipped[key] = f"cannot adapt the patch kernel: {error}"
            else:
                if getattr(model, "fixed_aniso_d", None) is not None and steps:
                    steps.append(
                        f"stored as a fixed {'x'.join(map(str, weight.shape[2:]))} kernel for aniso_d "
                        f"{model.fixed_aniso_d} (pooled once, at load)"
                    )
                place(key, [(name, weight)], "; ".join(steps) if steps else None)
        else:
            place(key, [(renamed, tensor)], None if renamed == name else "renamed")

    if cls_position is not None and "cls_token" not in filled and pos_key in report.adapted:
        report.adapted[pos_key] += "; its CLS entry was dropped (no usable cls_token in the source)"

    non_finite = [name for name, tensor in filled.items() if not torch.isfinite(tensor).all()]
    if non_finite and not allow_non_finite:
        raise PretrainedWeightsError(
            f"{where}: non-finite values (NaN / inf) in {len(non_finite)} encoder tensor(s): "
            f"{', '.join(non_finite[:5])}{' ...' if len(non_finite) > 5 else ''}. The file is damaged or "
            f"comes from a diverged run; nothing was loaded (to load it anyway: {hints['allow_non_finite']})"
        )
    parameters = dict(model.named_parameters())
    total = sum(p.numel() for p in parameters.values())
    filled_elements = sum(parameters[name].numel() for name in filled if name in parameters)
    if total and filled_elements / total < min_filled_fraction and not allow_partial:
        report.missing = [name for name in target if name not in filled]
        raise PretrainedWeightsError(
            f"{where}: only {filled_elements / total:.1%} of the encoder's parameters could be filled "
            f"(needed: {min_filled_fraction:.0%}); the file holds another architecture or layout. Nothing was "
            f"loaded (to load the part that fits anyway: {hints['allow_partial']}).\n{report.summary()}"
        )
    result = model.load_state_dict(filled, strict=False)
    if result.unexpected_keys:  # cannot happen: `place` only fills model keys
        raise RuntimeError(f"unexpected keys after conversion: {result.unexpected_keys}")
    report.missing = [name for name in target if name not in filled]
    return report
