"""Additive 3D RoPE (docs/method.md, "Universal ViT"): relativity, reversibility, equality with EVA-02's 2D RoPE at z = 0."""

import math

import torch

from pumit_seg.models.rope import RotaryEmbedding3D, apply_rope, grid_positions, rope_angles

HEAD_DIM = 64


def rotated(x, positions):
    angles = rope_angles(positions, HEAD_DIM).repeat_interleave(2, dim=-1)
    return apply_rope(x, angles.sin(), angles.cos())


def test_relativity_score_depends_only_on_relative_position():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(200, HEAD_DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(200, HEAD_DIM, generator=generator, dtype=torch.float64)
    pos_q = torch.randint(0, 40, (200, 3), generator=generator).double()
    pos_k = torch.randint(0, 40, (200, 3), generator=generator).double()
    shift = torch.tensor([7.0, -3.0, 11.0], dtype=torch.float64)
    score = (rotated(q, pos_q) * rotated(k, pos_k)).sum(-1)
    shifted = (rotated(q, pos_q + shift) * rotated(k, pos_k + shift)).sum(-1)
    assert torch.allclose(score, shifted, atol=1e-9)
    # and the rotation really depends on position (not a no-op)
    assert not torch.allclose(score, (q * k).sum(-1), atol=1e-3)


def test_reversibility_no_two_grid_positions_share_all_angles():
    # Angles are linear in the position, so positions p != p' of a 16x32x32 grid share all
    # angles modulo 2 pi exactly when the displacement p - p' does. Check every displacement.
    dz, dy, dx = torch.meshgrid(
        torch.arange(-15, 16.0), torch.arange(-31, 32.0), torch.arange(-31, 32.0), indexing="ij"
    )
    displacements = torch.stack([dz, dy, dx], dim=-1).reshape(-1, 3).double()
    displacements = displacements[displacements.abs().sum(-1) > 0]
    angles = rope_angles(displacements, HEAD_DIM).double()
    distance_to_zero_mod_2pi = torch.remainder(angles + math.pi, 2 * math.pi) - math.pi
    closest = distance_to_zero_mod_2pi.abs().amax(dim=-1).min()
    assert closest > 1e-2, f"two positions rotate (almost) alike: max angle distance {closest}"


def test_z0_equals_eva02_2d_rope():
    # EVA-02 (timm RotaryEmbeddingCat, in_pixels=False): bands 1 / 10000 ** (k / (h/4)),
    # grid (y, x) with 'ij' indexing, first h/4 angles use y, the next h/4 use x.
    height, width = 6, 7
    quarter = HEAD_DIM // 4
    bands = torch.tensor([1.0 / 10000 ** (k / quarter) for k in range(quarter)], dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    eva = torch.cat([ys.reshape(-1, 1) * bands, xs.reshape(-1, 1) * bands], dim=-1)
    ours = rope_angles(grid_positions((1, height, width)), HEAD_DIM)
    assert torch.allclose(ours.double(), eva, rtol=1e-6, atol=1e-6)
    # and depth shifts by z * 2333 ** (-(2k + 1) / (h/2)) in both halves
    omega = torch.tensor(
        [2333 ** (-(2 * k + 1) / (HEAD_DIM / 2)) for k in range(quarter)], dtype=torch.float64
    )
    at_z3 = rope_angles(torch.tensor([[3.0, 0.0, 0.0]]), HEAD_DIM).double()[0]
    assert torch.allclose(at_z3, torch.cat([3 * omega, 3 * omega]), rtol=1e-6)


def test_rotation_is_interleaved_pairs():
    x = torch.arange(1.0, 5.0)  # pairs (1, 2), (3, 4)
    angle = torch.tensor([math.pi / 2, math.pi]).repeat_interleave(2)
    assert torch.allclose(
        apply_rope(x, angle.sin(), angle.cos()), torch.tensor([-2.0, 1.0, -3.0, -4.0]), atol=1e-6
    )


def test_module_tables():
    sin, cos = RotaryEmbedding3D(HEAD_DIM)((2, 3, 4), torch.device("cpu"))
    assert sin.shape == cos.shape == (24, HEAD_DIM)
    assert torch.allclose(sin**2 + cos**2, torch.ones_like(sin), atol=1e-6)
