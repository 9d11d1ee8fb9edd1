"""Health signals of pre-training runs: baselines, input dependence, verdicts, warnings, stop on collapse."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pumit_seg.models.tokenizer import VisualTokenizer
from pumit_seg.trainers.pretrain_base import PretrainingStopped
from pumit_seg.trainers.pretrain_health import (
    HEALTH_FILE,
    MIMHealth,
    TokenizerHealth,
    crop_mean_baseline,
    mim_verdict,
    record_health,
    token_block_baseline,
    tokenizer_verdict,
)
from pumit_seg.trainers.tokenizer_trainer import run as run_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_worker import PhantomTokenizerTrainer, tiny_config  # noqa: E402
from test_tokenizer import SMALL_WIDTHS, phantom_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _probs(batch: int, num_codes: int, grid=(1, 2, 2), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_codes, *grid, generator=g).softmax(1)


def test_baselines_against_hand_computed_values():
    x = torch.arange(16.0).view(1, 1, 1, 4, 4)
    torch.testing.assert_close(crop_mean_baseline(x), torch.full_like(x, 7.5))
    blocks = token_block_baseline(x, (1, 2, 2))
    expected = torch.tensor(
        [[2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5], [10.5, 10.5, 12.5, 12.5]] + [[10.5] * 2 + [12.5] * 2]
    )
    torch.testing.assert_close(blocks[0, 0, 0], expected)
    with pytest.raises(ValueError, match="does not tile"):
        token_block_baseline(x, (1, 3, 3))


def _tokenizer_metrics(reconstruct) -> dict[str, float]:
    health = TokenizerHealth(num_codes=8)
    for seed, depth in ((0, 1), (1, 4)):
        x = phantom_images(seed, 4, depth)
        health.add(x, reconstruct(x), _probs(4, 8, (depth, 2, 2), seed))
    return health.metrics()


def test_verdicts_healthy_stalled_and_collapsed_tokenizer():
    constant = torch.linspace(-1, 1, 32).view(1, 1, 1, 1, 32)
    healthy = _tokenizer_metrics(lambda x: x + 0.01 * torch.randn_like(x))
    assert healthy["val_l1"] < healthy["val_l1_token_blocks"] < healthy["val_l1_crop_mean"]
    assert healthy["val_input_dependence"] == pytest.approx(1.0, abs=0.1)
    assert 0 < healthy["val_token_entropy"] < healthy["val_log_num_codes"] == pytest.approx(math.log(8))
    assert tokenizer_verdict(healthy).status == "healthy"

    # varies as the inputs do but is no closer to them than the per-crop mean
    stalled = dict(healthy, val_l1=healthy["val_l1_crop_mean"] * 1.01)
    verdict = tokenizer_verdict(stalled)
    assert verdict.status == "stalled" and "per-crop-mean baseline" in verdict.reasons[0]

    # the same picture whatever the input: the content-free solution
    collapsed = _tokenizer_metrics(lambda x: constant.expand_as(x))
    assert collapsed["val_input_dependence"] == 0.0
    verdict = tokenizer_verdict(collapsed)
    assert verdict.status == "collapsed" and "input dependence 0.00" in verdict.reasons[0]

    one_code = dict(healthy, val_codes_used=1.0)
    assert tokenizer_verdict(one_code).status == "collapsed"


def test_mim_majority_baseline_and_verdicts():
    targets = torch.eye(4)[torch.tensor([0, 0, 0, 1, 2, 3])]  # majority code 0: 3 of 6
    health = MIMHealth(4)
    health.add(targets * 5, targets)  # a perfect head
    metrics = health.metrics()
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_majority"] == 0.5
    assert metrics["target_codes_used"] == metrics["predicted_codes_used"] == 4
    assert mim_verdict(metrics).healthy

    guess_zero = MIMHealth(4)
    guess_zero.add(torch.eye(4)[torch.zeros(6, dtype=torch.long)], targets)
    verdict = mim_verdict(guess_zero.metrics())
    assert verdict.status == "collapsed"
    assert any("majority-code baseline 0.500" in r for r in verdict.reasons)


def test_record_health_warns_loudly_and_keeps_a_history(tmp_path, capsys):
    metrics = _tokenizer_metrics(lambda x: torch.zeros_like(x))
    verdict = tokenizer_verdict(metrics)
    record_health(tmp_path, "tokenizer", 10, verdict, metrics)
    record_health(
        tmp_path,
        "tokenizer",
        20,
        tokenizer_verdict(dict(metrics, val_l1=0.0, val_input_dependence=1.0)),
        metrics,
    )
    assert capsys.readouterr().err.startswith("WARNING: tokenizer collapsed at step 10: ")
    history = json.loads((tmp_path / HEALTH_FILE).read_text())
    assert [(v["step"], v["status"]) for v in history["validations"]] == [(10, "collapsed"), (20, "healthy")]
    record_health(tmp_path, "tokenizer", 10, verdict, metrics)  # a resumed run rewrites what follows
    assert len(json.loads((tmp_path / HEALTH_FILE).read_text())["validations"]) == 1


class CollapsedTokenizer(VisualTokenizer):
    """A tokenizer whose output ignores its input (one learnable grey level): collapsed on purpose."""

    def __init__(self, **config):
        super().__init__(**config)
        self.level = nn.Parameter(torch.zeros(()))

    def forward(self, x, aniso_d):
        out = super().forward(x, aniso_d)
        out.reconstruction = out.reconstruction * 0 + self.level
        return out


class CollapsedTrainer(PhantomTokenizerTrainer):
    def build_model(self):
        return CollapsedTokenizer(**super().build_model().config)


@pytest.mark.e2e  # a tokenizer training run
def test_collapsed_tokenizer_warns_and_stop_on_collapse_ends_the_run(tmp_path, capsys):
    flags = {"perceptual_weight": 0.0, "max_steps": 2, "val_every": 2, "ckpt_every": 2, "log_every": 1}
    flags.update(picture_samples=0, **SMALL_WIDTHS)
    trainer = CollapsedTrainer(tiny_config(tmp_path / "warn", **flags))
    trainer.fit()  # warns, goes on
    trainer.close()
    err = capsys.readouterr().err
    assert "WARNING: tokenizer collapsed at step 2: reconstructions barely depend on the input" in err
    statuses = [v["status"] for v in json.loads((tmp_path / "warn" / HEALTH_FILE).read_text())["validations"]]
    assert statuses == ["collapsed"]

    trainer = CollapsedTrainer(tiny_config(tmp_path / "stop", **flags, stop_on_collapse=True))
    with pytest.raises(PretrainingStopped, match="--stop-on-collapse: tokenizer collapsed at step 2"):
        trainer.fit()
    trainer.close()
    assert trainer.step == 2 and not (tmp_path / "stop" / "tokenizer.safetensors").exists()


@pytest.mark.e2e  # a tokenizer training run
def test_stop_on_collapse_exit_status_and_message(tmp_path, capsys, monkeypatch):
    import pumit_seg.trainers.tokenizer_trainer as tokenizer_trainer

    monkeypatch.setattr(tokenizer_trainer, "TokenizerTrainer", CollapsedTrainer)
    args = argparse.Namespace(
        preset="tiny", store="in-memory", output_dir=str(tmp_path / "run"), batch_size=4, perceptual_weight=0.0,
        max_steps=2, val_every=2, stop_on_collapse=True, picture_samples=0, **SMALL_WIDTHS,
    )  # fmt: skip
    assert run_tokenizer(args) == 3
    assert (
        "pumit_pretrain tokenizer: stopped: --stop-on-collapse: tokenizer collapsed"
        in capsys.readouterr().err
    )
