"""`pumit_pretrain import`: the authors' checkpoints -> our models, key by key and number by number.

Synthetic checkpoints in the authors' layouts (docs/weights_format.md: real key names and nesting, tiny
widths, a Lightning wrapper with a ``model.`` prefix, a Fabric tokenizer checkpoint, one with pickled
objects) are imported through the command; the imported models must compute what the authors'
architectures compute. Their code cannot run here, so the reference forward below is a small functional
re-statement of docs/method.md (SAC, universal ViT, tokenizer) and docs/weights_format.md written with
torch.nn.functional in float64; it does not call any of our model code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pumit_seg.trainers.pretrain_cli import build_parser

EPS = 1e-5  # the authors' LayerNorm / GroupNorm eps (PyTorch's default)
TOL = 1e-5  # float32 model against the float64 reference: |ours - reference| <= TOL + TOL |reference|
TOL_FLOAT64 = 1e-6  # our model run in float64 (its RoPE tables stay float32, as the authors')
WIDTH, DEPTH, HEADS, HEAD_DIM = 128, 4, 2, 64
CODES = 32
TOK_DOWN, TOK_UP, TOK_CODES, TOK_DIM = (8, 16, 16), (8, 16, 16), 32, 16

# --------------------------------------------------------------------------------------
# Synthetic checkpoints in the authors' layouts (docs/weights_format.md)
# --------------------------------------------------------------------------------------


def _randn(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator) * scale


def authors_vit_state_dict(seed=0, mim=False, in_channels=3, patch=16, grid=(5, 10, 10)):
    """PUMIT ViT keys: patch_embed.proj, cls_token, pos_embed (1, C, 5, 10, 10), blocks.i.*, norm."""
    g = torch.Generator().manual_seed(seed)
    hidden = int(WIDTH * 8 / 3)
    sd = {
        "patch_embed.proj.weight": _randn(g, WIDTH, in_channels, patch, patch, patch, scale=0.005),
        "patch_embed.proj.bias": _randn(g, WIDTH, scale=0.1),
        "cls_token": _randn(g, 1, 1, WIDTH),
        "pos_embed": _randn(g, 1, WIDTH, *grid),
    }

    def linear(name, fan_out, fan_in, bias=True, gain=1.0):
        sd[f"{name}.weight"] = _randn(g, fan_out, fan_in, scale=gain * fan_in**-0.5)
        if bias:
            sd[f"{name}.bias"] = _randn(g, fan_out, scale=0.1)

    def norm(name, width):
        sd[f"{name}.weight"] = 1 + _randn(g, width, scale=0.1)
        sd[f"{name}.bias"] = _randn(g, width, scale=0.1)

    for i in range(DEPTH):
        b = f"blocks.{i}"
        norm(f"{b}.norm1", WIDTH)
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(f"{b}.attn.{proj}", WIDTH, WIDTH, bias=False)
        sd[f"{b}.attn.q_bias"] = _randn(g, WIDTH, scale=0.1)
        sd[f"{b}.attn.v_bias"] = _randn(g, WIDTH, scale=0.1)
        # residual branches scaled down (as trained ViTs keep them) so float32 rounding stays ~1e-6
        linear(f"{b}.attn.proj", WIDTH, WIDTH, gain=0.3)
        norm(f"{b}.norm2", WIDTH)
        linear(f"{b}.mlp.w1", hidden, WIDTH)
        linear(f"{b}.mlp.w2", hidden, WIDTH)
        norm(f"{b}.mlp.ffn_ln", hidden)
        linear(f"{b}.mlp.w3", WIDTH, hidden, gain=0.3)
    norm("norm", WIDTH)
    if mim:
        sd["mask_token"] = _randn(g, 1, 1, WIDTH, scale=0.5)
        linear("mim_head.0", WIDTH, WIDTH)
        linear("mim_head.2", CODES, WIDTH)
    return sd


def authors_tokenizer_state_dict(seed=0, in_channels=3, start_stride=4):
    """SimpleVQTokenizer keys: encoder.{0,3,6} convs + encoder.{1,4,7}.1 LayerNorms, encoder.9/12 convs
    with GroupNorms 10/13, quantize.proj / embedding, decoder.0/3 convs + GroupNorms 1/4, decoder.6/7
    upsampling blocks (transposed_conv, conv.0, conv.1), decoder.8 transposed conv."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, c_out, c_in, k, transposed=False):
        shape = (c_in, c_out, k, k, k) if transposed else (c_out, c_in, k, k, k)
        sd[f"{name}.weight"] = _randn(g, *shape, scale=(c_in * k**3 / (8 if transposed else 1)) ** -0.5)
        sd[f"{name}.bias"] = _randn(g, c_out, scale=0.1)

    def norm(name, width):
        sd[f"{name}.weight"] = 1 + _randn(g, width, scale=0.1)
        sd[f"{name}.bias"] = _randn(g, width, scale=0.1)

    channels = [in_channels, *TOK_DOWN]
    for i in range(3):
        conv(f"encoder.{3 * i}", channels[i + 1], channels[i], start_stride if i == 0 else 2)
        norm(f"encoder.{3 * i + 1}.1", channels[i + 1])
    conv("encoder.9", TOK_DOWN[-1], TOK_DOWN[-1], 3)
    norm("encoder.10", TOK_DOWN[-1])
    conv("encoder.12", TOK_DIM, TOK_DOWN[-1], 3)
    norm("encoder.13", TOK_DIM)
    sd["quantize.proj.weight"] = _randn(g, TOK_CODES, TOK_DIM, scale=TOK_DIM**-0.5 * 3)
    sd["quantize.proj.bias"] = _randn(g, TOK_CODES, scale=0.1)
    sd["quantize.embedding.weight"] = _randn(g, TOK_CODES, TOK_DIM)
    conv("decoder.0", TOK_UP[-1], TOK_DIM, 3)
    norm("decoder.1", TOK_UP[-1])
    conv("decoder.3", TOK_UP[-1], TOK_DIM, 3)
    norm("decoder.4", TOK_UP[-1])
    for index, (c_in, c_out) in zip((6, 7), ((TOK_UP[2], TOK_UP[1]), (TOK_UP[1], TOK_UP[0])), strict=True):
        conv(f"decoder.{index}.transposed_conv", c_out, c_in, 2, transposed=True)
        conv(f"decoder.{index}.conv.0", c_out, c_out, 3)
        norm(f"decoder.{index}.conv.1", c_out)
    conv("decoder.8", in_channels, TOK_UP[0], start_stride, transposed=True)
    return sd


