"""The universal visual tokenizer, its discriminator and LPIPS (docs/method.md, section 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pumit_seg.models.discriminator import PatchDiscriminator, SACStridedConv3d, hinge_discriminator_loss
from pumit_seg.models.lpips import LPIPS, VGG16_CONV_INDICES, build_perceptual_loss
from pumit_seg.models.tokenizer import (
    VisualTokenizer,
    mean_token_entropy,
    perplexity,
    prior_regularization,
    tokenizer_paper,
    tokenizer_tiny,
)
from pumit_seg.weights import load_model, save_model

# tests/conftest.py: tiny models run on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def phantom_images(seed: int, count: int, depth: int, size: int = 32) -> torch.Tensor:
    """(count, 3, depth, size, size) in [-1, 1]: a few bright ellipsoids of random intensity."""
    g = torch.Generator().manual_seed(seed)
    z = torch.linspace(-1, 1, depth).view(depth, 1, 1)
    y = torch.linspace(-1, 1, size).view(1, size, 1)
    x = torch.linspace(-1, 1, size).view(1, 1, size)
    images = []
    for _ in range(count):
        image = torch.zeros(depth, size, size)
        for _ in range(3):
            c = torch.rand(3, generator=g) * 1.2 - 0.6
            r = torch.rand(3, generator=g) * 0.4 + 0.2
            inside = ((z - c[0]) / r[0]) ** 2 * (depth > 1) + ((y - c[1]) / r[1]) ** 2 + (
                (x - c[2]) / r[2]
            ) ** 2 < 1
            image = image + torch.rand(1, generator=g) * inside.float()
        image = image / image.max().clamp(min=1e-6)
        images.append(image.expand(3, -1, -1, -1) * 2 - 1)
    return torch.stack(images)


# ---- layout and shapes ----------------------------------------------------------------


def test_paper_tokenizer_has_the_authors_parameter_layout():
    model = tokenizer_paper()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.0.weight"] == (128, 3, 4, 4, 4)
    assert shapes["encoder.1.1.weight"] == (128,)
    assert shapes["encoder.3.weight"] == (256, 128, 2, 2, 2)
    assert shapes["encoder.6.weight"] == (512, 256, 2, 2, 2)
    assert shapes["encoder.9.weight"] == (512, 512, 3, 3, 3)
    assert shapes["encoder.13.weight"] == (512,)
    assert shapes["quantize.proj.weight"] == (1024, 512)
    assert shapes["quantize.embedding.weight"] == (1024, 512)
    assert shapes["decoder.3.weight"] == (512, 512, 3, 3, 3)
    assert shapes["decoder.6.transposed_conv.weight"] == (512, 256, 2, 2, 2)
    assert shapes["decoder.6.conv.0.weight"] == (256, 256, 3, 3, 3)
    assert shapes["decoder.7.conv.1.weight"] == (128,)
    assert shapes["decoder.8.weight"] == (128, 3, 4, 4, 4)
    assert not any(k.startswith(("encoder.2", "encoder.5", "decoder.2", "decoder.5")) for k in shapes)


@pytest.mark.parametrize(
    ("aniso_d", "depth", "grid_depth"), [(5, 1, 1), (0, 16, 1), (0, 32, 2), (2, 8, 2), (3, 4, 2)]
)
def test_token_grid_and_reconstruction_shapes(aniso_d, depth, grid_depth):
    model = tokenizer_tiny()
    x = torch.rand(2, 3, depth, 32, 48) * 2 - 1
    out = model(x, aniso_d)
    assert out.reconstruction.shape == x.shape
    assert out.probs.shape == (2, 32, grid_depth, 2, 3)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(2, grid_depth, 2, 3))
    torch.testing.assert_close(model.token_distribution(x, aniso_d), out.probs)


def test_soft_token_is_the_expected_code_embedding_and_decode_probs_matches_forward():
    model = tokenizer_tiny().eval()
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    out = model(x, 5)
    expected = torch.einsum("bkdhw,kc->bcdhw", out.probs, model.quantize.embedding.weight)
    torch.testing.assert_close(out.z_q, expected)
    torch.testing.assert_close(model.decode_probs(out.probs, 5), out.reconstruction)
    z_q, probs = model.quantize_logits(model.encode(x, 5))
    torch.testing.assert_close(model.decode(z_q, 5), out.reconstruction)


def test_hard_quantizer_picks_the_nearest_code_with_straight_through_gradient():
    model = tokenizer_tiny(quantizer="hard")
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    features = model.encode_features(x, 5)
    z_q, probs, logits, loss = model.quantize(features)
    codes = model.quantize.embedding.weight
    flat = features.movedim(1, -1).reshape(-1, features.shape[1])
    nearest = torch.cdist(flat, codes).argmin(-1)
    torch.testing.assert_close(z_q.movedim(1, -1).reshape(-1, codes.shape[1]), codes[nearest])
    assert torch.equal(logits.argmax(1).flatten(), nearest)
    expected = F.mse_loss(codes[nearest], flat) * (1 + model.quantize.commitment)
    torch.testing.assert_close(loss, expected)
    (z_q.sum() + loss).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0 and codes.grad.abs().sum() > 0


def test_gumbel_quantizer_is_one_hot_in_training_and_soft_in_eval():
    model = tokenizer_tiny(quantizer="gumbel")
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    features = model.encode_features(x, 5)
    z_q, probs, _, _ = model.quantize(features)
    codes = model.quantize.embedding.weight
    distance = torch.cdist(z_q.movedim(1, -1).reshape(-1, codes.shape[1]), codes).min(-1).values
    assert distance.max() < 1e-2  # each token is one code (up to the straight-through rounding)
    model.eval()
    z_q, probs, _, _ = model.quantize(features)
    torch.testing.assert_close(z_q, model.quantize.embed(probs))


def test_save_and_load_model_rebuilds_the_tokenizer(tmp_path):
    model = tokenizer_tiny(quantizer="hard")
    save_model(model, tmp_path / "tokenizer.safetensors")
    loaded = load_model(tmp_path / "tokenizer.safetensors")
    assert isinstance(loaded, VisualTokenizer) and loaded.config == model.config
    x = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x, 2).reconstruction, model(x, 2).reconstruction)


# ---- codebook statistics and the prior term --------------------------------------------


def test_prior_term_perplexity_and_entropy_against_hand_computed_values():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]]).T.reshape(1, 4, 1, 1, 2)
    loss, p_bar = prior_regularization(probs)
    torch.testing.assert_close(p_bar, torch.tensor([0.5, 0.25, 0.25, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    torch.testing.assert_close(
        perplexity(p_bar), torch.tensor(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))
    )
    torch.testing.assert_close(mean_token_entropy(probs), torch.tensor(math.log(2.0)))
    uniform = torch.full((8,), 1 / 8)
    torch.testing.assert_close(perplexity(uniform), torch.tensor(8.0))


def test_tiny_tokenizer_overfits_phantoms_and_the_prior_keeps_codes_in_use():
    """L1 falls well below its start; the prior term gives a clearly higher perplexity on the same budget."""
    images_2d, images_3d = phantom_images(0, 4, 1), phantom_images(1, 2, 8)

    def train(prior_weight: float, steps: int = 80):
        torch.manual_seed(0)
        model = tokenizer_tiny()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        l1_start = None
        for step in range(steps):
            x, aniso_d = (images_2d, 5) if step % 2 == 0 else (images_3d, 2)
            out = model(x, aniso_d)
            l1 = F.l1_loss(out.reconstruction, x)
            prior, _ = prior_regularization(out.probs)
            loss = l1 + prior_weight * prior + 0.2 * mean_token_entropy(out.probs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            l1_start = l1.item() if l1_start is None else l1_start
        model.eval()
        with torch.no_grad():
            out_2d, out_3d = model(images_2d, 5), model(images_3d, 2)
        l1_end = (
            F.l1_loss(out_2d.reconstruction, images_2d) + F.l1_loss(out_3d.reconstruction, images_3d)
        ) / 2
        positions = torch.cat([p.movedim(1, -1).reshape(-1, 32) for p in (out_2d.probs, out_3d.probs)])
        return l1_start, l1_end.item(), perplexity(positions.mean(0)).item()

    l1_start, l1_end, perplexity_with = train(prior_weight=1.0)
    _, _, perplexity_without = train(prior_weight=0.0)
    assert l1_end < 0.4 * l1_start, (l1_start, l1_end)
    assert perplexity_with > 1.5 * perplexity_without, (perplexity_with, perplexity_without)


# ---- discriminator --------------------------------------------------------------------


def test_strided_sac_conv_sums_depth_taps_while_in_plane_downsampling_is_pending():
    conv = SACStridedConv3d(2, 4)
    x = torch.randn(1, 2, 4, 8, 8)
    # aniso_d 1 at level 0: one in-plane downsampling pending -> 1x3x3 kernel, depth untouched
    expected = F.conv3d(x, conv.weight.sum(2, keepdim=True), conv.bias, stride=(1, 2, 2), padding=(0, 1, 1))
    torch.testing.assert_close(conv(x, 1, 0), expected)
    # isotropic: a plain stride-2 3x3x3 conv
    torch.testing.assert_close(conv(x, 0, 0), F.conv3d(x, conv.weight, conv.bias, stride=2, padding=1))


def test_patch_discriminator_layout_scores_and_hinge_loss():
    disc = PatchDiscriminator(3, (16, 16, 32), num_post_convs=1)
    assert tuple(disc.state_dict()["0.weight"].shape) == (16, 3, 3, 3, 3)
    assert tuple(disc.state_dict()["12.weight"].shape) == (1, 32, 3, 3, 3)
    assert disc(torch.randn(2, 3, 1, 32, 32), 5).shape == (2, 1, 1, 4, 4)
    assert disc(torch.randn(2, 3, 16, 32, 32), 0).shape == (2, 1, 2, 4, 4)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor(0.5 * (0.25 + 0.5)))


# ---- LPIPS ------------------------------------------------------------------------------


def _random_vgg_and_heads(tmp_path):
    """Files in torchvision's vgg16 layout (.safetensors) and the LPIPS heads layout (.pth)."""
    reference = LPIPS()
    torch.manual_seed(0)
    vgg = {}
    for index in VGG16_CONV_INDICES:
        conv = reference.features[index]
        vgg[f"features.{index}.weight"] = torch.randn_like(conv.weight) * 0.05
        vgg[f"features.{index}.bias"] = torch.randn_like(conv.bias) * 0.01
    vgg["classifier.0.weight"] = torch.randn(4, 4)  # present in torchvision's file, ignored
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    save_file(vgg, tmp_path / "vgg16.safetensors")
    torch.save(heads, tmp_path / "vgg.pth")
    return vgg, heads


