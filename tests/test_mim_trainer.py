"""`pumit_pretrain mim` on the phantom pre-training corpus with a tiny tokenizer: it learns, validates with
pictures, exports an encoder that `PUMITTrainer` loads for another plan and fine-tunes through
``nnUNetv2_train``, resumes exactly after a kill, and two CPU DDP ranks agree with one process.

The tokenizer is the real `VisualTokenizer` class (tiny preset) with random weights whose logit layer is
scaled up, so its targets are peaked (a random tokenizer's are nearly uniform, which no model can beat).
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pumit_seg.trainers.nnunet_ext_dir import nnunet_environment

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
LOGIT_SCALE = 20.0  # sharpens the random tokenizer's distributions
TINY_FLAGS = ["--preset", "tiny", "--val-every", "1000", "--log-every", "1"]

# end-to-end: `pumit_pretrain mim` runs and an nnU-Net training from its export; `pytest -m "not e2e"` leaves them out
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from pumit_seg.data.prepare import prepare_store
    from pumit_seg.phantoms.pretrain import write_pretrain_corpus

    root = tmp_path_factory.mktemp("mim_store")
    config = write_pretrain_corpus(str(root / "corpus"))
    prepare_store(config, str(root / "store"), progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    from pumit_seg.models.tokenizer import tokenizer_tiny
    from pumit_seg.weights import save_model

    torch.manual_seed(0)
    tokenizer = tokenizer_tiny()
    with torch.no_grad():
        tokenizer.quantize.proj.weight.mul_(LOGIT_SCALE)
    path = tmp_path_factory.mktemp("mim_tokenizer") / "tokenizer.safetensors"
    save_model(tokenizer, path)
    return path


def mim_config(store: Path, tokenizer: Path, output: Path, *flags: str):
    import argparse

    from pumit_seg.trainers.mim_trainer import MIMConfig, add_arguments
    from pumit_seg.trainers.pretrain_base import config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--store", str(store), "--tokenizer", str(tokenizer), "-o", str(output), *flags]
    )
    return config_from_args(MIMConfig, args)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mim_run(store, tokenizer_file, tmp_path_factory) -> Path:
    """The tiny preset through the real command line (in-process), 60 steps."""
    from pumit_seg.trainers.pretrain_cli import main

    output = tmp_path_factory.mktemp("mim_run") / "run"
    argv = ["mim", "--store", str(store), "--tokenizer", str(tokenizer_file), "-o", str(output),
            "--preset", "tiny", "--max-steps", "60", "--val-every", "30", "--ckpt-every", "30", "--log-every", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return output


def test_tiny_mim_learns(mim_run):
    """From log K (a uniform prediction) to well below it; masked-token accuracy far above chance (1 / K).

    A random tokenizer's codes follow the phantoms' noise as much as their anatomy, so the reachable loss
    is near the codes' marginal distribution (cross entropy ~2.6 nats of log 32 = 3.47 here); the stronger
    check of learning from context is `tests/test_mim.py::test_tiny_mim_learns_phantoms`."""
    rows = read_rows(mim_run / "log.csv")
    losses = [float(r["loss"]) for r in rows]
    codebook = 32  # tokenizer_tiny
    assert len(losses) == 60
    assert losses[0] == pytest.approx(math.log(codebook), rel=0.05)
    assert sum(losses[-10:]) / 10 < 0.82 * math.log(codebook), losses
    val = read_rows(mim_run / "val.csv")
    assert [int(r["step"]) for r in val] == [30, 60]
    assert float(val[-1]["accuracy"]) > 3 / codebook
    # health: accuracy next to the majority-code baseline, codes in targets / predictions, the verdict
    assert 0 < float(val[-1]["accuracy_majority"]) <= 1
    assert 1 <= float(val[-1]["predicted_codes_used"]) <= codebook
    health = json.loads((mim_run / "health.json").read_text())
    assert [v["step"] for v in health["validations"]] == [30, 60]
    assert health["validations"][-1]["status"] in ("healthy", "stalled", "collapsed")
    assert float(val[-1]["healthy"]) == float(health["validations"][-1]["status"] == "healthy")
    assert float(val[-1]["loss"]) < 0.85 * math.log(codebook)
    assert (mim_run / "pictures" / "step_0000060.png").stat().st_size > 1000
    assert (mim_run / "loss_curves.png").exists()


def test_export_is_the_trained_encoder(mim_run, tmp_path):
    from pumit_seg.models.vit import UniversalViT
    from pumit_seg.trainers.pretrain_base import load_checkpoint
    from pumit_seg.weights import load_model, read_header

    encoder = load_model(mim_run / "encoder.safetensors")
    assert isinstance(encoder, UniversalViT)
    header = read_header(mim_run / "encoder.safetensors")
    assert header["kind"] == "mim_encoder" and header["step"] == 60
    checkpoint = load_checkpoint(mim_run / "checkpoint_last.pt")
    trained = {k[len("encoder.") :]: v for k, v in checkpoint["model"].items() if k.startswith("encoder.")}
    assert sorted(encoder.state_dict()) == sorted(trained)
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, trained[key]), key
    # `pumit_pretrain export` turns the checkpoint into the same file
    exported = tmp_path / "again.safetensors"
    result = subprocess.run(
        [str(BIN / "pumit_pretrain"), "export", str(mim_run / "checkpoint_last.pt"), "-o", str(exported)],
        capture_output=True, encoding="utf-8", errors="replace", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    again = load_model(exported)
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_resume_after_a_kill_continues_the_same_curve(store, tokenizer_file, tmp_path):
    from pumit_seg.trainers.mim_trainer import MIMTrainer

    flags = [*TINY_FLAGS, "--max-steps", "6", "--ckpt-every", "3"]

    def train(output: Path, kill_at: int | None = None):
        class Killed(RuntimeError):
            pass

        class KilledTrainer(MIMTrainer):
            def training_step(self, batch, step):
                if step == kill_at:
                    raise Killed
                return super().training_step(batch, step)

        trainer = KilledTrainer(mim_config(store, tokenizer_file, output, *flags))
        try:
            trainer.fit()
        except Killed:
            return None
        finally:
            trainer.close()
        return trainer

    straight = train(tmp_path / "straight")
    assert train(tmp_path / "killed", kill_at=5) is None  # the last checkpoint was written at step 3
    resumed = train(tmp_path / "killed")
    assert resumed is not None and resumed.step == 6
    curve = [float(r["loss"]) for r in read_rows(tmp_path / "straight" / "log.csv")]
    resumed_curve = [float(r["loss"]) for r in read_rows(tmp_path / "killed" / "log.csv")]
    assert len(curve) == 6 and curve == pytest.approx(resumed_curve, rel=1e-6, abs=1e-7)
    for key, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], tensor, rtol=1e-5, atol=1e-6)


def test_initialisation_from_encoder_weights(store, tokenizer_file, tmp_path):
    """--eva02-weights goes through load_pretrained_encoder (EVA-02, or our encoder / MIM files); the
    report is written to the run folder."""
    from pumit_seg.models.vit import universal_vit_tiny
    from pumit_seg.trainers.mim_trainer import MIMTrainer
    from pumit_seg.weights import save_model

    torch.manual_seed(7)
    source = universal_vit_tiny(pos_grid_shape=(2, 4, 4))
    save_model(source, tmp_path / "init.safetensors")
    config = mim_config(
        store,
        tokenizer_file,
        tmp_path / "run",
        *TINY_FLAGS,
        "--eva02-weights",
        str(tmp_path / "init.safetensors"),
    )
    trainer = MIMTrainer(config)
    try:
        for key, tensor in source.state_dict().items():
            assert torch.equal(trainer.model.encoder.state_dict()[key], tensor), key
        assert "0 model keys missing" in trainer.init_report
        assert not (tmp_path / "run").exists()  # nothing written before fit()
    finally:
        trainer.close()


@pytest.mark.parametrize("same_codebook", [True, False])
def test_initialisation_from_a_mim_file_takes_its_mask_token_and_head(
    store, tokenizer_file, tmp_path, same_codebook
):
    """A MIM file (what `pumit_pretrain import --kind mim` writes) continues MIM with its mask token, head and
    LayerNorm eps; a head made for another codebook size is left at its initialisation and the report says why."""
    from pumit_seg.models.mim import MIMModel
    from pumit_seg.models.vit import universal_vit_tiny
    from pumit_seg.trainers.mim_trainer import MIMTrainer
    from pumit_seg.weights import save_model

    run = tmp_path / "run"
    probe = MIMTrainer(mim_config(store, tokenizer_file, run, *TINY_FLAGS))
    codebook_size = probe.model.codebook_size
    probe.close()
    torch.manual_seed(11)
    encoder = universal_vit_tiny(pos_grid_shape=(2, 4, 4), norm_eps=1e-5).config  # the authors' eps
    source = MIMModel(encoder=encoder, codebook_size=codebook_size if same_codebook else codebook_size + 3)
    save_model(source, tmp_path / "mim.safetensors")
    trainer = MIMTrainer(
        mim_config(
            store, tokenizer_file, run, *TINY_FLAGS, "--eva02-weights", str(tmp_path / "mim.safetensors")
        )
    )
    try:
        assert torch.equal(trainer.model.mask_token, source.mask_token)
        for key, tensor in source.encoder.state_dict().items():
            assert torch.equal(trainer.model.encoder.state_dict()[key], tensor), key
        head_equal = all(
            torch.equal(a, b)
            for a, b in zip(trainer.model.mim_head.parameters(), source.mim_head.parameters(), strict=True)
        )
        assert head_equal == same_codebook
        assert "mask_token: loaded" in trainer.init_report
        # the eps the weights were trained with comes from the file's header, not from the --model preset
        assert trainer.model.encoder.config["norm_eps"] == 1e-5
        assert "LayerNorm eps 1e-05 (from the weights file's architecture header)" in trainer.init_report
        if same_codebook:
            assert "mim_head: loaded" in trainer.init_report
        else:
            assert "mim_head: not loaded" in trainer.init_report
            assert f"expected ({codebook_size}," in trainer.init_report
    finally:
        trainer.close()


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_mim_trainer import mim_config
    from pumit_seg.trainers.mim_trainer import MIMTrainer

    output, steps = Path(sys.argv[1]), 2
    trainer = MIMTrainer(mim_config({store!r}, {tokenizer!r}, output, "--preset", "tiny", "--batch-size", "4",
                                    "--warmup-steps", "1"))
    torch.manual_seed(123)  # one global batch, the same in every process
    batch = {{"image": torch.rand(4, 3, 8, 64, 64), "aniso_d": 2}}
    rank, size = trainer.dist.rank, trainer.dist.world_size
    local = {{"image": batch["image"].chunk(size)[rank], "aniso_d": 2}}
    losses = []
    for step in range(steps):
        for _, scheduler in trainer.optimizers.values():
            scheduler.step(step)
        losses.append(trainer.training_step(local, step)["loss"])
    losses = trainer.dist.mean({{str(i): v for i, v in enumerate(losses)}}, trainer.device)
    if trainer.dist.is_main:
        torch.save({{"model": trainer.model.state_dict(), "losses": losses}}, output / "result.pt")
    trainer.close()
    """
)


