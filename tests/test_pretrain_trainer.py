"""The pre-training trainer base through the tokenizer trainer: flags, fit, DDP, kill and resume."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pumit_seg.models.tokenizer import VisualTokenizer
from pumit_seg.trainers.export import add_arguments as export_arguments
from pumit_seg.trainers.export import run as export_main
from pumit_seg.trainers.pretrain_base import (
    CHECKPOINT_NAME,
    add_config_arguments,
    config_from_args,
    load_checkpoint,
)
from pumit_seg.trainers.tokenizer_trainer import TINY_PRESET, TokenizerConfig, TokenizerTrainer
from pumit_seg.trainers.tokenizer_trainer import run as run_tokenizer
from pumit_seg.weights import load_model

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_worker import DDP_RUN, PhantomTokenizerTrainer, generator_gradients, tiny_config  # noqa: E402

WORKER = Path(__file__).parent / "pretrain_worker.py"
REPO = Path(__file__).resolve().parents[1]
LOSS_COLUMNS = ("loss", "l1", "prior", "entropy", "disc", "disc_ema")


# tests/conftest.py: tiny models run on one thread
# end-to-end: pre-training runs (and two gloo ranks); `pytest -m "not e2e"` leaves them out
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A pre-training store of the phantom corpus (2D and 3D, aniso_d 0..5), made by `pumit_pretrain prepare`."""
    from pumit_seg.phantoms.pretrain import write_pretrain_corpus
    from pumit_seg.trainers.pretrain_cli import main as pumit_pretrain

    root = tmp_path_factory.mktemp("pretrain")
    config = write_pretrain_corpus(str(root / "corpus"))
    with pytest.raises(SystemExit) as exit_info:
        pumit_pretrain(["prepare", config, "-o", str(root / "store"), "--num-workers", "1", "--quiet"])
    assert exit_info.value.code == 0
    return root / "store"


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TokenizerConfig)
    return parser.parse_args(argv)


# ---- flags --------------------------------------------------------------------------


