"""With the same weights, a 2D image through the universal ViT equals timm's EVA-02 (docs/method.md, "Universal ViT")."""

import pytest
import torch

timm_eva = pytest.importorskip("timm.models.eva")
timm_rope = pytest.importorskip("timm.layers.pos_embed_sincos")

from pumit_seg.models.rope import RotaryEmbedding3D, apply_rope  # noqa: E402
from pumit_seg.models.vit import UniversalViT, load_pretrained_encoder  # noqa: E402

GRID = 10
PATCH = 16
WIDTH = 64
HEADS = 2


def test_rope_at_z0_equals_timm_rotary_embedding_cat():
    head_dim = 32
    timm_embed = timm_rope.RotaryEmbeddingCat(
        head_dim, in_pixels=False, feat_shape=[6, 7], ref_feat_shape=[6, 7]
    )
    sin, cos = timm_embed.get_embed().chunk(2, dim=-1)
    ours_sin, ours_cos = RotaryEmbedding3D(head_dim)((1, 6, 7), torch.device("cpu"))
    assert torch.allclose(ours_sin, sin, atol=1e-6) and torch.allclose(ours_cos, cos, atol=1e-6)
    x = torch.randn(2, 3, 42, head_dim)
    expected = timm_rope.apply_rot_embed_cat(x, timm_embed.get_embed())
    assert torch.allclose(apply_rope(x, ours_sin, ours_cos), expected, atol=1e-6)


def test_2d_image_matches_timm_eva02_forward_features():
    torch.manual_seed(0)
    eva = timm_eva.Eva(
        img_size=GRID * PATCH, patch_size=PATCH, embed_dim=WIDTH, depth=2, num_heads=HEADS, num_classes=0,
        global_pool="token",  # keeps timm's final `norm` (with "avg" it becomes fc_norm after pooling)
        qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
        ref_feat_shape=(GRID, GRID),  # RoPE positions are then the integers 0..GRID-1
    ).eval()  # fmt: skip
    with torch.no_grad():  # make biases and norms non-trivial
        for name, param in eva.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    ours = UniversalViT(
        in_channels=3,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=2,
        num_heads=HEADS,
        pos_grid_shape=(1, GRID, GRID),
    ).eval()
    report = load_pretrained_encoder(ours, eva.state_dict())
    assert report.missing == [] and set(report.skipped) == set()

    image = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        expected = eva.forward_features(image)
        output = ours(image[:, :, None], aniso_d=5)
    assert output.grid == (1, GRID, GRID)
    assert output.tokens.shape == expected.shape == (2, 1 + GRID * GRID, WIDTH)
    relative_error = (output.tokens - expected).norm() / expected.norm()
    assert relative_error < 1e-4, relative_error