def lightning_checkpoint(state_dict, prefix="model."):
    """What Lightning's trainer.save_checkpoint writes (weights under 'state_dict', plus training state)."""
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": {prefix + key: value for key, value in state_dict.items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-5, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 1200}],
        "hyper_parameters": {"mask_ratio": 0.55, "mask_layer_ids": list(range(12))},
    }


# --------------------------------------------------------------------------------------
# The reference forward (docs/method.md sections 1-3), float64, torch.nn.functional only
# --------------------------------------------------------------------------------------


def ref_pool_depth(weight, depth):
    """SAC: sum contiguous groups of depth taps (dim 2) down to `depth` taps."""
    o, i, k = weight.shape[:3]
    return weight.reshape(o, i, depth, k // depth, *weight.shape[3:]).sum(3)


def ref_sac_down(x, weight, bias, stride, aniso_d, level):
    """Downsampling SAC conv, kernel = stride: depth stride max(stride >> pending, 1)."""
    pending = max(aniso_d - level, 0)
    depth_stride = max(stride >> pending, 1)
    return F.conv3d(x, ref_pool_depth(weight, depth_stride), bias, stride=(depth_stride, stride, stride))


def ref_sac_conv3(x, weight, bias, aniso_d, level):
    """3x3x3 SAC conv: a 1x3x3 conv (depth taps summed, no depth padding) while downsamplings are pending."""
    if aniso_d - level > 0:
        return F.conv3d(x, weight.sum(2, keepdim=True), bias, padding=(0, 1, 1))
    return F.conv3d(x, weight, bias, padding=1)


def ref_sac_up(x, weight, bias, stride, aniso_d, level):
    """Upsampling SAC transposed conv at `level` (before): depth stride min(2 ** max(level - aniso_d, 0), stride)."""
    depth_stride = min(2 ** max(level - aniso_d, 0), stride)
    return F.conv_transpose3d(
        x, ref_pool_depth(weight, depth_stride), bias, stride=(depth_stride, stride, stride)
    )


def ref_resample(grid, size):
    """Position grid resampling: area where shrinking, then trilinear where growing."""
    smaller = tuple(min(a, b) for a, b in zip(grid.shape[2:], size, strict=True))
    if smaller != tuple(grid.shape[2:]):
        grid = F.interpolate(grid, size=smaller, mode="area")
    if tuple(size) != tuple(grid.shape[2:]):
        grid = F.interpolate(grid, size=tuple(size), mode="trilinear", align_corners=False)
    return grid


def ref_rope_angles(grid, head_dim):
    """Additive 3D RoPE: angle_j = theta2d_j(y, x) + z * omega_z_j; j < 16 use y, j >= 16 use x."""
    quarter = head_dim // 4
    k = torch.arange(quarter, dtype=torch.float64)
    inplane = 10000.0 ** (-2 * k / (head_dim // 2))
    depth = 2333.0 ** (-(2 * k + 1) / (head_dim // 2))
    angles = []
    for z in range(grid[0]):
        for y in range(grid[1]):
            for x in range(grid[2]):
                angles.append(torch.cat([y * inplane + z * depth, x * inplane + z * depth]))
    return torch.stack(angles)  # (N, head_dim / 2)


def ref_rotate(t, angles):
    """Rotate interleaved pairs (t0, t1) -> (t0 cos - t1 sin, t1 cos + t0 sin)."""
    pairs = t.reshape(*t.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(t.shape)


def ref_block(sd, b, x, angles, heads):
    """EVA-02 block, pre-norm: q/v biases, RoPE on non-CLS tokens, softmax attention; SwiGLU + sub-LN."""
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], EPS)
    q = h @ sd[f"{b}.attn.q_proj.weight"].T + sd[f"{b}.attn.q_bias"]
    k = h @ sd[f"{b}.attn.k_proj.weight"].T
    v = h @ sd[f"{b}.attn.v_proj.weight"].T + sd[f"{b}.attn.v_bias"]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    q = torch.cat([q[:, :, :1], ref_rotate(q[:, :, 1:], angles)], dim=2)
    k = torch.cat([k[:, :, :1], ref_rotate(k[:, :, 1:], angles)], dim=2)
    attention = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    out = (attention @ v).transpose(1, 2).reshape(x.shape)
    x = x + out @ sd[f"{b}.attn.proj.weight"].T + sd[f"{b}.attn.proj.bias"]
    h = F.layer_norm(x, (width,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], EPS)
    gate = F.silu(h @ sd[f"{b}.mlp.w1.weight"].T + sd[f"{b}.mlp.w1.bias"])
    hidden = gate * (h @ sd[f"{b}.mlp.w2.weight"].T + sd[f"{b}.mlp.w2.bias"])
    hidden = F.layer_norm(
        hidden, (hidden.shape[-1],), sd[f"{b}.mlp.ffn_ln.weight"], sd[f"{b}.mlp.ffn_ln.bias"], EPS
    )
    return x + hidden @ sd[f"{b}.mlp.w3.weight"].T + sd[f"{b}.mlp.w3.bias"]


def ref_vit(sd, x, aniso_d, heads=HEADS, mask=None, final_norm=True):
    """Authors' ViT on x (B, C, D, H, W): tokens (B, 1 + N, C) after the final norm (or the last block).

    `mask` (B, N) bool: masked patch tokens are replaced by mask_token after the position embedding.
    """
    sd = {key: value.double() for key, value in sd.items()}
    x = x.double()
    patch = sd["patch_embed.proj.weight"].shape[2]
    features = ref_sac_down(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], patch, aniso_d, 0)
    grid = tuple(features.shape[2:])
    features = features + ref_resample(sd["pos_embed"], grid)
    tokens = features.flatten(2).transpose(1, 2)
    if mask is not None:
        tokens = torch.where(mask.unsqueeze(-1), sd["mask_token"].expand_as(tokens), tokens)
    tokens = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), tokens], dim=1)
    angles = ref_rope_angles(grid, tokens.shape[-1] // heads)
    for i in range(DEPTH):
        tokens = ref_block(sd, f"blocks.{i}", tokens, angles, heads)
    if not final_norm:
        return tokens
    return F.layer_norm(tokens, (tokens.shape[-1],), sd["norm.weight"], sd["norm.bias"], EPS)


def ref_mim_logits(sd, x, aniso_d, mask):
    """MIM head (Linear, GELU, Linear) on the masked positions' final tokens."""
    tokens = ref_vit(sd, x, aniso_d, mask=mask)[:, 1:]
    hidden = F.gelu(tokens[mask] @ sd["mim_head.0.weight"].double().T + sd["mim_head.0.bias"].double())
    return hidden @ sd["mim_head.2.weight"].double().T + sd["mim_head.2.bias"].double()


def _channel_ln(x, weight, bias):
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, EPS).movedim(-1, 1)