def test_flags_default_to_the_paper_presets_override_and_given_flags_win():
    paper = config_from_args(TokenizerConfig, _parse(["--store", "s", "-o", "o"]))
    assert (paper.lr, paper.disc_lr, paper.warmup_steps, paper.batch_size) == (1e-4, 1e-3, 25_000, 48)
    assert (paper.prior_weight, paper.entropy_weight, paper.gan_weight, paper.gan_threshold) == (
        1.0,
        0.2,
        3e-3,
        0.025,
    )
    assert (paper.num_codes, paper.code_dim, paper.down_channels, paper.max_perceptual_slices) == (
        1024,
        512,
        (128, 256, 512),
        24,
    )
    tiny = config_from_args(
        TokenizerConfig,
        _parse(
            [
                "--store",
                "s",
                "-o",
                "o",
                "--preset",
                "tiny",
                "--num-codes",
                "48",
                "--down-channels",
                "8",
                "16",
                "24",
            ]
        ),
    )
    assert (tiny.num_codes, tiny.code_dim, tiny.down_channels) == (48, TINY_PRESET["code_dim"], (8, 16, 24))
    assert 0 < tiny.reconstruction_steps < tiny.max_steps  # both stages, in one run
    assert tiny.batch_size == 4 and tiny.crop_in_plane == 32


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-steps", "0"], "--max-steps"),
        (["--quantizer", "fancy"], "--quantizer"),
        (["--crop-in-plane", "40"], "--crop-in-plane"),
        (["--num-codes", "32", "--down-channels", "12", "16", "16"], "--down-channels"),
        (["--init-from", "/nonexistent/tok.safetensors"], "/nonexistent/tok.safetensors"),
    ],
)
def test_bad_options_end_with_a_message_naming_them_and_create_nothing(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    args = _parse(["--preset", "tiny", "--store", str(tmp_path / "store"), "-o", str(out), *flags])
    assert run_tokenizer(args) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


# ---- one short run -----------------------------------------------------------------


def test_fit_on_a_prepared_store_logs_every_term_writes_health_pictures_checkpoint_and_export(
    tmp_path, store
):
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--store", str(store), "-o", str(out), "--max-steps", "6", "--log-every", "1"]
    args += ["--val-every", "3", "--ckpt-every", "3", "--perceptual-weight", "0"]
    trainer = TokenizerTrainer(config_from_args(TokenizerConfig, _parse(args)))
    export_path = trainer.fit()
    trainer.close()
    rows = _read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"l1", "perceptual", "prior", "entropy", "quant", "gen_adv", "disc", "disc_ema", "gan_on"} <= set(
        rows[0]
    )
    assert all(float(r["gan_on"]) == 0.0 for r in rows)  # EMA starts at 0.1 > 0.025: GAN term gated off
    warmup = TINY_PRESET["warmup_steps"]
    for row in rows:  # linear warm-up to the tiny preset's rates, both optimisers
        step = int(row["step"])
        assert float(row["lr_generator"]) == pytest.approx(TINY_PRESET["lr"] * step / warmup)
        assert float(row["lr_discriminator"]) == pytest.approx(TINY_PRESET["disc_lr"] * step / warmup)
    val = _read_log(out / "val.csv")
    assert [int(r["step"]) for r in val] == [3, 6]
    num_codes = trainer.model.num_codes
    for row in val:
        assert 1.0 <= float(row["val_perplexity"]) <= num_codes + 1e-3
        assert 0.0 <= float(row["val_token_entropy"]) <= torch.log(torch.tensor(num_codes)).item() + 1e-4
    pictures = out / "pictures"
    for name in (
        "reconstruction_2D_step0000006.png",
        "reconstruction_3D_step0000006.png",
        "codebook_usage_step0000006.png",
    ):
        assert (pictures / name).stat().st_size > 1000
    assert (out / "loss_curves.png").is_file()
    checkpoint = load_checkpoint(out / CHECKPOINT_NAME)  # weights_only
    assert checkpoint["step"] == 6 and checkpoint["kind"] == "tokenizer"
    assert set(checkpoint["optimizers"]) == {"generator", "discriminator"}
    assert export_path.name == "tokenizer.safetensors"
    model = load_model(export_path)
    assert isinstance(model, VisualTokenizer)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trainer.model.state_dict()[key])
    with safe_open(str(export_path), framework="pt") as f:
        assert '"kind": "tokenizer"' in f.metadata()["pumit_seg"]

    # `pumit_pretrain export` turns the training checkpoint into the same weights
    assert (
        export_main(
            _namespace(checkpoint=str(out / CHECKPOINT_NAME), output=str(tmp_path / "exported.safetensors"))
        )
        == 0
    )
    exported = load_model(tmp_path / "exported.safetensors")
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0)


def _namespace(checkpoint: str, output: str) -> argparse.Namespace:
    """`pumit_pretrain export CHECKPOINT -o OUTPUT` as parsed (every other flag at its default)."""
    parser = argparse.ArgumentParser()
    export_arguments(parser)
    return parser.parse_args([checkpoint, "-o", output])


