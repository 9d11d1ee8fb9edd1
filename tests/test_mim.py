"""MIM model (docs/method.md, "Masked image modelling"): mask counts, masked-only loss, mask token,
plain-encoder equivalence, the patch embedding's gradient scale, weight files, and a tiny MIM run on
phantom crops that learns."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pumit_seg.models.mim import (
    MIMModel,
    mim_step,
    num_masked_tokens,
    random_token_mask,
    soft_cross_entropy,
    tokens_from_grid,
)
from pumit_seg.models.vit import UniversalViT, load_pretrained_encoder
from pumit_seg.phantoms.abdomen import PhantomConfig, make_phantom
from pumit_seg.weights import load_model, save_model

TINY_ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2, "pos_grid_shape": (2, 4, 4)}
ANISO_D = 2  # crops of 8 x 64 x 64 voxels -> a 2 x 4 x 4 token grid


class PatchIntensityTokenizer(nn.Module):
    """A fixed tokenizer for tests: soft assignment of each 16 x 16 (x depth) patch's mean intensity to
    K evenly spaced levels. Frozen, deterministic, sharp targets that depend on the image's content."""

    def __init__(self, codebook_size: int = 8, patch_size: int = 16, sharpness: float = 400.0):
        super().__init__()
        self.patch_size = patch_size
        self.sharpness = sharpness
        self.register_buffer("levels", torch.linspace(-1, 1, codebook_size))

    def token_distribution(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        depth_patch = max(self.patch_size >> aniso_d, 1)
        means = nn.functional.avg_pool3d(
            x.mean(1, keepdim=True), (depth_patch, self.patch_size, self.patch_size)
        )
        distance = (means - self.levels.view(1, -1, 1, 1, 1)) ** 2
        return torch.softmax(-self.sharpness * distance, dim=1)


def tiny_mim(codebook_size: int = 8, **kwargs) -> MIMModel:
    return MIMModel(encoder=TINY_ENCODER, codebook_size=codebook_size, **kwargs)


def phantom_crops(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, 8, 64, 64) phantom CT crops in [0, 1], grey replicated to 3 channels."""
    rng = np.random.default_rng(seed)
    config = PhantomConfig(shape=(8, 64, 64), shape_jitter=0.0)
    images = []
    for _ in range(count):
        image = make_phantom(rng, config)[0][0]
        image = np.clip((image + 200.0) / 500.0, 0.0, 1.0)  # a CT window, as the store scales intensities
        images.append(np.repeat(image[None], 3, axis=0))
    return torch.from_numpy(np.stack(images)).float()


@pytest.mark.parametrize("num_tokens", [1, 7, 20, 100, 500, 1000])
def test_mask_counts(num_tokens):
    expected = int(math.floor(0.55 * num_tokens + 0.5))
    assert num_masked_tokens(num_tokens, 0.55, "round") == expected
    mask = random_token_mask(6, num_tokens, expected, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (6, num_tokens)
    assert mask.sum(1).tolist() == [expected] * 6
    # the authors' rule: L - int(L * (1 - r)) in floating point
    assert num_masked_tokens(num_tokens, 0.55, "reference") == num_tokens - int(num_tokens * (1 - 0.55))


def test_reference_rule_differs_where_documented():
    assert num_masked_tokens(500, 0.55, "round") == 275
    assert num_masked_tokens(500, 0.55, "reference") == 276  # 500 * 0.45 is 224.99999999999997 in floats
    with pytest.raises(ValueError, match="mask_count_rule"):
        num_masked_tokens(10, 0.55, "ceil")
    with pytest.raises(ValueError, match="mask_ratio"):
        MIMModel(encoder=TINY_ENCODER, codebook_size=8, mask_ratio=1.5)


def test_masks_are_uniform():
    generator = torch.Generator().manual_seed(0)
    counts = sum(random_token_mask(1, 20, 11, generator=generator)[0].float() for _ in range(2000))
    frequency = counts / 2000
    assert torch.allclose(frequency, torch.full((20,), 11 / 20), atol=0.05)


def test_model_uses_its_mask_count():
    model = tiny_mim()
    mask = model.random_mask(4, 32, torch.Generator().manual_seed(1))
    assert mask.sum(1).tolist() == [18] * 4  # round(0.55 * 32) = 17.6 -> 18
    assert tiny_mim(mask_count_rule="reference").num_masked(32) == 32 - int(32 * 0.45)


def test_loss_ignores_targets_of_visible_positions():
    torch.manual_seed(0)
    model = tiny_mim()
    tokenizer = PatchIntensityTokenizer()
    image = phantom_crops(2)
    mask = model.random_mask(2, 32, torch.Generator().manual_seed(0))
    first = mim_step(model, tokenizer, image, ANISO_D, mask=mask)

    class Scrambled(PatchIntensityTokenizer):
        def token_distribution(self, x, aniso_d):
            probs = super().token_distribution(x, aniso_d)
            flat = tokens_from_grid(probs)
            random = torch.softmax(torch.randn_like(flat) * 5, dim=-1)
            flat = torch.where(mask.unsqueeze(-1), flat, random)  # change every visible target
            return flat.transpose(1, 2).reshape(probs.shape)

    second = mim_step(model, Scrambled(), image, ANISO_D, mask=mask)
    assert not torch.allclose(first.target_probs, second.target_probs)
    assert torch.equal(first.loss, second.loss)
    # and it is the soft cross entropy at the masked positions, computed independently
    log_probs = torch.log_softmax(model.mim_head(first_tokens(model, image, mask)[mask]), -1)
    expected = -(first.target_probs[mask] * log_probs).sum(-1).mean()
    torch.testing.assert_close(first.loss, expected)
    # changing a masked target does change it
    assert not torch.equal(
        soft_cross_entropy(first.masked_logits, first.target_probs[mask].roll(1, -1)), first.loss
    )


def first_tokens(model: MIMModel, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.encode(model.normalize_for_vit(image), ANISO_D, mask).tokens[:, 1:]


def test_mask_token_gets_gradient_and_replaces_masked_embeddings():
    torch.manual_seed(0)
    model = tiny_mim()
    image = phantom_crops(2)
    mask = model.random_mask(2, 32, torch.Generator().manual_seed(3))
    result = mim_step(model, PatchIntensityTokenizer(), image, ANISO_D, mask=mask)
    result.loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    # with every token masked, the image no longer matters (only positions via RoPE / CLS remain)
    full = torch.ones(2, 32, dtype=torch.bool)
    other = torch.rand_like(image)
    with torch.no_grad():
        torch.testing.assert_close(first_tokens(model, image, full), first_tokens(model, other, full))
        assert not torch.allclose(first_tokens(model, image, mask), first_tokens(model, other, mask))


def test_fully_visible_input_gives_the_plain_encoder():
    torch.manual_seed(0)
    model = tiny_mim().eval()
    x = model.normalize_for_vit(phantom_crops(2))
    with torch.no_grad():
        plain = model.encoder(x, ANISO_D).tokens
        visible = model.encode(x, ANISO_D, torch.zeros(2, 32, dtype=torch.bool)).tokens
        unmasked = model.encode(x, ANISO_D, None).tokens
    assert torch.equal(plain, visible) and torch.equal(plain, unmasked)


def test_vit_input_is_imagenet_normalised():
    model = tiny_mim()
    image = torch.rand(1, 3, 1, 16, 16)
    normalised = model.normalize_for_vit(image)
    for channel, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)):
        torch.testing.assert_close(normalised[:, channel], (image[:, channel] - mean) / std)


def test_patch_embedding_gradient_is_scaled():
    image = phantom_crops(2)
    mask = random_token_mask(2, 32, 18, generator=torch.Generator().manual_seed(0))
    grads = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = tiny_mim(patch_embed_grad_scale=scale)
        result = mim_step(model, PatchIntensityTokenizer(), image, ANISO_D, mask=mask)
        result.loss.backward()
        grads[scale] = {name: p.grad.clone() for name, p in model.named_parameters()}
        grads[scale]["loss"] = result.loss.detach()
    assert torch.equal(grads[1.0]["loss"], grads[0.1]["loss"])  # forward values unchanged
    for name in ("encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"):
        torch.testing.assert_close(grads[0.1][name], 0.1 * grads[1.0][name])
    for name in (
        "encoder.pos_embed",
        "mask_token",
        "encoder.blocks.0.attn.q_proj.weight",
        "mim_head.2.weight",
    ):
        torch.testing.assert_close(grads[0.1][name], grads[1.0][name])


def test_weight_files(tmp_path):
    torch.manual_seed(0)
    model = tiny_mim(codebook_size=16)
    keys = set(model.state_dict())
    assert {
        "mask_token",
        "mim_head.0.weight",
        "mim_head.0.bias",
        "mim_head.2.weight",
        "mim_head.2.bias",
    } <= keys
    assert model.mim_head[2].out_features == 16
    save_model(model, tmp_path / "mim.safetensors")
    rebuilt = load_model(tmp_path / "mim.safetensors")
    assert isinstance(rebuilt, MIMModel) and rebuilt.config == model.config
    for key, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], tensor), key

    # a whole MIM file is also a valid encoder source: the head and mask token are reported as skipped
    encoder = UniversalViT(**TINY_ENCODER)
    report = load_pretrained_encoder(encoder, tmp_path / "mim.safetensors")
    assert report.encoder_prefix == "encoder." and not report.missing and not report.adapted
    assert sorted(report.skipped) == sorted(k for k in keys if not k.startswith("encoder."))
    for key, tensor in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], tensor), key


def test_rejects_wrong_inputs():
    model = tiny_mim()
    with pytest.raises(ValueError, match="in_channels=1"):
        MIMModel(encoder={**TINY_ENCODER, "in_channels": 1}, codebook_size=8)
    with pytest.raises(ValueError, match="mask of shape"):
        model.encode(torch.zeros(1, 3, 8, 64, 64), ANISO_D, torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="stride must equal the patch size"):
        mim_step(model, PatchIntensityTokenizer(patch_size=8), phantom_crops(1), ANISO_D)


@pytest.mark.e2e  # a MIM training run (minutes on 2 cores)
def test_tiny_mim_learns_phantoms():
    """The loss falls well below log K (uniform prediction) and masked-token accuracy rises above the
    best constant guess (the most frequent target token)."""
    torch.manual_seed(0)
    codebook_size = 8
    model = tiny_mim(codebook_size)
    tokenizer = PatchIntensityTokenizer(codebook_size)
    train = phantom_crops(16, seed=1)
    val = phantom_crops(8, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    val_mask = model.random_mask(len(val), 32, torch.Generator().manual_seed(9))

    def evaluate():
        model.eval()
        with torch.no_grad():
            result = mim_step(model, tokenizer, val, ANISO_D, mask=val_mask)
        model.train()
        return result

    start = evaluate()
    assert start.loss.item() == pytest.approx(math.log(codebook_size), rel=0.05)
    for step in range(150):
        index = torch.randint(len(train), (8,), generator=generator)
        flips = train[index].flip(-1) if step % 2 else train[index]
        result = mim_step(model, tokenizer, flips, ANISO_D, generator=generator)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    end = evaluate()
    targets = end.target_probs[val_mask].argmax(-1)
    majority = torch.bincount(targets, minlength=codebook_size).max().item() / len(targets)
    entropy = -(end.target_probs[val_mask] * end.target_probs[val_mask].clamp_min(1e-12).log()).sum(-1).mean()
    assert end.loss.item() < 0.5 * math.log(codebook_size), (
        start.loss.item(),
        end.loss.item(),
        entropy.item(),
    )
    assert end.accuracy.item() > majority + 0.1, (end.accuracy.item(), majority)


def test_gradient_checkpointing_gives_the_same_gradients():
    image = phantom_crops(2)
    mask = random_token_mask(2, 32, 18, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MIMModel(encoder={**TINY_ENCODER, "grad_checkpointing": checkpointing}, codebook_size=8)
        mim_step(model, PatchIntensityTokenizer(), image, ANISO_D, mask=mask).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