def _gn_leaky(x, weight, bias):
    return F.leaky_relu(F.group_norm(x, 8, weight, bias, EPS), 0.01)


def ref_tokenizer_encode(sd, x, aniso_d):
    """Encoder + logits projection -> logits (B, K, d, h, w)."""
    sd = {key: value.double() for key, value in sd.items()}
    x, level = x.double(), 0
    for i, stride in enumerate((4, 2, 2)):
        x = ref_sac_down(
            x, sd[f"encoder.{3 * i}.weight"], sd[f"encoder.{3 * i}.bias"], stride, aniso_d, level
        )
        level += int(math.log2(stride))
        x = F.gelu(_channel_ln(x, sd[f"encoder.{3 * i + 1}.1.weight"], sd[f"encoder.{3 * i + 1}.1.bias"]))
    for conv, gn in ((9, 10), (12, 13)):
        x = ref_sac_conv3(x, sd[f"encoder.{conv}.weight"], sd[f"encoder.{conv}.bias"], aniso_d, level)
        x = _gn_leaky(x, sd[f"encoder.{gn}.weight"], sd[f"encoder.{gn}.bias"])
    logits = x.movedim(1, -1) @ sd["quantize.proj.weight"].T + sd["quantize.proj.bias"]
    return logits.movedim(-1, 1)


