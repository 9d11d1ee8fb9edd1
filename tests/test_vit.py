"""Universal ViT (docs/method.md, "Universal ViT"): any aniso_d in one model, token grids, blocks, position grid."""

import pytest
import torch

from pumit_seg.models.vit import (
    PYRAMID_BLOCKS,
    UniversalViT,
    resample_pos_grid,
    tokens_to_grid,
    universal_vit_base,
    universal_vit_large,
    universal_vit_tiny,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return universal_vit_tiny().eval()


def test_every_aniso_d_2d_and_3d_in_one_model(tiny):
    for aniso_d in range(6):
        depth = max(16 >> aniso_d, 1) * 2
        out = tiny(torch.randn(2, 3, depth, 32, 48), aniso_d)
        grid = (2, 2, 3) if aniso_d < 5 else (depth, 2, 3)
        assert out.grid == grid, aniso_d
        assert out.tokens.shape == (2, 1 + 12 if aniso_d < 5 else 1 + depth * 6, 64)
        assert torch.isfinite(out.tokens).all()
    out = tiny(torch.randn(2, 3, 1, 64, 32), 5)  # a 2D image
    assert out.grid == (1, 4, 2) and out.tokens.shape == (2, 9, 64)


def test_return_blocks(tiny):
    x = torch.randn(1, 3, 8, 32, 32)
    out = tiny(x, 2, return_blocks=[3, 0, 2])
    assert out.grid == (2, 2, 2) and len(out.block_outputs) == 3
    assert all(block.shape == (1, 1 + 8, 64) for block in out.block_outputs)
    # in the order asked: the last block's raw output, normed, is the final output ...
    assert torch.allclose(tiny.norm(out.block_outputs[0]), out.tokens, atol=1e-6)
    # ... and the second entry is block 0 applied to [CLS, embedded tokens]
    tokens, grid = tiny.embed(x, 2)
    sin, cos = tiny.rope(grid, x.device)
    first = tiny.blocks[0](torch.cat([tiny.cls_token, tokens], dim=1), sin, cos)
    assert torch.allclose(out.block_outputs[1], first, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        tiny(torch.randn(1, 3, 4, 32, 32), 2, return_blocks=[4])


def test_embed_then_forward_tokens_equals_forward(tiny):
    x = torch.randn(1, 3, 16, 32, 32)
    tokens, grid = tiny.embed(x, 1)
    assert grid == (2, 2, 2) and tokens.shape == (1, 8, 64)
    assert torch.allclose(tiny.forward_tokens(tokens, grid).tokens, tiny(x, 1).tokens)
    feature_map = tokens_to_grid(tokens, grid)
    assert feature_map.shape == (1, 64, 2, 2, 2)
    assert torch.equal(feature_map[0, :, 1, 0, 1], tokens[0, 1 * 4 + 0 * 2 + 1])


def test_cls_token_gets_no_position_embedding(tiny):
    # moving the position grid changes the patch tokens' inputs but never the CLS input:
    # with zero blocks the CLS output is norm(cls_token) whatever the position embedding
    model = universal_vit_tiny(depth=0).eval()
    x = torch.randn(1, 3, 1, 32, 32)
    before = model(x, 5).tokens
    with torch.no_grad():
        model.pos_embed.add_(torch.randn_like(model.pos_embed))
    after = model(x, 5).tokens
    assert torch.allclose(before[:, 0], after[:, 0]) and not torch.allclose(before[:, 1:], after[:, 1:])


def test_resample_pos_grid_per_axis():
    grid = torch.randn(1, 4, 5, 10, 10)
    assert torch.equal(resample_pos_grid(grid, (5, 10, 10)), grid)
    # shrinking an axis by 2 averages pairs; the other axes are untouched
    shrunk = resample_pos_grid(grid, (5, 5, 10))
    assert torch.allclose(shrunk, (grid[:, :, :, 0::2] + grid[:, :, :, 1::2]) / 2, atol=1e-6)
    # growing keeps a constant axis constant and interpolates linearly in between
    line = torch.arange(5.0).reshape(1, 1, 5, 1, 1)
    grown = resample_pos_grid(line, (10, 1, 1)).flatten()
    assert torch.allclose(grown, torch.clamp(torch.arange(10.0) / 2 - 0.25, 0, 4), atol=1e-6)
    mixed = resample_pos_grid(grid, (2, 20, 10))
    assert mixed.shape == (1, 4, 2, 20, 10)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = universal_vit_tiny()
    checkpointed = universal_vit_tiny(grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 2, 32, 32)
    for model in (plain, checkpointed):
        model(x, 3).tokens.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_presets_and_config():
    assert PYRAMID_BLOCKS == {"tiny": [0, 1, 2, 3], "base": [3, 5, 7, 11], "large": [7, 11, 15, 23]}
    with torch.device("meta"):
        base, large = universal_vit_base(), universal_vit_large()
    assert (base.embed_dim, len(base.blocks), base.num_heads) == (768, 12, 12)
    assert base.blocks[0].mlp.w1.out_features == 2048
    assert (large.embed_dim, len(large.blocks), large.num_heads) == (1024, 24, 16)
    model = universal_vit_tiny(in_channels=1)
    rebuilt = UniversalViT(**model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert model.num_downsamples == 4
    assert model.pos_embed.shape == (1, 64, 5, 10, 10)
    assert model.patch_embed.proj.weight.shape == (64, 1, 16, 16, 16)


def test_vit_demo_reports_kernels_and_grids(capsys):
    from pumit_seg.app.vit_tour import run_vit_tour

    run_vit_tour()
    lines = capsys.readouterr().out.splitlines()
    assert "aniso_d 5  patch kernel 1x16x16  token grid 1x8x8" in lines[1]
    assert "aniso_d 1  patch kernel 8x16x16  token grid 4x8x8" in lines[2]
    assert "aniso_d 2  patch kernel 4x16x16  token grid 4x8x8" in lines[3]
    assert "aniso_d 0  patch kernel 16x16x16  token grid 4x4x4" in lines[4]
    assert "base 94,930,944" in lines[5]
