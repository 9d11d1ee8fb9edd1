"""PUMITTrainer: pretrained encoder loading (env var / plans key, report, adaptation, errors),
the scratch baseline, AdamW parameter groups and the warm-up + cosine schedule.

The trainer is built in-process on a tiny preprocessed phantom dataset (nnU-Net's own classes,
no mocks); nnU-Net reads its folder variables at call time, so monkeypatch.setenv is enough.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pumit_seg.models.sac import sum_pool_depth
from pumit_seg.phantoms.abdomen import PhantomConfig, write_phantom_dataset
from pumit_seg.trainers.nnunet_ext_dir import nnunet_environment

# end-to-end: nnU-Net planning and preprocessing in the fixture, trainer runs; `pytest -m "not e2e"` leaves them out
pytestmark = pytest.mark.e2e

DATASET_ID = 962
DATASET_NAME = f"Dataset{DATASET_ID:03d}_WeightPhantoms"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_weights")
    env = nnunet_environment(root, cpu=True)
    config = PhantomConfig(shape=(16, 64, 64), spacing=(3.0, 0.75, 0.75))
    write_phantom_dataset(
        env["nnUNet_raw"], DATASET_ID, "WeightPhantoms", num_training=4, num_test=0, config=config
    )
    command = [str(BIN / "pumit_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
               "--model", "tiny", "--patch_size_3d", "8", "64", "64", "--decoder_channels", "16", "16", "32", "32",
               "--full_res_channels", "4", "8"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


@pytest.fixture
def make_trainer(preprocessed, monkeypatch):
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(preprocessed / f"nnUNet_{name}"))
    monkeypatch.delenv("PUMIT_PRETRAINED_WEIGHTS", raising=False)
    folder = preprocessed / "nnUNet_preprocessed" / DATASET_NAME

    def make(trainer_class=None, plans_update=None):
        from pumit_seg.trainers import PUMITTrainer

        plans = json.loads((folder / "PUMITPlans.json").read_text())
        plans["configurations"]["3d_fullres"].update(plans_update or {})
        plans["continue_training"] = False
        dataset_json = json.loads((folder / "dataset.json").read_text())
        return (trainer_class or PUMITTrainer)(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))

    return make


def save_encoder(path: Path, in_channels: int = 1, seed: int = 1) -> dict:
    """Save a tiny UniversalViT like the plan's encoder; returns its state dict."""
    from pumit_seg.models.vit import universal_vit_tiny
    from pumit_seg.weights import save_model

    torch.manual_seed(seed)
    encoder = universal_vit_tiny(in_channels=in_channels)
    save_model(encoder, path)
    return encoder.state_dict()


def test_saved_encoder_loads_every_key(make_trainer, tmp_path, monkeypatch):
    saved = save_encoder(tmp_path / "encoder.safetensors")
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "encoder.safetensors"))
    trainer = make_trainer()
    trainer.initialize()
    report = trainer.pretrained_weight_report
    # adapted once, at load, to the plan: the patch kernel sum-pooled to the fixed 4x16x16 of aniso_d 2,
    # the position grid to the plan's token grid; the final LayerNorm is unused by PUMITSegNet
    adapted = {"patch_embed.proj.weight", "pos_embed"} & set(report.adapted)
    assert "patch_embed.proj.weight" in adapted
    assert "fixed 4x16x16 kernel for aniso_d 2" in report.adapted["patch_embed.proj.weight"]
    assert set(report.skipped) == {"norm.weight", "norm.bias"}
    assert sorted(report.loaded) == sorted(set(saved) - adapted - set(report.skipped))
    assert not report.missing
    loaded = trainer.network.encoder.state_dict()
    for key in report.loaded:
        assert torch.equal(loaded[key], saved[key]), key
    torch.testing.assert_close(
        loaded["patch_embed.proj.weight"], sum_pool_depth(saved["patch_embed.proj.weight"], 4)
    )
    log = Path(trainer.log_file).read_text()
    assert "Pretrained encoder weights from" in log and f"{len(report.loaded)} loaded" in log


def test_plans_key_and_env_override(make_trainer, tmp_path, monkeypatch):
    from_plans = save_encoder(tmp_path / "plans.safetensors", seed=2)
    from_env = save_encoder(tmp_path / "env.safetensors", seed=3)
    plans_update = {"pumit_pretrained_weights": str(tmp_path / "plans.safetensors")}

    trainer = make_trainer(plans_update=plans_update)
    trainer.initialize()
    assert torch.equal(trainer.network.encoder.cls_token, from_plans["cls_token"])

    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "env.safetensors"))
    trainer = make_trainer(plans_update=plans_update)
    trainer.initialize()
    assert torch.equal(trainer.network.encoder.cls_token, from_env["cls_token"])


def test_input_channels_adapted(make_trainer, tmp_path, monkeypatch):
    saved = save_encoder(tmp_path / "two_channels.safetensors", in_channels=2)
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "two_channels.safetensors"))
    trainer = make_trainer()
    trainer.initialize()
    report = trainer.pretrained_weight_report
    assert "input channels 2 summed" in report.adapted["patch_embed.proj.weight"]
    assert len(report.loaded) == len(saved) - len(report.adapted) - len(report.skipped)
    # the two input channels' kernels are summed into the plan's one channel (and depth pooled to 4)
    expected = sum_pool_depth(saved["patch_embed.proj.weight"].sum(dim=1, keepdim=True), 4)
    torch.testing.assert_close(trainer.network.encoder.patch_embed.proj.weight, expected)