def ref_quantize(sd, logits):
    """Soft token: p = softmax(logits), z_q = sum_k p_k e_k."""
    probs = logits.double().softmax(1)
    z_q = (probs.movedim(1, -1) @ sd["quantize.embedding.weight"].double()).movedim(-1, 1)
    return z_q, probs


def ref_tokenizer_decode(sd, z_q, aniso_d):
    sd = {key: value.double() for key, value in sd.items()}
    x, level = z_q.double(), 4
    for conv, gn in ((0, 1), (3, 4)):
        x = ref_sac_conv3(x, sd[f"decoder.{conv}.weight"], sd[f"decoder.{conv}.bias"], aniso_d, level)
        x = _gn_leaky(x, sd[f"decoder.{gn}.weight"], sd[f"decoder.{gn}.bias"])
    for index in (6, 7):
        b = f"decoder.{index}"
        x = ref_sac_up(
            x, sd[f"{b}.transposed_conv.weight"], sd[f"{b}.transposed_conv.bias"], 2, aniso_d, level
        )
        level -= 1
        x = ref_sac_conv3(x, sd[f"{b}.conv.0.weight"], sd[f"{b}.conv.0.bias"], aniso_d, level)
        x = _gn_leaky(x, sd[f"{b}.conv.1.weight"], sd[f"{b}.conv.1.bias"])
    return ref_sac_up(x, sd["decoder.8.weight"], sd["decoder.8.bias"], 4, aniso_d, level)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

# (input depth, aniso_d): 2D, an isotropic volume, thick slices at two anisotropies
INPUTS = [(1, 5), (32, 0), (8, 2), (4, 3)]
IN_PLANE = 32