def test_two_ddp_ranks_agree_with_one_process(store, tokenizer_file, tmp_path):
    script = tmp_path / "ddp_steps.py"
    script.write_text(
        DDP_SCRIPT.format(tests=str(REPO / "tests"), store=str(store), tokenizer=str(tokenizer_file))
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    single, double = tmp_path / "one", tmp_path / "two"
    single.mkdir(), double.mkdir()
    commands = [
        [sys.executable, str(script), str(single)],
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(double)],
    ]
    for command in commands:
        result = subprocess.run(
            command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = torch.load(single / "result.pt", weights_only=True)
    two = torch.load(double / "result.pt", weights_only=True)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    # Two ranks average their gradients in another summation order. Adam divides by the root of the gradient's
    # square, so for a gradient near zero a rounding difference moves the update by up to a few 1e-6 (seen: one
    # element of 10,880 off by 3e-6); wrong averaging would move most elements by about the learning rate 1e-3.
    for key, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][key], tensor, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The exported encoder in nnU-Net: a plan of another aniso_d and channel count, and nnUNetv2_train
# ---------------------------------------------------------------------------------------------------------

DATASET_ID = 964
DATASET_NAME = f"Dataset{DATASET_ID:03d}_MIMFineTune"
# a trainer variant for this test only, found by nnU-Net through a second nnUNet_extTrainer folder
SHORT_TRAINER = textwrap.dedent(
    """
    from pumit_seg.trainers import PUMITTrainer_test


    class PUMITTrainer_mimcheck(PUMITTrainer_test):
        NUM_EPOCHS = 1
        NUM_ITERATIONS_PER_EPOCH = 4
        NUM_VAL_ITERATIONS_PER_EPOCH = 1
    """
)


