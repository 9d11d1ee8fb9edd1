"""Exit 0 means the result can be trusted: NaN / inf never applied nor saved, resumed runs know their options.

Pre-training runs use the in-memory phantom loader of ``tests/pretrain_worker.py`` (no store, tiny preset,
one thread); the nnU-Net trainer and the classifier use the small fixtures of their own test modules.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pumit_seg.trainers.export import export_checkpoint
from pumit_seg.trainers.optim import WarmupCosineLRScheduler
from pumit_seg.trainers.pretrain_base import (
    CHECKPOINT_NAME,
    STOPPED_EXIT_CODE,
    TrainingDiverged,
    add_config_arguments,
    default_num_workers,
    load_checkpoint,
    run_pretraining,
)
from pumit_seg.trainers.tokenizer_trainer import TINY_PRESET, TokenizerConfig
from pumit_seg.weights import non_finite_tensors, save_model

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_worker import PhantomTokenizerTrainer, tiny_config  # noqa: E402

# end-to-end: pre-training, classification and nnU-Net runs made to diverge; `pytest -m "not e2e"` leaves them out
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]

RUN = {"perceptual_weight": 0.0, "log_every": 1, "val_every": 100, "ckpt_every": 2, "max_steps": 4}


class DivergingTrainer(PhantomTokenizerTrainer):
    """The prior term becomes NaN from step index `diverge_at` on (the 1-based step diverge_at + 1)."""

    diverge_at = 4

    def generator_loss(self, *args, **kwargs):
        loss, reconstruction, terms = super().generator_loss(*args, **kwargs)
        if self.step >= self.diverge_at:
            terms = {**terms, "prior": terms["prior"] * math.nan}
            loss = loss + terms["prior"]
        return loss, reconstruction, terms


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- options parsed as numbers refuse NaN / inf ----------------------------------------------------


@pytest.mark.parametrize("flag", ["--prior-weight", "--entropy-weight", "--gan-weight", "--lr", "--min-lr"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_flags_refuse_nan_and_inf_when_parsed(flag, value, capsys):
    parser = argparse.ArgumentParser(prog="pumit_pretrain tokenizer")
    add_config_arguments(parser, TokenizerConfig)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--store", "s", "-o", "o", f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a finite number, got '{value}'" in capsys.readouterr().err


def test_configs_built_without_argparse_refuse_nan_too(tmp_path):
    with pytest.raises(ValueError, match="--entropy-weight must be a finite number"):
        tiny_config(tmp_path / "run", entropy_weight=math.inf).check()


# ---- a diverging run ---------------------------------------------------------------------------------


def test_a_diverging_run_skips_the_bad_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    trainer = DivergingTrainer(tiny_config(out, **{**RUN, "max_steps": 20, "max_bad_steps": 3}))
    with pytest.raises(TrainingDiverged) as error:
        trainer.fit()
    trainer.close()
    message = str(error.value)
    # what diverged and when: steps 5 to 7 (1-based), the prior term, the generator's loss and gradient
    assert "3 steps in a row (5 to 7)" in message and "prior=nan" in message, message
    assert "generator loss nan, gradient norm nan" in message and "step 4) is kept" in message, message
    assert "step 5 skipped" in capsys.readouterr().err
    # the checkpoint of step 4 is kept (step 6 fell in the bad streak: not written), finite, and the
    # skipped steps changed nothing: the weights are still those of step 4
    checkpoint = load_checkpoint(out / CHECKPOINT_NAME)
    assert checkpoint["step"] == 4 and not non_finite_tensors(checkpoint["model"])
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, checkpoint["model"][key], rtol=0, atol=0)
    for key, value in trainer.extra_modules["discriminator"].state_dict().items():  # D kept training
        assert torch.isfinite(value).all(), key
    assert math.isfinite(trainer.disc_loss_ema)
    assert not (out / "tokenizer.safetensors").exists()
    rows = _rows(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert [float(r["skipped_steps"]) for r in rows] == [0, 0, 0, 0, 1, 2, 3]
    assert math.isnan(float(rows[-1]["prior"])) and math.isfinite(float(rows[3]["prior"]))


def test_the_command_exits_non_zero_with_the_message(tmp_path, capsys):
    class FromTheStart(DivergingTrainer):
        diverge_at = 0

    config = {"preset": "tiny", "store": "in-memory", "output_dir": str(tmp_path / "run"), "batch_size": 4,
              **RUN, "max_bad_steps": 1}  # fmt: skip
    assert run_pretraining(FromTheStart, TokenizerConfig, config, "tokenizer") == STOPPED_EXIT_CODE
    err = capsys.readouterr().err
    assert "pumit_pretrain tokenizer: stopped:" in err and "training diverged" in err
    assert "no checkpoint had been written" in err
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()
    assert not (tmp_path / "run" / "tokenizer.safetensors").exists()


def test_non_finite_weights_are_never_written(tmp_path, capsys):
    out = tmp_path / "run"
    trainer = PhantomTokenizerTrainer(tiny_config(out, **RUN))
    trainer.fit()  # a good checkpoint (step 4) and export
    good = (out / CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(TrainingDiverged, match="weights are not finite.*checkpoint not written"):
        trainer.save_checkpoint()
    assert (out / CHECKPOINT_NAME).read_bytes() == good
    with pytest.raises(ValueError, match="refusing to write weights .*non-finite.*allow_non_finite=True"):
        trainer.export(tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    trainer.close()

    # `pumit_pretrain export` of a checkpoint holding NaN: refused unless --allow-non-finite
    checkpoint = load_checkpoint(out / CHECKPOINT_NAME)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name].view(-1)[0] = math.inf
    torch.save(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan.pt: the weights of step 4 are not finite.*--allow-non-finite"):
        export_checkpoint(tmp_path / "nan.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    export_checkpoint(tmp_path / "nan.pt", tmp_path / "out.safetensors", allow_non_finite=True)
    assert non_finite_tensors(torch.load(tmp_path / "nan.pt", weights_only=True)["model"])
    save_model(trainer.model, tmp_path / "asked.safetensors", allow_non_finite=True)  # when asked for
    assert (tmp_path / "asked.safetensors").is_file()


# ---- resuming with other options ---------------------------------------------------------------------


def test_resuming_with_other_options_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    trainer = PhantomTokenizerTrainer(tiny_config(out, **RUN))
    trainer.fit()
    trainer.close()
    saved = {name: (out / name).read_bytes() for name in ("config.json", CHECKPOINT_NAME, "log.csv")}

    class MustNotBuild(PhantomTokenizerTrainer):
        def build_model(self):
            raise AssertionError("the refusal must come before the model is built")

    with pytest.raises(ValueError) as error:
        MustNotBuild(tiny_config(out, **{**RUN, "max_steps": 8, "lr": 0.01, "quantizer": "hard"}))
    message = str(error.value)
    assert (
        "at step 4" in message
        and f"--lr {TINY_PRESET['lr']!r} -> 0.01" in message
        and "--quantizer 'soft' -> 'hard'" in message
    )
    assert "--max-steps" not in message.split("Options that may change")[0]  # a safe change is not listed
    assert "--allow-option-change" in message
    assert {name: (out / name).read_bytes() for name in saved} == saved


def test_allowed_changes_are_applied_recorded_and_the_schedule_rebuilt(tmp_path, capsys):
    out = tmp_path / "run"
    run = {**RUN, "warmup_steps": 2}  # most steps on the cosine, whose length is --max-steps
    trainer = PhantomTokenizerTrainer(tiny_config(out, **run))
    trainer.fit()
    trainer.close()

    # a safe change alone (more steps) needs no flag; the schedule is recomputed for the new total
    trainer = PhantomTokenizerTrainer(tiny_config(out, **{**run, "max_steps": 6}))
    trainer.fit()
    trainer.close()
    assert "--max-steps changed from 4 to 6 on resume; the learning-rate schedule" in capsys.readouterr().out
    # then another learning rate, allowed explicitly
    trainer = PhantomTokenizerTrainer(
        tiny_config(out, **{**run, "max_steps": 8, "lr": 0.01, "allow_option_change": True})
    )
    trainer.fit()
    trainer.close()
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.01 and config["max_steps"] == 8  # what the last steps used
    assert config["changes"] == [
        {"step": 4, "option": "max_steps", "old": 4, "new": 6},
        {"step": 6, "option": "max_steps", "old": 6, "new": 8},
        {"step": 6, "option": "lr", "old": TINY_PRESET["lr"], "new": 0.01},
    ]
    assert load_checkpoint(out / CHECKPOINT_NAME)["changes"] == config["changes"]
    rows = {int(r["step"]): float(r["lr_generator"]) for r in _rows(out / "log.csv")}
    assert sorted(rows) == list(range(1, 9))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    tiny_lr = TINY_PRESET["lr"]
    # the run ending at step -> (its peak lr, its total steps)
    schedules = {4: (tiny_lr, 4), 6: (tiny_lr, 6), 8: (0.01, 8)}
    for step, lr in rows.items():
        peak, total = next(schedules[end] for end in sorted(schedules) if step <= end)
        expected = WarmupCosineLRScheduler(optimizer, peak, 1e-6, 2, total).lr_at(step - 1)
        assert lr == pytest.approx(expected), step


def test_max_steps_below_the_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    trainer = PhantomTokenizerTrainer(tiny_config(out, **RUN))
    trainer.fit()
    trainer.close()
    with pytest.raises(ValueError, match="--max-steps 2: .* is at step 4 already"):
        PhantomTokenizerTrainer(tiny_config(out, **{**RUN, "max_steps": 2}))


# ---- loader workers ----------------------------------------------------------------------------------


def test_default_workers_fit_the_machine(monkeypatch):
    from pumit_seg.trainers import pretrain_base

    for cpus, memory, expected in [(2, 24e9, 1), (1, 64e9, 0), (64, 512e9, 8), (16, 16e9, 2), (16, None, 8)]:
        monkeypatch.setattr(pretrain_base.os, "sched_getaffinity", lambda _, n=cpus: set(range(n)))
        monkeypatch.setattr(pretrain_base, "_memory_bytes", lambda m=memory: m)
        assert default_num_workers() == expected, (cpus, memory)


def test_a_killed_loader_worker_is_one_line_naming_num_workers(tmp_path, capsys):
    class KilledWorker(PhantomTokenizerTrainer):
        def build_loader(self):
            class Loader:
                def __iter__(self):
                    raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
                    yield

                def state_dict(self):
                    return {}

            return Loader()

    config = {
        "preset": "tiny",
        "store": "in-memory",
        "output_dir": str(tmp_path / "run"),
        "batch_size": 4,
        **RUN,
    }
    assert run_pretraining(KilledWorker, TokenizerConfig, config, "tokenizer") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "pid 4242" in lines[0] and "fewer --num-workers" in lines[0], err
    assert "Traceback" not in err


# ---- classification ----------------------------------------------------------------------------------


def test_classification_skips_non_finite_steps_and_stops_without_scoring(tmp_path, monkeypatch):
    from pumit_seg.data.medmnist import write_synthetic_medmnist
    from pumit_seg.trainers import classification as clf

    write_synthetic_medmnist(tmp_path / "organ.npz", samples=(48, 8, 8))
    config = clf.ClassificationConfig(data=str(tmp_path / "organ.npz"), output_dir=str(tmp_path / "run"),
                                      model="tiny", input_size=32, in_channels=1, batch_size=8, epochs=2,
                                      max_bad_steps=3)  # fmt: skip
    calls = {"n": 0}
    original = clf._loss_fn

    def poisoned(task):
        loss_fn = original(task)

        def loss(logits, targets):
            calls["n"] += 1
            value = loss_fn(logits, targets)
            return value * math.nan if calls["n"] in (2, 3, 8, 9, 10) else value  # 2 bad, then 3 in a row

        return loss

    monkeypatch.setattr(clf, "_loss_fn", poisoned)
    with pytest.raises(clf.TrainingDiverged, match="loss became nan in 3 steps in a row .* epoch 1"):
        clf.train_classifier(config)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert len(rows) == 1 and rows[0]["skipped_steps"] == "2"  # epoch 0 done with 2 steps skipped
    assert not (tmp_path / "run" / "results.json").exists()
    assert not non_finite_tensors(torch.load(tmp_path / "run" / "checkpoint_state.pt", weights_only=True)["optimizer"]
                                  ["state"][0])  # fmt: skip


# ---- the nnU-Net trainer -----------------------------------------------------------------------------

from test_trainer_weights import make_trainer, preprocessed  # noqa: E402, F401  (fixtures)


def test_pumit_trainer_skips_non_finite_steps_and_never_saves_nan(make_trainer, monkeypatch, tmp_path):  # noqa: F811
    from pumit_seg.trainers.pumit_trainer import MAX_BAD_STEPS_ENV
    from pumit_seg.trainers.pumit_trainer import TrainingDiverged as NNUNetDiverged

    monkeypatch.setenv(MAX_BAD_STEPS_ENV, "3")
    trainer = make_trainer()
    trainer.initialize()
    assert trainer.max_bad_steps == 3
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.loss = lambda output, target: output[0].float().mean() * math.nan
    batch = {"data": torch.randn(1, 1, *trainer.configuration_manager.patch_size), "target": torch.zeros(1)}
    for _ in range(2):
        assert math.isnan(float(trainer.train_step(batch)["loss"]))
    for key, value in trainer.network.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    with pytest.raises(NNUNetDiverged, match="3 steps in a row .* loss nan"):
        trainer.train_step(batch)
    with torch.no_grad():
        next(trainer.network.parameters()).view(-1)[0] = math.nan
    with pytest.raises(NNUNetDiverged, match="checkpoint_final.pth not written"):
        trainer.save_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    assert not (tmp_path / "checkpoint_final.pth").exists()