def run_import(argv, capsys=None):
    """Run `pumit_pretrain import ARGV` in-process; (exit code, stdout, stderr)."""
    args = build_parser("import").parse_args(["import", *map(str, argv)])
    code = args.run(args)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def assert_matches(ours, reference, tol=TOL, what=""):
    assert ours.shape == reference.shape, what
    excess = (ours.double() - reference).abs() - tol * (1 + reference.abs())
    assert excess.max().item() <= 0, (
        f"{what}: max |difference| {(ours.double() - reference).abs().max().item():.2e}"
    )


def every_key_reported(report: dict, source_keys) -> None:
    accounted = [*report["used"], *report["adapted"], *report["skipped"]]
    assert sorted(accounted) == sorted(source_keys), "each source key must be reported exactly once"


def image(depth, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, channels, depth, IN_PLANE, IN_PLANE, generator=g)


@pytest.fixture(scope="module")
def imported_mim(tmp_path_factory):
    """The authors' MIM checkpoint (Lightning, prefix 'model.', RoPE buffers) imported as vit and as mim."""
    folder = tmp_path_factory.mktemp("pumit_import")
    authors = authors_vit_state_dict(seed=1, mim=True)
    checkpoint = lightning_checkpoint(authors)
    checkpoint["state_dict"]["model.rope.freqs_cos"] = torch.ones(10, HEAD_DIM)  # derived buffers: skipped
    checkpoint["state_dict"]["model.blocks.0.attn.rope.freqs_sin"] = torch.zeros(10, HEAD_DIM)
    torch.save(checkpoint, folder / "pumit.ckpt")
    for kind in ("vit", "mim"):
        code, _, err = run_import(
            [folder / "pumit.ckpt", "-o", folder / f"{kind}.safetensors", "--kind", kind]
        )
        assert code == 0, err
    code, _, err = run_import([folder / "pumit.ckpt", "-o", folder / "detected.safetensors"])
    assert code == 0, err
    return folder, authors, checkpoint


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_vit_import_matches_reference_forward(imported_mim):
    from pumit_seg.weights import load_model, read_header

    folder, authors, checkpoint = imported_mim
    path = folder / "vit.safetensors"
    header = read_header(path)
    assert header["class"] == "pumit_seg.models.vit.UniversalViT"
    assert header["config"]["norm_eps"] == EPS and header["config"]["in_channels"] == 3
    assert header["config"]["num_heads"] == HEADS and header["config"]["pos_grid_shape"] == [5, 10, 10]
    assert header["input"]["normalization"] == "imagenet" and header["input"]["mean"] == [0.485, 0.456, 0.406]
    model = load_model(path).eval()
    assert all(m.eps == EPS for m in model.modules() if isinstance(m, torch.nn.LayerNorm))

    report = json.loads((folder / "vit.import.json").read_text())
    every_key_reported(report, checkpoint["state_dict"])
    assert report["prefix"] == "model." and report["entry"] == "state_dict"
    assert set(report["used"]) == {"model." + key for key in authors if not key.startswith(("mask_", "mim_"))}
    assert (
        "MIM" in report["skipped"]["model.mask_token"] and "RoPE" in report["skipped"]["model.rope.freqs_cos"]
    )
    assert "hyper_parameters" in report["ignored_entries"]

    model_float64 = load_model(path).double().eval()
    with torch.no_grad():
        for depth, aniso_d in INPUTS:
            x = image(depth, seed=depth)
            reference = ref_vit(authors, x, aniso_d)
            assert_matches(model(x, aniso_d).tokens, reference, what=f"D={depth}, aniso_d={aniso_d}")
            ours_float64 = model_float64(x.double(), aniso_d).tokens
            assert_matches(
                ours_float64, reference, TOL_FLOAT64, what=f"float64, D={depth}, aniso_d={aniso_d}"
            )