@pytest.fixture(scope="module")
def two_channel_plan(tmp_path_factory):
    """MR phantoms with 2 channels at 1.5 x 0.75 x 0.75 mm (aniso_d 1), planned for the tiny ViT."""
    from pumit_seg.phantoms.abdomen import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("mim_nnunet")
    env = nnunet_environment(root, cpu=True)
    config = PhantomConfig(shape=(16, 64, 64), spacing=(1.5, 0.75, 0.75), modality="MR", num_channels=2)
    write_phantom_dataset(
        env["nnUNet_raw"], DATASET_ID, "MIMFineTune", num_training=3, num_test=0, config=config
    )
    command = [str(BIN / "pumit_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
               "-npfp", "1", "--model", "tiny", "--patch_size_3d", "16", "64", "32",
               "--decoder_channels", "8", "8", "16", "16", "--full_res_channels", "4", "8", "--batch_size", "1"]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plans = json.loads((root / "nnUNet_preprocessed" / DATASET_NAME / "PUMITPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["aniso_d"] == 1
    return root, env


def test_exported_encoder_loads_into_pumit_trainer(mim_run, two_channel_plan, monkeypatch):
    from pumit_seg.trainers import PUMITTrainer
    from pumit_seg.weights import load_state_dict_file

    root, _ = two_channel_plan
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(root / f"nnUNet_{name}"))
    monkeypatch.setenv("PUMIT_PRETRAINED_WEIGHTS", str(mim_run / "encoder.safetensors"))
    folder = root / "nnUNet_preprocessed" / DATASET_NAME
    plans = json.loads((folder / "PUMITPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = PUMITTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    report = trainer.pretrained_weight_report
    saved = load_state_dict_file(mim_run / "encoder.safetensors")
    # every key of the file is accounted for; only the final norm (unused by PUMITSegNet) may be skipped
    assert sorted([*report.loaded, *report.adapted, *report.skipped]) == sorted(saved)
    assert set(report.skipped) <= {"norm.weight", "norm.bias"} and not report.missing
    assert "input channels 3 summed" in report.adapted["patch_embed.proj.weight"]
    encoder = trainer.network.encoder
    assert encoder.patch_embed.proj.weight.shape[1] == 2
    for key in report.loaded:
        assert torch.equal(encoder.state_dict()[key], saved[key]), key


def test_nnunet_train_from_the_exported_encoder(mim_run, two_channel_plan, tmp_path):
    root, env = two_channel_plan
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "mim_check_trainers.py").write_text(SHORT_TRAINER)
    env = dict(env, PUMIT_PRETRAINED_WEIGHTS=str(mim_run / "encoder.safetensors"))
    env["nnUNet_extTrainer"] = env["nnUNet_extTrainer"] + os.pathsep + str(tmp_path / "ext")
    command = [str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", "PUMITTrainer_mimcheck",
               "-p", "PUMITPlans", "-device", "cpu"]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = (
        root / "nnUNet_results" / DATASET_NAME / "PUMITTrainer_mimcheck__PUMITPlans__3d_fullres" / "fold_all"
    )
    assert (fold / "checkpoint_final.pth").is_file()
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"Pretrained encoder weights from {mim_run / 'encoder.safetensors'}" in log
    assert " 0 model keys missing" in log