def test_lpips_loads_torchvision_and_lpips_layouts_and_matches_a_direct_computation(tmp_path):
    vgg, heads = _random_vgg_and_heads(tmp_path)
    lpips = build_perceptual_loss([tmp_path / "vgg16.safetensors", tmp_path / "vgg.pth"])
    assert not any(p.requires_grad for p in lpips.parameters())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).item() == 0.0

    # independent reference: plain functional VGG16 with the file's tensors
    def taps(t):
        t = (t - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor(
            [0.458, 0.448, 0.450]
        ).view(1, 3, 1, 1)
        outs = []
        for block in ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)):
            if block[0] != 0:
                t = F.max_pool2d(t, 2)
            for index in block:
                t = F.relu(
                    F.conv2d(t, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"], padding=1)
                )
            outs.append(t)
        return outs

    expected = 0
    for k, (fx, fy) in enumerate(zip(taps(x), taps(y), strict=True)):
        fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        expected = expected + ((fx - fy) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    torch.testing.assert_close(lpips(x, y), expected.mean(), rtol=1e-4, atol=1e-6)

    # the lpips package's full LPIPS state dict layout loads to the same module
    full = {
        **{
            k.replace("features.", f"net.slice{_slice_of(k)}."): v
            for k, v in vgg.items()
            if k.startswith("features")
        },
        **heads,
        "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
    }
    torch.save(full, tmp_path / "lpips_full.pth")
    other = build_perceptual_loss([tmp_path / "lpips_full.pth"])
    torch.testing.assert_close(other(x, y), lpips(x, y))


def _slice_of(key: str) -> int:
    index = int(key.split(".")[1])
    return 1 + sum(index >= start for start in (4, 9, 16, 23))


def test_lpips_without_weights_warns_loudly_and_incomplete_files_are_named(tmp_path, capsys):
    with pytest.warns(UserWarning, match="NO PERCEPTUAL LOSS"):
        assert build_perceptual_loss([]) is None
    assert "WITHOUT the LPIPS term" in capsys.readouterr().err
    _random_vgg_and_heads(tmp_path)
    with pytest.raises(ValueError, match="vgg.pth.*lack"):
        build_perceptual_loss([tmp_path / "vgg.pth"])


# ---- does a short run learn? ----------------------------------------------------------


def test_short_run_beats_the_baselines_on_held_out_phantoms_and_depends_on_the_input():
    """Reconstruction-only steps (the first stage) of the trainer's tiny widths: held-out L1 below both
    baselines (a crop's mean, the token-block average) and outputs that follow their inputs."""
    from pumit_seg.trainers.pretrain_health import TokenizerHealth, tokenizer_verdict
    from pumit_seg.trainers.tokenizer_trainer import TINY_PRESET

    train = [(phantom_images(seed, 4, 1), 5) for seed in range(8)]
    held_out = [(phantom_images(100, 4, 1), 5), (phantom_images(101, 4, 4), 2)]
    torch.manual_seed(0)
    model = tokenizer_tiny(
        **{k: TINY_PRESET[k] for k in ("down_channels", "up_channels", "num_codes", "code_dim")}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        x, aniso_d = train[step % len(train)]
        loss = F.l1_loss(model(x, aniso_d).reconstruction, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    health = TokenizerHealth(model.num_codes)
    with torch.no_grad():
        for x, aniso_d in held_out:
            out = model(x, aniso_d)
            health.add(x, out.reconstruction, out.probs)
    m = health.metrics()
    assert m["val_l1"] < 0.9 * m["val_l1_crop_mean"], m
    assert m["val_l1"] < m["val_l1_token_blocks"], m
    assert m["val_input_dependence"] > 0.3, m
    assert tokenizer_verdict(m).healthy


# ---- the two stages in one run -----------------------------------------------------------


@pytest.mark.e2e  # tokenizer runs, killed and resumed
def test_regularisers_switch_on_after_the_reconstruction_steps_and_a_run_resumes_across_the_switch(tmp_path):
    import csv
    import sys
    from pathlib import Path

    from pumit_seg.trainers.pretrain_base import CHECKPOINT_NAME, load_checkpoint

    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_worker import PhantomTokenizerTrainer, tiny_config

    flags = {"perceptual_weight": 0.0, "max_steps": 6, "reconstruction_steps": 3, "ckpt_every": 2}
    flags.update(log_every=1, val_every=100, picture_samples=0, **SMALL_WIDTHS)

    class Interrupted(PhantomTokenizerTrainer):
        def save_checkpoint(self):
            super().save_checkpoint()
            if self.step == 2:
                raise KeyboardInterrupt  # stopped after the checkpoint at step 2, before the switch at 3

    def rows(folder):
        with open(folder / "log.csv", newline="") as f:
            return list(csv.DictReader(f))

    reference = PhantomTokenizerTrainer(tiny_config(tmp_path / "reference", **flags))
    reference.fit()
    reference.close()
    want = rows(tmp_path / "reference")
    assert [float(r["stage"]) for r in want] == [1, 1, 1, 2, 2, 2]
    for row in want:  # stage 1: L1 alone (no LPIPS here, GAN gated off); stage 2: prior and entropy join
        expected = float(row["l1"])
        if row["stage"] == "2.0":
            expected += float(row["prior"]) + 0.2 * float(row["entropy"])
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)

    interrupted = Interrupted(tiny_config(tmp_path / "run", **flags))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["trainer_state"]
    assert (state["stage"], state["reconstruction_steps"]) == (1, 3)
    with pytest.raises(ValueError, match=r"--reconstruction-steps 3\b"):
        PhantomTokenizerTrainer(tiny_config(tmp_path / "run", **{**flags, "reconstruction_steps": 4})).fit()
    resumed = PhantomTokenizerTrainer(tiny_config(tmp_path / "run", **flags))
    resumed.fit()
    resumed.close()
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["trainer_state"]["stage"] == 2
    got = rows(tmp_path / "run")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for row_got, row_want in zip(got, want, strict=True):
        for column in ("loss", "l1", "prior", "entropy", "stage"):
            assert float(row_got[column]) == pytest.approx(float(row_want[column]), rel=1e-5, abs=1e-7)


def test_codebook_starts_uniform_within_one_over_k_and_is_not_weight_decayed():
    from pumit_seg.trainers.optim import weight_decay_param_groups

    for mode in ("soft", "hard", "gumbel"):
        model = tokenizer_tiny(quantizer=mode)
        codebook = model.quantize.embedding.weight
        assert codebook.abs().max() <= 1 / model.num_codes
        decay, no_decay = weight_decay_param_groups(model, 0.05)
        assert any(p is codebook for p in no_decay["params"]) and not any(
            p is codebook for p in decay["params"]
        )
        assert no_decay["weight_decay"] == 0.0


# narrower than the trainer's tiny preset: for tests of the trainer's mechanics, not of learning
SMALL_WIDTHS = {"down_channels": (8, 16, 16), "up_channels": (8, 16, 16), "num_codes": 32, "code_dim": 16}