def test_mim_import_matches_reference_head(imported_mim):
    from pumit_seg.models.mim import MIMModel
    from pumit_seg.weights import load_model

    folder, authors, checkpoint = imported_mim
    detected = json.loads((folder / "detected.import.json").read_text())
    assert detected["kind"] == "mim"  # the released pumit.ckpt is a MIM checkpoint
    model = load_model(folder / "mim.safetensors").eval()
    assert isinstance(model, MIMModel) and model.encoder.config["norm_eps"] == EPS
    assert model.config["mask_count_rule"] == "reference"  # the authors' masking count
    report = json.loads((folder / "mim.import.json").read_text())
    every_key_reported(report, checkpoint["state_dict"])
    assert report["used"]["model.blocks.3.mlp.w3.weight"] == "encoder.blocks.3.mlp.w3.weight"
    assert report["used"]["model.mim_head.2.weight"] == "mim_head.2.weight"
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for depth, aniso_d in [(1, 5), (8, 2)]:
            x = image(depth, seed=10 + depth)
            num_tokens = math.prod(model.token_grid(x.shape[2:], aniso_d))
            mask = torch.rand(x.shape[0], num_tokens, generator=g) < 0.55
            ours = model(x, aniso_d, mask).masked_logits
            assert ours.shape == (int(mask.sum()), CODES)
            assert_matches(
                ours, ref_mim_logits(authors, x, aniso_d, mask), what=f"D={depth}, aniso_d={aniso_d}"
            )


def test_tokenizer_import_matches_reference(tmp_path, capsys):
    from pumit_seg.models.tokenizer import VisualTokenizer
    from pumit_seg.weights import load_model, read_header

    authors = authors_tokenizer_state_dict(seed=2)
    # the authors' tokenizer runs save with Lightning Fabric: {"model": ..., "discriminator": ..., ...}
    checkpoint = {
        "model": dict(authors),
        "discriminator": {"0.weight": torch.zeros(4, 3, 4, 4, 4)},
        "optimizer_g": {"state": {}, "param_groups": []},
        "optimizer_d": {"state": {}, "param_groups": []},
        "step": 600_000,
    }
    torch.save(checkpoint, tmp_path / "tokenizer.ckpt")
    code, out, err = run_import([tmp_path / "tokenizer.ckpt", "-o", tmp_path / "tok.safetensors"], capsys)
    assert code == 0, err
    assert "tokenizer weights from entry 'model'" in out
    report = json.loads((tmp_path / "tok.import.json").read_text())
    assert report["kind"] == "tokenizer" and not report["skipped"] and not report["adapted"]
    every_key_reported(report, authors)
    assert "discriminator" in report["ignored_entries"]
    header = read_header(tmp_path / "tok.safetensors")
    assert header["input"]["value_range"] == [-1.0, 1.0]
    model = load_model(tmp_path / "tok.safetensors").eval()
    assert isinstance(model, VisualTokenizer)
    assert model.config["down_channels"] == list(TOK_DOWN) and model.config["num_codes"] == TOK_CODES
    # what pumit_pretrain mim does with its frozen tokenizer: load it, one token per 16x16 patch
    from pumit_seg.trainers.mim_trainer import load_tokenizer

    frozen = load_tokenizer(tmp_path / "tok.safetensors", torch.device("cpu"))
    assert frozen.token_distribution(torch.zeros(1, 3, 1, 32, 32), 5).shape == (1, TOK_CODES, 1, 2, 2)

    with torch.no_grad():
        for depth, aniso_d in INPUTS:
            x = image(depth, seed=20 + depth) * 2 - 1
            where = f"D={depth}, aniso_d={aniso_d}"
            logits = model.encode(x, aniso_d)
            assert_matches(logits, ref_tokenizer_encode(authors, x, aniso_d), what=f"encode {where}")
            z_q, probs = model.quantize_logits(logits)
            ref_z_q, ref_probs = ref_quantize(authors, logits)
            assert_matches(probs, ref_probs, what=f"probabilities {where}")
            assert_matches(z_q, ref_z_q, what=f"quantise {where}")
            reconstruction = model.decode(z_q, aniso_d)
            assert reconstruction.shape == x.shape
            assert_matches(
                reconstruction, ref_tokenizer_decode(authors, z_q, aniso_d), what=f"decode {where}"
            )