def test_missing_file_is_a_clear_error(make_trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "nope.safetensors"))
    trainer = make_trainer()
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*PUMIT_PRETRAINED_WEIGHTS"):
        trainer.initialize()


def test_scratch_ignores_weights(make_trainer, tmp_path, monkeypatch):
    from pumit_seg.trainers import PUMITTrainer_scratch

    saved = save_encoder(tmp_path / "encoder.safetensors")
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "encoder.safetensors"))
    trainer = make_trainer(PUMITTrainer_scratch)
    trainer.initialize()
    assert trainer.pretrained_weight_report is None
    assert not torch.equal(trainer.network.encoder.cls_token, saved["cls_token"])
    assert "random initialisation" in Path(trainer.log_file).read_text()


def test_optimizer_groups_and_schedule(make_trainer):
    trainer = make_trainer()
    trainer.initialize()
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in trainer.network.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {
        "encoder.pos_embed",
        "encoder.cls_token",
        "encoder.blocks.0.attn.q_bias",
        "encoder.blocks.0.norm1.weight",
        "pyramid.block_norms.0.weight",
    } <= no_decay_names
    assert all(p.ndim > 1 for p in decay["params"]) and not any(n.endswith(".bias") for n in decay_names)
    assert "encoder.blocks.0.attn.q_proj.weight" in decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(trainer.network.parameters()))

    scheduler = trainer.lr_scheduler
    total = trainer.num_epochs * trainer.num_iterations_per_epoch
    warmup = round(0.1 * total)
    assert scheduler.lr_at(0) == pytest.approx(1e-4 / warmup)
    assert scheduler.lr_at(warmup - 1) == pytest.approx(1e-4)
    middle = warmup + (total - warmup) // 2
    assert scheduler.lr_at(middle) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6), rel=1e-3)
    assert scheduler.lr_at(total) == pytest.approx(1e-6)
    lrs = [scheduler.lr_at(s) for s in range(warmup, total + 1, 97)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    # the trainer sets the rate per iteration from the global step
    trainer.current_epoch = 3
    trainer.iteration = 3 * trainer.num_iterations_per_epoch
    trainer.lr_scheduler.step(trainer.iteration)
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(scheduler.lr_at(750))
    assert math.isclose(trainer.grad_clip_norm, 1.0)


def test_nan_and_partial_weights_are_errors_naming_the_environment_variables(
    make_trainer, tmp_path, monkeypatch
):
    from safetensors.torch import save_file

    saved = save_encoder(tmp_path / "encoder.safetensors")
    broken = dict(saved)
    broken["blocks.0.attn.q_proj.weight"] = broken["blocks.0.attn.q_proj.weight"].clone()
    broken["blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    save_file(broken, tmp_path / "nan.safetensors")
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "nan.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"nan.safetensors.*non-finite.*blocks.0.attn.q_proj.weight.*PUMIT_PRETRAINED_ALLOW_NON_FINITE=1",
    ):
        make_trainer().initialize()
    monkeypatch.setenv("PUMIT_PRETRAINED_ALLOW_NON_FINITE", "1")
    trainer = make_trainer()
    trainer.initialize()
    assert torch.isnan(trainer.network.encoder.blocks[0].attn.q_proj.weight).any()

    only_blocks_0 = {k: v for k, v in saved.items() if k.startswith("blocks.0.")}
    save_file(only_blocks_0, tmp_path / "partial.safetensors")
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "partial.safetensors"))
    with pytest.raises(
        ValueError, match=r"partial.safetensors: only \d+\.\d% .*PUMIT_PRETRAINED_ALLOW_PARTIAL=1"
    ):
        make_trainer().initialize()
    monkeypatch.setenv("PUMIT_PRETRAINED_ALLOW_PARTIAL", "maybe")
    with pytest.raises(ValueError, match="PUMIT_PRETRAINED_ALLOW_PARTIAL='maybe'"):
        make_trainer().initialize()
    monkeypatch.setenv("PUMIT_PRETRAINED_ALLOW_PARTIAL", "1")
    trainer = make_trainer()
    trainer.initialize()
    assert set(trainer.pretrained_weight_report.loaded) == set(only_blocks_0)


def test_restoring_a_checkpoint_needs_no_pretrained_file(make_trainer, tmp_path, monkeypatch):
    """What nnUNetv2_train --val (and --c, and prediction) do: load_checkpoint initialises the trainer; the
    checkpoint holds the encoder, so a pre-trained file that is gone must not matter."""
    save_encoder(tmp_path / "encoder.safetensors")
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(tmp_path / "encoder.safetensors"))
    trainer = make_trainer()
    trainer.initialize()
    checkpoint = tmp_path / "checkpoint_final.pth"
    trainer.save_checkpoint(str(checkpoint))
    (tmp_path / "encoder.safetensors").unlink()

    restored = make_trainer()
    restored.load_checkpoint(str(checkpoint))
    assert restored.pretrained_weight_report is None
    assert "Restoring a checkpoint" in Path(restored.log_file).read_text()
    for (name, a), b in zip(
        trainer.network.state_dict().items(), restored.network.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        make_trainer().initialize()  # a fresh training still needs it


def test_preset_oversampling_from_the_plans(make_trainer):
    assert make_trainer().oversample_foreground_percent == pytest.approx(0.33)
    trainer = make_trainer(plans_update={"pumit_oversample_foreground_percent": 0.75})
    assert trainer.oversample_foreground_percent == 0.75
    with pytest.raises(ValueError, match="pumit_oversample_foreground_percent"):
        make_trainer(plans_update={"pumit_oversample_foreground_percent": 3})
