"""Is a pre-training run learning? Health signals of the tokenizer and MIM on held-out images.

Pure functions (tensors in, numbers out), two accumulators that sum them over the validation
batches, and a verdict per run kind: ``healthy``, ``stalled`` (no better than a trivial baseline)
or ``collapsed`` (the model's output no longer depends on its input, or one code takes everything).

Tokenizer signals, on held-out crops in [-1, 1]:

* ``val_l1``: mean |reconstruction - input|;
* ``val_l1_crop_mean``: the same for the per-crop baseline (every voxel of a crop replaced by that
  crop's per-channel mean);
* ``val_l1_token_blocks``: the same for the token-grid baseline (the crop averaged over each token's
  block, e.g. 16x16 pixels in-plane, and spread back over the block): what an ideal one-colour-per-
  token code would give;
* ``val_input_dependence``: spread of the reconstructions across inputs / spread of the inputs, both
  the mean absolute deviation from the batch's mean crop, over the validation batches holding two or
  more crops of one shape. 0: every input gets the same output; about 1: outputs vary as the inputs do;
* ``val_token_entropy`` against ``log K``, ``val_perplexity`` of the mean token distribution and
  ``val_codes_used`` (codes whose share of the mean distribution exceeds ``CODE_IN_USE_SHARE / K``).

MIM signals on the masked positions of held-out crops: ``accuracy`` (head argmax == tokenizer argmax),
``accuracy_majority`` (always guessing the most frequent target code of the validation set: the
baseline to beat), ``target_codes_used`` and ``predicted_codes_used``.

Thresholds are the fields of `HealthThresholds`; `tokenizer_verdict` / `mim_verdict` apply them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CODE_IN_USE_SHARE",
    "HealthThresholds",
    "Verdict",
    "crop_mean_baseline",
    "token_block_baseline",
    "deviation_from_batch_mean",
    "TokenizerHealth",
    "MIMHealth",
    "tokenizer_verdict",
    "mim_verdict",
    "warn",
    "record_health",
    "HEALTH_FILE",
]

HEALTH_FILE = "health.json"  # in the run folder: every validation's verdict

CODE_IN_USE_SHARE = 0.1  # a code is in use when its share of the mean token distribution exceeds 0.1 / K


@dataclass(frozen=True)
class HealthThresholds:
    """When a run is called collapsed or stalled (see `tokenizer_verdict`, `mim_verdict`)."""

    # collapsed: reconstructions vary across inputs less than this share of the inputs' own variation
    min_input_dependence: float = 0.2
    # collapsed: fewer codes in use than this (soft tokens on one code carry no content)
    min_codes_used: int = 2
    # stalled: held-out L1 not below this share of the per-crop-mean baseline's L1
    max_l1_vs_crop_mean: float = 1.0
    # stalled: MIM masked-token accuracy not above the majority-code baseline by this much (absolute)
    min_accuracy_gain: float = 0.0
    # collapsed: the MIM head predicts fewer distinct codes than this while the targets use more
    min_predicted_codes: int = 2


DEFAULT_THRESHOLDS = HealthThresholds()


@dataclass
class Verdict:
    status: str  # "healthy", "stalled" or "collapsed"
    reasons: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    def message(self, kind: str, step: int) -> str:
        return f"{kind} {self.status} at step {step}: " + "; ".join(self.reasons)


# --------------------------------------------------------------------------------------
# Baselines and spreads (pure functions)
# --------------------------------------------------------------------------------------


def crop_mean_baseline(x: Tensor) -> Tensor:
    """(B, C, D, H, W) -> every voxel replaced by its crop's per-channel mean."""
    return x.float().mean(dim=(2, 3, 4), keepdim=True).expand_as(x)