def test_export_refuses_truncated_and_foreign_checkpoints_naming_the_file(tmp_path, capsys):
    state = {"format": 1, "kind": "tokenizer", "step": 1, "model": {}}
    torch.save(state, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    torch.save({**state, "kind": "mystery"}, tmp_path / "mystery.pt")
    for name, problem in [
        ("truncated.pt", "not a readable training checkpoint"),
        ("foreign.pt", "not a pumit_pretrain training checkpoint"),
        ("mystery.pt", "kind 'mystery' has no exporter"),
        ("missing.pt", "no such checkpoint"),
    ]:
        output = tmp_path / f"{name}.safetensors"
        assert export_main(_namespace(checkpoint=str(tmp_path / name), output=str(output))) == 2
        err = capsys.readouterr().err
        assert name in err and problem in err, err
        assert not output.exists()


def test_gan_gate_follows_the_discriminator_loss_ema():
    trainer = TokenizerTrainer.__new__(TokenizerTrainer)
    trainer.config = TokenizerConfig(store="s", output_dir="o")
    trainer.disc_loss_ema, trainer.last_disc_loss = 0.1, 0.01
    assert not trainer.gan_enabled
    trainer.disc_loss_ema = 0.02
    assert trainer.gan_enabled
    trainer.last_disc_loss = 0.03
    assert not trainer.gan_enabled


# ---- DDP -----------------------------------------------------------------------------


def test_two_gloo_ranks_compute_the_prior_term_and_gradients_of_one_process(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            "grads",
            str(tmp_path),
        ],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",  # tqdm bars are unicode; the test's locale may be ASCII
        errors="replace",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = PhantomTokenizerTrainer(tiny_config(tmp_path / "single", **DDP_RUN))
    assert single.local_batch_size == 4
    grads, values = generator_gradients(single, use_gan=True)
    with safe_open(str(tmp_path / "grads.safetensors"), framework="pt") as f:
        ddp_values = {k: float(v) for k, v in f.metadata().items()}
        for key, grad in grads.items():
            torch.testing.assert_close(f.get_tensor(key), grad, rtol=1e-4, atol=1e-6, msg=key)
    assert ddp_values["prior"] == pytest.approx(values["prior"], rel=1e-5)
    assert ddp_values["batch_perplexity"] == pytest.approx(values["batch_perplexity"], rel=1e-5)
    # the 2-rank run really split the batch: rank 0's L1 is on its half only
    assert ddp_values["l1"] != pytest.approx(values["l1"], rel=1e-6)
    # the short 2-rank run: one log, pictures from rank 0, a checkpoint with both ranks' loader states
    checkpoint = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert checkpoint["step"] == 2 and checkpoint["world_size"] == 2
    assert [state["loader"]["position"] for state in checkpoint["rank_states"]] == [2, 2]
    assert [int(r["step"]) for r in _read_log(tmp_path / "run" / "log.csv")] == [1, 2]
    assert (tmp_path / "run" / "tokenizer.safetensors").is_file()


# ---- kill and resume -------------------------------------------------------------------


def test_a_killed_run_resumes_on_the_same_loss_curve(tmp_path, store):
    """SIGKILL after the checkpoint at step 3, resume: same steps, losses, weights as an uninterrupted run."""
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    flags = [
        "--preset",
        "tiny",
        "--store",
        str(store),
        "--max-steps",
        "9",
        "--ckpt-every",
        "3",
        "--log-every",
        "1",
    ]
    flags += ["--val-every", "100", "--perceptual-weight", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pumit_seg.trainers.pretrain_cli", "tokenizer", *flags, "-o", str(killed)],
        env=_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",  # tqdm bars are unicode; the test's locale may be ASCII
        errors="replace",
    )
    try:
        for line in process.stdout:
            if line.startswith("checkpoint step 3"):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "tokenizer.safetensors").exists()
    assert load_checkpoint(killed / CHECKPOINT_NAME)["step"] == 3

    # resume, and the uninterrupted reference, in this process with the subprocess's thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_tokenizer(_parse([*flags, "-o", str(killed)])) == 0
        assert run_tokenizer(_parse([*flags, "-o", str(reference)])) == 0
    finally:
        torch.set_num_threads(threads)

    got, want = _read_log(killed / "log.csv"), _read_log(reference / "log.csv")
    assert [int(r["step"]) for r in got] == list(range(1, 10))
    for row_got, row_want in zip(got, want, strict=True):
        for column in LOSS_COLUMNS:
            assert float(row_got[column]) == pytest.approx(float(row_want[column]), rel=1e-5, abs=1e-7), (
                row_got["step"],
                column,
            )
    resumed_model, reference_model = (
        load_model(killed / "tokenizer.safetensors"),
        load_model(reference / "tokenizer.safetensors"),
    )
    for key, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, reference_model.state_dict()[key], rtol=1e-4, atol=1e-6)
