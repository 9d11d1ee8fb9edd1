"""Additive 3D rotary position embedding (RoPE); see docs/method.md, "Universal ViT".

A head of dimension h is rotated on h/2 interleaved pairs (x0, x1), (x2, x3), ... For a
token at integer grid position (z, y, x) the angle of pair j is

    angle_j = theta2d_j(y, x) + z * omega_z_j

* theta2d is EVA-02's 2D RoPE: pairs j < h/4 use y, pairs j >= h/4 use x, both with the
  frequency ``base ** (-2k / (h/2))`` for k = j mod h/4;
* ``omega_z_k = base_depth ** (-(2k + 1) / (h/2))``, the same for both halves.

At z = 0 (every 2D image) this is exactly EVA-02's RoPE, so EVA-02 weights give the same
2D output. The odd exponents keep the depth frequencies apart from the in-plane ones, so
distinct positions never share all angles (reversibility), and since the angle is linear
in the position the attention score depends only on relative positions (relativity).

The rotation is the one of timm's ``apply_rot_embed_cat`` (interleaved layout):
(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "rope_frequencies",
    "grid_positions",
    "rope_angles",
    "rotate_pairs",
    "apply_rope",
    "RotaryEmbedding3D",
]


def rope_frequencies(
    head_dim: int, base: float = 10000.0, base_depth: float = 2333.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """In-plane and depth frequencies, each of length head_dim / 4."""
    if head_dim % 4 != 0:
        raise ValueError(f"3D RoPE needs a head dimension divisible by 4, got {head_dim}")
    num_angles = head_dim // 2
    k = torch.arange(head_dim // 4, dtype=dtype)
    # 1 / base**e (not base**-e) rounds exactly like timm's EVA-02 frequency bands.
    inplane = 1.0 / (base ** (2 * k / num_angles))
    depth = 1.0 / (base_depth ** ((2 * k + 1) / num_angles))
    return inplane, depth


def grid_positions(grid: tuple[int, int, int], device: torch.device | None = None) -> Tensor:
    """Integer (z, y, x) positions of a token grid in row-major ('ij') order, shape (d*h*w, 3)."""
    axes = [torch.arange(size, device=device, dtype=torch.float32) for size in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_angles(
    positions: Tensor, head_dim: int, base: float = 10000.0, base_depth: float = 2333.0
) -> Tensor:
    """Rotation angles (N, head_dim / 2) for positions (N, 3) given as (z, y, x).

    Computed in float32 (like timm), or in float64 when the positions are float64.
    """
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    inplane, depth = (f.to(positions.device) for f in rope_frequencies(head_dim, base, base_depth, dtype))
    z, y, x = positions.to(dtype).unbind(-1)
    theta_y = y[:, None] * inplane
    theta_x = x[:, None] * inplane
    shift_z = z[:, None] * depth
    return torch.cat([theta_y + shift_z, theta_x + shift_z], dim=-1)


def rotate_pairs(x: Tensor) -> Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] (timm's `rot`)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate interleaved pairs of the last dim of x by per-token angles.

    sin / cos: (N, head_dim) with each angle repeated for its pair, broadcast over the
    leading dims of x (..., N, head_dim). Computed in the dtype of sin / cos (float32)
    and cast back to x's dtype, as timm does.
    """
    return (x * cos + rotate_pairs(x) * sin).to(x.dtype)


class RotaryEmbedding3D(nn.Module):
    """Produces (sin, cos) of shape (N, head_dim) for a token grid; no parameters, no buffers.

    The tables are computed once per forward of the ViT (cheap next to attention), so
    nothing is cached across calls and nothing depends on a previously seen grid.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, base_depth: float = 2333.0):
        super().__init__()
        rope_frequencies(head_dim, base, base_depth)  # validates head_dim
        self.head_dim = head_dim
        self.base = base
        self.base_depth = base_depth

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        angles = rope_angles(grid_positions(grid, device), self.head_dim, self.base, self.base_depth)
        angles = angles.repeat_interleave(2, dim=-1)
        return angles.sin(), angles.cos()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, base_depth={self.base_depth}"
