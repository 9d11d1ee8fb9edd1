"""Weight files (safetensors + JSON header) and pretrained-encoder import (EVA-02, ours, prefixed)."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pumit_seg.models.vit import load_pretrained_encoder, universal_vit_tiny
from pumit_seg.weights import load_model, load_state_dict_file, read_header, save_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return universal_vit_tiny(in_channels=2).eval()


def test_save_and_load_model_round_trip(tiny, tmp_path):
    path = tmp_path / "sub" / "vit.safetensors"
    save_model(tiny, path, extra={"note": "test"})
    header = read_header(path)
    assert header["class"] == "pumit_seg.models.vit.UniversalViT" and header["format_version"] == 1
    assert header["config"] == tiny.config and header["note"] == "test"
    assert [p.name for p in path.parent.iterdir()] == ["vit.safetensors"]  # no temporary left behind
    reloaded = load_model(path).eval()
    x = torch.randn(1, 2, 4, 32, 32)
    assert torch.equal(reloaded(x, 2).tokens, tiny(x, 2).tokens)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    for reader in (load_model, read_header, load_state_dict_file):
        with pytest.raises(FileNotFoundError, match="nope.safetensors"):
            reader(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for reader in (load_model, read_header, load_state_dict_file):
        with pytest.raises(ValueError, match="corrupt.safetensors"):
            reader(corrupt)
    corrupt_pth = tmp_path / "corrupt.pth"
    corrupt_pth.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_state_dict_file(corrupt_pth)


def test_load_model_only_builds_pumit_classes(tmp_path):
    path = tmp_path / "evil.safetensors"
    header = {"format_version": 1, "class": "subprocess.Popen", "config": {"args": ["true"]}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"pumit_seg": json.dumps(header)})
    with pytest.raises(ValueError, match="refusing"):
        load_model(path)


def test_torch_checkpoints_weights_only_and_wrappers(tmp_path):
    state = {"a": torch.ones(2)}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert torch.equal(load_state_dict_file(path)["a"], state["a"])

    risky = tmp_path / "risky.ckpt"  # an arbitrary pickled object, like Lightning's hyper-parameters
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=0.1)}, risky)
    with pytest.raises(ValueError, match="risky.ckpt: .*allow_pickle=True"):
        load_state_dict_file(risky)
    assert torch.equal(load_state_dict_file(risky, allow_pickle=True)["a"], state["a"])


def test_import_our_layout_with_prefix_and_extras(tiny, tmp_path):
    source = {f"encoder.{k}": v for k, v in tiny.state_dict().items()}
    source["encoder.mask_token"] = torch.zeros(1, 1, 64)
    source["decoder.conv.weight"] = torch.zeros(3)
    path = tmp_path / "seg.safetensors"
    save_file(source, str(path))
    model = universal_vit_tiny(in_channels=2).eval()
    report = load_pretrained_encoder(model, path)
    assert report.encoder_prefix == "encoder." and not report.missing and not report.adapted
    assert set(report.skipped) == {"encoder.mask_token", "decoder.conv.weight"}
    assert len(report.loaded) == len(tiny.state_dict())
    x = torch.randn(1, 2, 1, 32, 32)
    assert torch.equal(model(x, 5).tokens, tiny(x, 5).tokens)


def test_import_adapts_channels_depth_and_position_grid(tiny):
    source = dict(tiny.state_dict())  # 2 input channels, 16-deep kernel, grid 5x10x10
    source["patch_embed.proj.weight"] = sum_to_depth4 = (
        source["patch_embed.proj.weight"].reshape(64, 2, 4, 4, 16, 16).sum(3)
    )
    source["pos_embed"] = torch.randn(1, 64, 2, 4, 4)
    model = universal_vit_tiny(in_channels=1)
    report = load_pretrained_encoder(model, source)
    assert "patch_embed.proj.weight" in report.adapted and "pos_embed" in report.adapted
    weight = model.patch_embed.proj.weight.detach()
    expected = sum_to_depth4.sum(1, keepdim=True).repeat_interleave(4, dim=2) / 4
    assert torch.allclose(weight, expected, atol=1e-6)
    assert model.pos_embed.shape == (1, 64, 5, 10, 10)


def _timm_eva_state_dict(**overrides):
    timm_eva = pytest.importorskip("timm.models.eva")
    kwargs = dict(
        img_size=112, patch_size=14, embed_dim=64, depth=2, num_heads=1, qkv_fused=False,
        mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(8, 8),
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(1)
    eva = timm_eva.Eva(**kwargs)
    return {k: torch.randn_like(v) for k, v in eva.state_dict().items()}


def test_eva02_timm_layout_every_key_accounted_for():
    source = _timm_eva_state_dict(scale_attn_inner=True)  # with EVA-02's inner attention LayerNorm
    source["rope.pos_embed"] = torch.zeros(64, 128)  # a RoPE buffer as some checkpoints carry it
    model = universal_vit_tiny(depth=2)
    report = load_pretrained_encoder(model, source)
    accounted = set(report.loaded) | set(report.adapted) | set(report.skipped)
    assert accounted == set(source)
    assert len(report.loaded) + len(report.adapted) + len(report.skipped) == len(source)
    assert report.missing == []
    assert "inner attention LayerNorm" in report.skipped["blocks.0.attn.norm.weight"]
    assert "RoPE" in report.skipped["rope.pos_embed"]
    assert "head" in report.skipped["head.weight"]
    assert report.adapted["blocks.1.mlp.fc1_g.weight"].startswith("-> blocks.1.mlp.w1.weight")
    assert torch.equal(model.blocks[1].attn.q_bias, source["blocks.1.attn.q_proj.bias"])
    assert torch.equal(model.blocks[0].mlp.ffn_ln.weight, source["blocks.0.mlp.norm.weight"])
    assert torch.equal(model.norm.weight, source["fc_norm.weight"])  # timm keeps EVA's final norm as fc_norm
    # EVA's CLS position entry (index 0) goes into cls_token: exact, since our CLS has no position
    assert torch.allclose(model.cls_token, source["cls_token"] + source["pos_embed"][:, :1])
    # the 8x8 2D grid, repeated over depth and resampled to 5x10x10
    grid2d = source["pos_embed"][0, 1:].reshape(8, 8, 64).permute(2, 0, 1)
    expected = F.interpolate(grid2d[None], size=(10, 10), mode="bilinear", align_corners=False)[0]
    for z in range(5):
        assert torch.allclose(model.pos_embed[0, :, z], expected, atol=1e-5)
    # 14x14 kernel resized bicubically to 16x16, inflated over depth 16 (sum over depth gives it back)
    resized = F.interpolate(
        source["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False
    )
    assert torch.allclose(model.patch_embed.proj.weight.sum(2), resized, atol=1e-5)
    assert "NON-ZERO" not in report.summary()


def test_eva02_official_and_fused_layouts_match_timm_layout():
    source = _timm_eva_state_dict()
    reference = universal_vit_tiny(depth=2)
    load_pretrained_encoder(reference, source)
    official, fused = {}, {}
    for key, value in source.items():
        name = (
            key.replace("q_proj.bias", "q_bias").replace("v_proj.bias", "v_bias").replace("fc1_g", "w1")
            .replace("fc1_x", "w2").replace("mlp.norm", "mlp.ffn_ln").replace("mlp.fc2", "mlp.w3")
        )  # fmt: skip
        official[name] = value
    official["rope.freqs_cos"] = torch.zeros(64, 64)
    for i in range(2):
        block = {k: v for k, v in official.items() if k.startswith(f"blocks.{i}.")}
        fused.update(block)
        for part in ("q", "k", "v"):
            del fused[f"blocks.{i}.attn.{part}_proj.weight"]
        fused[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [block[f"blocks.{i}.attn.{p}_proj.weight"] for p in ("q", "k", "v")]
        )
        for w in ("weight", "bias"):
            del fused[f"blocks.{i}.mlp.w1.{w}"], fused[f"blocks.{i}.mlp.w2.{w}"]
            fused[f"blocks.{i}.mlp.w12.{w}"] = torch.cat(
                [block[f"blocks.{i}.mlp.w1.{w}"], block[f"blocks.{i}.mlp.w2.{w}"]]
            )
    fused.update({k: v for k, v in official.items() if not k.startswith("blocks.")})
    for layout in (official, fused):
        model = universal_vit_tiny(depth=2)
        report = load_pretrained_encoder(model, {"module": layout})
        assert set(report.loaded) | set(report.adapted) | set(report.skipped) == set(layout)
        assert not report.missing
        for (name, p), q in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


def test_nonzero_k_bias_is_reported():
    source = _timm_eva_state_dict()
    source["blocks.0.attn.k_proj.bias"] = torch.ones(64)
    report = load_pretrained_encoder(universal_vit_tiny(depth=2), source)
    assert "NON-ZERO" in report.skipped["blocks.0.attn.k_proj.bias"]


def test_non_finite_or_mostly_unfilled_weights_are_refused(tiny):
    from pumit_seg.models.vit import PretrainedWeightsError

    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["pos_embed"][0, 0, 0, 0, 0] = float("inf")
    target = universal_vit_tiny(in_channels=tiny.config["in_channels"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(PretrainedWeightsError, match=r"non-finite.*pos_embed.*allow_non_finite=True"):
        load_pretrained_encoder(target, state)
    with pytest.raises(PretrainedWeightsError, match=r"only .*% of the encoder.*--my-flag"):
        load_pretrained_encoder(
            target, {"cls_token": state["cls_token"]}, hints={"allow_partial": "--my-flag"}
        )
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing was loaded
    report = load_pretrained_encoder(target, {"cls_token": state["cls_token"]}, allow_partial=True)
    assert report.loaded == ["cls_token"] and torch.equal(target.cls_token, state["cls_token"])
