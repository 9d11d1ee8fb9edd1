"""Time pumit_seg's metrics against MONAI's on the same masks: Dice, HD, HD95 and ASSD per label.

    python benchmarks/bench_metrics.py [--shape 150 512 512] [--spacing 2.5 0.8 0.8] [--labels 13] [--tag NAME]

A synthetic abdomen-like label map (``--labels`` ellipsoid organs of different sizes in a volume of
``--shape`` (depth, rows, columns)) is the reference; the prediction is the reference with every organ
shifted, grown or shrunk a little and with a few false-positive specks, so every distance is non-trivial.
MONAI runs per label on (1, 1, ...) float tensors (``DiceMetric``, ``HausdorffDistanceMetric``, the same
with ``percentile=95``, ``SurfaceDistanceMetric(symmetric=True)``), which is MONAI's cheapest use in
memory; the one-hot conversion is included in its time. pumit_seg computes everything in one call of
``compute_label_metrics`` (one process). The values must agree (the script fails otherwise); the timings,
their ratio and the machine go to ``benchmarks/results/metrics_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np
import scipy
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

from pumit_seg.cli_checks import float_in_range
from pumit_seg.evaluation.metrics import compute_label_metrics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KEYS = ("Dice", "HD", "HD95", "ASSD")


def synthetic_organs(shape, num_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label maps (uint8) with `num_labels` ellipsoid organs."""
    rng = np.random.default_rng(seed)
    shape = np.asarray(shape)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    reference = np.zeros(tuple(shape), np.uint8)
    prediction = np.zeros(tuple(shape), np.uint8)
    for label in range(1, num_labels + 1):
        # organ radii from large (liver-like, ~20 % of the field) to small (adrenal-like, ~2 %)
        size = 0.2 * (0.85 ** (label - 1)) + 0.02
        radii = np.maximum(size * shape * rng.uniform(0.6, 1.0, 3), 1.5)
        centre = rng.uniform(radii, shape - radii)
        shift = rng.normal(0, 0.08, 3) * radii
        scale = rng.uniform(0.9, 1.1)
        inside_ref = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
        inside_pred = (
            sum(
                ((g - c - s) / (r * scale)) ** 2
                for g, c, s, r in zip(grid, centre, shift, radii, strict=True)
            )
            <= 1
        )
        reference[inside_ref] = label
        prediction[inside_pred] = label
        speck = tuple(int(v) for v in rng.uniform(0, shape - 3))  # a false positive far from the organ
        prediction[tuple(slice(s, s + 2) for s in speck)] = label
    return reference, prediction


def monai_per_label(reference, prediction, labels, spacing) -> dict:
    metrics = {
        "Dice": DiceMetric(include_background=True),
        "HD": HausdorffDistanceMetric(include_background=True),
        "HD95": HausdorffDistanceMetric(include_background=True, percentile=95),
        "ASSD": SurfaceDistanceMetric(include_background=True, symmetric=True),
    }
    results = {}
    for label in labels:
        pred = torch.as_tensor(prediction == label).float()[None, None]
        ref = torch.as_tensor(reference == label).float()[None, None]
        results[label] = {}
        for key, metric in metrics.items():
            kwargs = {} if key == "Dice" else {"spacing": list(spacing)}
            results[label][key] = float(metric(pred, ref, **kwargs)[0, 0])
    return results


def timed(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "monai": __import__("monai").__version__,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[150, 512, 512], help="depth rows columns")
    parser.add_argument(
        "--spacing",
        type=float_in_range(0.0, None, low_open=True),
        nargs=3,
        default=[2.5, 0.8, 0.8],
        help="mm per axis",
    )
    parser.add_argument("--labels", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=1, help="best of N runs (each side)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default=None, help="results file name suffix (default: the shape)")
    args = parser.parse_args(argv)

    reference, prediction = synthetic_organs(args.shape, args.labels, args.seed)
    labels = list(range(1, args.labels + 1))
    spacing = tuple(args.spacing)
    ours_time, ours = timed(
        lambda: compute_label_metrics(reference, prediction, labels, spacing, "monai"), args.repeats
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_time, theirs = timed(
            lambda: monai_per_label(reference, prediction, labels, spacing), args.repeats
        )

    largest_difference = {
        key: max(
            abs(ours[label][key] - theirs[label][key]) / max(1.0, abs(theirs[label][key])) for label in labels
        )
        for key in KEYS
    }
    equal = all(difference <= 1e-6 for difference in largest_difference.values())
    tag = args.tag or "x".join(str(n) for n in args.shape)
    result = {
        "shape_dhw": args.shape,
        "spacing_mm": list(spacing),
        "labels": args.labels,
        "foreground_voxels": int(np.count_nonzero(reference)),
        "repeats": args.repeats,
        "pumit_seg_seconds": ours_time,
        "monai_seconds": monai_time,
        "speedup": monai_time / ours_time,
        "values_equal_within_1e-6_relative": equal,
        "largest_relative_difference": largest_difference,
        "per_label": {
            label: {"pumit_seg": {k: ours[label][k] for k in KEYS}, "monai": theirs[label]}
            for label in labels
        },
        "machine": machine(),
        "command": "python benchmarks/bench_metrics.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"metrics_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"# Metric speed: pumit_seg vs MONAI ({tag})",
        "",
        f"Volume {args.shape[0]}x{args.shape[1]}x{args.shape[2]} (depth x rows x columns), spacing "
        f"{spacing} mm, {args.labels} labels; Dice, HD, HD95 and ASSD per label; best of {args.repeats}.",
        "",
        "| | seconds |",
        "|---|---|",
        f"| MONAI {result['machine']['monai']} (per label, 4 metric classes) | {monai_time:.2f} |",
        f"| pumit_seg `compute_label_metrics` (1 process) | {ours_time:.2f} |",
        f"| **speed-up** | **{result['speedup']:.1f}x** |",
        "",
        f"Values equal within 1e-6 (relative): {equal}; largest relative differences: "
        + ", ".join(f"{k} {v:.1e}" for k, v in largest_difference.items()),
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, torch threads "
        f"{result['machine']['torch_threads']}, numpy {result['machine']['numpy']}, scipy {result['machine']['scipy']}, "
        f"torch {result['machine']['torch']}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    with open(os.path.join(RESULTS, f"metrics_{tag}.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    if not equal:
        raise SystemExit("pumit_seg and MONAI disagree: see the results file")
    return result


if __name__ == "__main__":
    main()