def test_pickled_checkpoint_refused_then_trusted(tmp_path, capsys):
    # a class from a package this machine lacks (the authors' luolib / pumit), pickled in the hyper-parameters
    module = types.ModuleType("authors_only_package")

    class Checkpoint:  # stands in for pumit.model.vit.Checkpoint
        def __init__(self, path):
            self.path = path

    Checkpoint.__module__, Checkpoint.__qualname__ = "authors_only_package", "Checkpoint"
    module.Checkpoint = Checkpoint
    sys.modules["authors_only_package"] = module
    try:
        checkpoint = lightning_checkpoint(authors_vit_state_dict(seed=3), prefix="")
        checkpoint["hyper_parameters"] = {
            "pretrained_ckpt": Checkpoint("eva02.pt"),
            "args": argparse.Namespace(a=1),
        }
        torch.save(checkpoint, tmp_path / "pickled.ckpt")
    finally:
        del sys.modules["authors_only_package"]
    output = tmp_path / "vit.safetensors"

    code, _, err = run_import([tmp_path / "pickled.ckpt", "-o", output], capsys)
    assert code == 1
    assert "--trust-pickle" in err and "pickled.ckpt" in err and "authors_only_package.Checkpoint" in err
    assert "runs code" in err  # the risk is spelled out
    assert not output.exists() and not list(tmp_path.glob("*.import.json"))

    code, out, err = run_import([tmp_path / "pickled.ckpt", "-o", output, "--trust-pickle"], capsys)
    assert code == 0, err
    assert "vit weights from entry 'state_dict'" in out
    from pumit_seg.weights import read_header

    assert read_header(output)["pumit_import"]["trust_pickle"] is True