def token_block_baseline(x: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(B, C, D, H, W) averaged over the blocks of a (d, h, w) token grid, spread back over each block."""
    depth, height, width = x.shape[2:]
    block = (depth // grid[0], height // grid[1], width // grid[2])
    if any(b < 1 for b in block) or (block[0] * grid[0], block[1] * grid[1], block[2] * grid[2]) != (
        depth,
        height,
        width,
    ):
        raise ValueError(f"token grid {grid} does not tile a crop of {tuple(x.shape[2:])}")
    means = F.avg_pool3d(x.float(), kernel_size=block, stride=block)
    for axis, size in zip((2, 3, 4), block, strict=True):
        means = means.repeat_interleave(size, dim=axis)
    return means


def deviation_from_batch_mean(x: Tensor) -> Tensor:
    """Sum over a batch of crops of one shape of |x_i - mean_j x_j| (a spread; 0 for identical crops)."""
    x = x.float()
    return (x - x.mean(dim=0, keepdim=True)).abs().sum()


def _entropy(p: Tensor, eps: float = 1e-12) -> Tensor:
    return -(p * (p + eps).log()).sum(-1)


# --------------------------------------------------------------------------------------
# Accumulators over the validation batches
# --------------------------------------------------------------------------------------


class TokenizerHealth:
    """Sum the tokenizer's health signals over validation batches; `metrics()` gives the numbers."""

    def __init__(self, num_codes: int):
        self.num_codes = num_codes
        self.voxels = 0
        self.l1 = self.l1_crop_mean = self.l1_blocks = 0.0
        self.spread_inputs = self.spread_reconstructions = 0.0
        self.p_sum = torch.zeros(num_codes, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.positions = 0

    def add(self, x: Tensor, reconstruction: Tensor, probs: Tensor) -> None:
        """One batch: inputs and reconstructions (B, C, D, H, W), token distributions (B, K, d, h, w)."""
        x, reconstruction = x.float(), reconstruction.float()
        self.voxels += x.numel()
        self.l1 += float((reconstruction - x).abs().sum())
        self.l1_crop_mean += float((crop_mean_baseline(x) - x).abs().sum())
        self.l1_blocks += float((token_block_baseline(x, tuple(probs.shape[2:])) - x).abs().sum())
        if x.shape[0] >= 2:
            self.spread_inputs += float(deviation_from_batch_mean(x))
            self.spread_reconstructions += float(deviation_from_batch_mean(reconstruction))
        p = probs.float().movedim(1, -1).reshape(-1, self.num_codes)
        self.p_sum += p.sum(0).double().cpu()
        self.entropy_sum += float(_entropy(p).sum())
        self.positions += p.shape[0]

    @property
    def p_bar(self) -> Tensor:
        return (self.p_sum / max(self.positions, 1)).float()

    def metrics(self) -> dict[str, float]:
        p_bar = self.p_bar
        voxels = max(self.voxels, 1)
        return {
            "val_l1": self.l1 / voxels,
            "val_l1_crop_mean": self.l1_crop_mean / voxels,
            "val_l1_token_blocks": self.l1_blocks / voxels,
            "val_input_dependence": (
                self.spread_reconstructions / self.spread_inputs if self.spread_inputs > 0 else math.nan
            ),
            "val_perplexity": float(torch.exp(_entropy(p_bar.double()))),
            "val_token_entropy": self.entropy_sum / max(self.positions, 1),
            "val_log_num_codes": math.log(self.num_codes),
            "val_codes_used": float((p_bar > CODE_IN_USE_SHARE / self.num_codes).sum()),
        }


class MIMHealth:
    """Sum MIM's health signals over validation batches (masked positions only)."""

    def __init__(self, num_codes: int):
        self.num_codes = num_codes
        self.target_counts = torch.zeros(num_codes, dtype=torch.float64)
        self.predicted_counts = torch.zeros(num_codes, dtype=torch.float64)
        self.correct = 0
        self.masked = 0

    def add(self, masked_logits: Tensor, masked_targets: Tensor) -> None:
        """Head logits (M, K) and the tokenizer's distributions (M, K) at the masked positions."""
        predicted = masked_logits.argmax(-1).cpu()
        target = masked_targets.argmax(-1).cpu()
        self.correct += int((predicted == target).sum())
        self.masked += int(target.numel())
        self.target_counts += torch.bincount(target, minlength=self.num_codes).double()
        self.predicted_counts += torch.bincount(predicted, minlength=self.num_codes).double()

    def metrics(self) -> dict[str, float]:
        masked = max(self.masked, 1)
        return {
            "accuracy": self.correct / masked,
            "accuracy_majority": float(self.target_counts.max()) / masked,
            "target_codes_used": float((self.target_counts > 0).sum()),
            "predicted_codes_used": float((self.predicted_counts > 0).sum()),
        }


# --------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------


def tokenizer_verdict(
    metrics: dict[str, float], thresholds: HealthThresholds = DEFAULT_THRESHOLDS
) -> Verdict:
    """collapsed: outputs ignore the input or codes are dead; stalled: no better than a crop's mean."""
    collapsed, stalled = [], []
    dependence = metrics.get("val_input_dependence", math.nan)
    if math.isfinite(dependence) and dependence < thresholds.min_input_dependence:
        collapsed.append(
            f"reconstructions barely depend on the input (input dependence {dependence:.2f} < "
            f"{thresholds.min_input_dependence})"
        )
    if metrics.get("val_codes_used", math.inf) < thresholds.min_codes_used:
        collapsed.append(f"only {metrics['val_codes_used']:.0f} code(s) in use")
    l1, baseline = metrics.get("val_l1", math.nan), metrics.get("val_l1_crop_mean", math.nan)
    if not l1 < thresholds.max_l1_vs_crop_mean * baseline:  # NaN counts as stalled
        stalled.append(f"held-out L1 {l1:.4f} is not below the per-crop-mean baseline {baseline:.4f}")
    if collapsed:
        return Verdict("collapsed", collapsed + stalled)
    if stalled:
        return Verdict("stalled", stalled)
    return Verdict("healthy")


def mim_verdict(metrics: dict[str, float], thresholds: HealthThresholds = DEFAULT_THRESHOLDS) -> Verdict:
    """collapsed: the head guesses one code for a varied target; stalled: not above the majority code."""
    collapsed, stalled = [], []
    accuracy, majority = metrics.get("accuracy", math.nan), metrics.get("accuracy_majority", math.nan)
    if (
        metrics.get("predicted_codes_used", math.inf) < thresholds.min_predicted_codes
        and metrics.get("target_codes_used", 0) >= thresholds.min_predicted_codes
    ):
        collapsed.append(
            f"the head predicts {metrics['predicted_codes_used']:.0f} code(s) for targets using "
            f"{metrics['target_codes_used']:.0f}"
        )
    if not accuracy > majority + thresholds.min_accuracy_gain:
        stalled.append(
            f"masked-token accuracy {accuracy:.3f} is not above the majority-code baseline {majority:.3f}"
        )
    if metrics.get("target_codes_used", math.inf) < thresholds.min_codes_used:
        stalled.append(
            f"the tokenizer's targets use {metrics['target_codes_used']:.0f} code(s): check the tokenizer run"
        )
    if collapsed:
        return Verdict("collapsed", collapsed + stalled)
    if stalled:
        return Verdict("stalled", stalled)
    return Verdict("healthy")


def warn(kind: str, step: int, verdict: Verdict, stream=None) -> None:
    """A loud line on stderr (``WARNING: tokenizer collapsed at step N: ...``) for an unhealthy verdict."""
    if verdict.healthy:
        return
    print(f"WARNING: {verdict.message(kind, step)}", file=stream or sys.stderr, flush=True)


def record_health(output_dir, kind: str, step: int, verdict: Verdict, metrics: dict[str, float]) -> None:
    """Warn on stderr when unhealthy and append the verdict to ``OUTPUT/health.json`` (read by the report)."""
    import json
    from pathlib import Path

    from pumit_seg.atomic import write_json_atomic

    warn(kind, step, verdict)
    path = Path(output_dir) / HEALTH_FILE
    try:
        history = json.loads(path.read_text())["validations"] if path.is_file() else []
    except (OSError, ValueError, KeyError):
        history = []
    history = [
        entry for entry in history if entry.get("step", -1) < step
    ]  # a resumed run rewrites later ones
    history.append(
        {
            "step": step,
            "status": verdict.status,
            "reasons": verdict.reasons,
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
        }
    )
    write_json_atomic(path, {"kind": kind, "thresholds": asdict(DEFAULT_THRESHOLDS), "validations": history})