@pytest.mark.parametrize(
    "tamper, named",
    [
        (lambda sd: sd.pop("model.blocks.1.mlp.ffn_ln.weight"), "model.blocks.1.mlp.ffn_ln.weight"),
        (
            lambda sd: sd.__setitem__("model.blocks.2.attn.q_bias", torch.zeros(WIDTH + 1)),
            "model.blocks.2.attn.q_bias",
        ),
        (lambda sd: sd.__setitem__("model.blocks.0.gamma_1", torch.ones(WIDTH)), "model.blocks.0.gamma_1"),
        (lambda sd: sd["model.norm.weight"].__setitem__(3, float("nan")), "model.norm.weight"),
    ],
    ids=["key-missing", "shape-changed", "unknown-key", "nan"],
)
def test_tampered_checkpoint_fails_naming_the_key(tmp_path, capsys, tamper, named):
    checkpoint = lightning_checkpoint(authors_vit_state_dict(seed=4))
    tamper(checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    output = tmp_path / "vit.safetensors"
    code, _, err = run_import([tmp_path / "tampered.ckpt", "-o", output, "--kind", "vit"], capsys)
    assert code == 1 and repr(named) in err and "tampered.ckpt" in err
    assert not output.exists()


def test_broken_files_and_options(tmp_path, capsys):
    torch.save(lightning_checkpoint(authors_vit_state_dict(seed=5)), tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    code, _, err = run_import([tmp_path / "truncated.ckpt", "-o", tmp_path / "a.safetensors"], capsys)
    assert code == 1 and "truncated.ckpt" in err and "not a readable torch checkpoint" in err
    code, _, err = run_import([tmp_path / "missing.ckpt", "-o", tmp_path / "a.safetensors"], capsys)
    assert code == 1 and "missing.ckpt: no such checkpoint file" in err
    code, _, err = run_import([tmp_path / "good.ckpt", "-o", tmp_path / "a.pt"], capsys)
    assert code == 1 and "-o/--output" in err
    code, _, err = run_import(
        [tmp_path / "good.ckpt", "-o", tmp_path / "a.safetensors", "--kind", "tokenizer"], capsys
    )
    assert code == 1 and "quantize.embedding.weight" in err
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    code, _, err = run_import([tmp_path / "good.ckpt", "-o", existing], capsys)
    assert code == 1 and "--overwrite" in err and existing.read_bytes() == b"keep me"
    with pytest.raises(SystemExit):
        run_import([tmp_path / "good.ckpt", "-o", existing, "--norm-eps", "-1"])
    assert "--norm-eps" in capsys.readouterr().err
    assert not list(tmp_path.glob("a.*")) and not list(tmp_path.glob(".tmp_*"))


@pytest.mark.parametrize("channels, aniso_d, depth", [(1, 2, 8), (2, 3, 4)])
def test_imported_vit_loads_into_a_segmentation_plan(imported_mim, channels, aniso_d, depth):
    """PUMITTrainer's path: load_pretrained_encoder into the plan's encoder (other channels and aniso_d)."""
    from pumit_seg.models.seg_net import PUMITSegNet, build_arch_kwargs
    from pumit_seg.models.vit import load_pretrained_encoder

    folder, authors, _ = imported_mim
    vit = {"embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "norm_eps": EPS}
    arch = build_arch_kwargs("tiny", 3, aniso_d=aniso_d, vit_overrides=vit, decoder_channels=[8, 8, 8, 8],
                             full_res_channels=[4, 4])  # fmt: skip
    network = PUMITSegNet(input_channels=channels, num_classes=2, deep_supervision=False, **arch)
    report = load_pretrained_encoder(network.encoder, folder / "vit.safetensors")
    assert not report.missing and "patch_embed.proj.weight" in report.adapted
    # the network may leave the final norm out (the reference normalises pyramid levels instead)
    assert set(report.skipped) <= {"norm.weight", "norm.bias"}
    grey = image(depth, seed=30, channels=1)
    with torch.no_grad():
        ours = network.encoder(grey.expand(-1, channels, -1, -1, -1), aniso_d, return_blocks=[DEPTH - 1])
    # a grey image through the channel-adapted kernel == the grey image replicated to the authors' 3 channels
    reference = ref_vit(authors, grey.expand(-1, 3, -1, -1, -1), aniso_d, final_norm=False)
    assert_matches(ours.block_outputs[0], reference, what=f"{channels}-channel plan, aniso_d {aniso_d}")


def test_adaptations_prefixes_and_kinds_are_reported():
    """VQGAN-style names, a 1x1 conv logits projection and half precision are adapted (and said so);
    a DDP 'module.' prefix is found; two models in one file need --prefix."""
    from pumit_seg.models.pumit_checkpoint import ImportOptions, import_state_dict

    authors = authors_tokenizer_state_dict(seed=6)
    variant = {"module." + key: value for key, value in authors.items()}
    variant["module.quantize.embed.weight"] = variant.pop("module.quantize.embedding.weight")
    variant["module.quantize.proj.weight"] = variant["module.quantize.proj.weight"][:, :, None, None, None]
    variant["module.decoder.8.bias"] = variant["module.decoder.8.bias"].half()
    result = import_state_dict(variant)
    report = result.report
    assert (report.kind, report.prefix) == ("tokenizer", "module.")
    assert set(report.adapted) == {
        "module.quantize.embed.weight",
        "module.quantize.proj.weight",
        "module.decoder.8.bias",
    }
    assert "renamed" in report.adapted["module.quantize.embed.weight"]
    assert "reshaped (32, 16, 1, 1, 1) -> (32, 16)" in report.adapted["module.quantize.proj.weight"]
    assert "cast float16 -> float32" in report.adapted["module.decoder.8.bias"]
    every_key_reported(report.as_dict(), variant)
    expected = import_state_dict(authors).model.state_dict()
    for name, tensor in result.model.state_dict().items():
        reference = expected[name].half().float() if name == "decoder.8.bias" else expected[name]
        assert torch.equal(tensor, reference), name

    vit = authors_vit_state_dict(seed=7)
    both = {**{"student." + k: v for k, v in vit.items()}, **{"teacher." + k: v for k, v in vit.items()}}
    with pytest.raises(ValueError, match="several models .*'student.', 'teacher.'.*--prefix"):
        import_state_dict(both, "vit")
    chosen = import_state_dict(both, None, ImportOptions(prefix="teacher.")).report
    assert chosen.kind == "vit" and len(chosen.used) == len(vit)
    assert all(why.startswith("outside the model's prefix") for why in chosen.skipped.values())
    with pytest.raises(ValueError, match="--num-heads: ViT options, not used by the tokenizer"):
        import_state_dict(authors, "tokenizer", ImportOptions(num_heads=2))
    with pytest.raises(ValueError, match="cannot tell the kind of checkpoint"):
        import_state_dict({"fc.weight": torch.zeros(2, 2)})
