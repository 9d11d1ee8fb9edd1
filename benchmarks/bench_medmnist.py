"""MedMNIST v2 3D classification (the paper's Table 2): fine-tune on the six data sets, tabulate beside the paper.

    python benchmarks/bench_medmnist.py --data-dir DIR --pretrained encoder.safetensors [-o RUNS] [training flags]

DIR holds the official files ``organmnist3d.npz``, ``nodulemnist3d.npz``, ``fracturemnist3d.npz``,
``adrenalmnist3d.npz``, ``vesselmnist3d.npz``, ``synapsemnist3d.npz`` (28^3, from MedMNIST v2's
Zenodo record https://zenodo.org/record/6496656; nothing is downloaded here, and the project's
machines have neither the files nor a GPU, so this benchmark cannot run there). Every other flag is a
``pumit_classify train`` flag; by default each data set sweeps the authors' learning rates
(5e-7 ... 5e-4) for 100 epochs at 160^3, choosing by validation AUC, as the paper. Data sets whose
file is missing are listed as such. Runs resume (``-o`` keeps one folder per data set and lr).
Writes a Markdown table and JSON (``--results``, default ``benchmarks/results/medmnist3d.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.data.medmnist import MEDMNIST_3D
from pumit_seg.trainers.classification import ClassificationConfig, fit_classifier
from pumit_seg.trainers.pretrain_base import add_config_arguments, config_from_args

# The authors' learning-rate sweep (their downstream/medmnistv2 batch script).
AUTHORS_LR_SWEEP = (5e-7, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4)
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "medmnist3d.md"
SHORT_NAMES = {name: name.removesuffix("mnist3d").capitalize() for name in MEDMNIST_3D}

# Table 2 of the paper: test (AUC, ACC) in %, per data set.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "ResNet-50+3D": {"organmnist3d": (99.4, 88.3), "nodulemnist3d": (87.5, 84.7), "fracturemnist3d": (72.5, 49.4),
                     "adrenalmnist3d": (82.8, 74.5), "vesselmnist3d": (90.7, 91.8), "synapsemnist3d": (85.1, 79.5)},
    "ResNet-50+ACS": {"organmnist3d": (99.4, 88.9), "nodulemnist3d": (88.6, 84.1), "fracturemnist3d": (75.0, 51.7),
                      "adrenalmnist3d": (82.8, 75.8), "vesselmnist3d": (91.2, 85.8), "synapsemnist3d": (71.9, 70.9)},
    "auto-sklearn": {"organmnist3d": (97.7, 81.4), "nodulemnist3d": (91.4, 87.4), "fracturemnist3d": (62.8, 45.3),
                     "adrenalmnist3d": (82.8, 80.2), "vesselmnist3d": (91.0, 91.5), "synapsemnist3d": (63.1, 73.0)},
    "UniMiSS": {"organmnist3d": (99.8, 94.9), "nodulemnist3d": (89.9, 84.2), "fracturemnist3d": (70.4, 50.8),
                "adrenalmnist3d": (87.0, 81.2), "vesselmnist3d": (93.8, 94.0), "synapsemnist3d": (85.8, 81.8)},
    "SMIT": {"organmnist3d": (99.5, 91.1), "nodulemnist3d": (88.4, 85.2), "fracturemnist3d": (63.1, 49.6),
             "adrenalmnist3d": (84.8, 82.2), "vesselmnist3d": (89.7, 91.1), "synapsemnist3d": (70.8, 73.3)},
    "EVA-02-B": {"organmnist3d": (99.2, 88.0), "nodulemnist3d": (91.0, 85.8), "fracturemnist3d": (75.2, 56.7),
                 "adrenalmnist3d": (86.7, 79.5), "vesselmnist3d": (95.8, 95.6), "synapsemnist3d": (72.1, 75.3)},
    "PUMIT (paper)": {"organmnist3d": (99.8, 95.6), "nodulemnist3d": (94.3, 88.4), "fracturemnist3d": (77.6, 55.4),
                      "adrenalmnist3d": (87.8, 81.2), "vesselmnist3d": (97.3, 95.6), "synapsemnist3d": (96.4, 91.5)},
}  # fmt: skip
PAPER_ROW = "PUMIT (paper)"


def _average(values: list[float]) -> float:
    return sum(values) / len(values)


def render_table(ours: dict[str, dict], label: str) -> str:
    """Markdown: the paper's rows, then ours (blank where a data set was not run), AUC / ACC in %."""
    header = "| Method | " + " | ".join(f"{SHORT_NAMES[n]} AUC | {SHORT_NAMES[n]} ACC" for n in MEDMNIST_3D)
    header += " | Average AUC | Average ACC |"
    lines = [header, "|" + "---|" * (2 * len(MEDMNIST_3D) + 3)]
    for method, row in PAPER_TABLE2.items():
        cells = [f"{row[n][i]:.1f}" for n in MEDMNIST_3D for i in (0, 1)]
        averages = [f"{_average([row[n][i] for n in MEDMNIST_3D]):.1f}" for i in (0, 1)]
        lines.append(f"| {method} | " + " | ".join(cells + averages) + " |")
    cells = []
    for name in MEDMNIST_3D:
        result = ours.get(name)
        cells += (
            ["-", "-"]
            if result is None
            else [f"{100 * result['test_auc']:.1f}", f"{100 * result['test_acc']:.1f}"]
        )
    if len(ours) == len(MEDMNIST_3D):
        averages = [f"{100 * _average([r[k] for r in ours.values()]):.1f}" for k in ("test_auc", "test_acc")]
    else:
        averages = ["-", "-"]  # an average over some of the six is not comparable with the paper's
    lines.append(f"| {label} | " + " | ".join(cells + averages) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_medmnist", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", required=True, help="folder with the six official MedMNIST v2 3D .npz files"
    )
    parser.add_argument(
        "--results", default=str(DEFAULT_RESULTS), help="Markdown table to write (JSON beside it)"
    )
    parser.add_argument("--label", default="pumit-seg", help="name of our row in the table")
    add_config_arguments(parser, ClassificationConfig)
    parser.set_defaults(lr_sweep=AUTHORS_LR_SWEEP, output_dir="medmnist3d_runs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    data_dir = Path(args.data_dir)
    found = {name: data_dir / f"{name}.npz" for name in MEDMNIST_3D if (data_dir / f"{name}.npz").is_file()}
    missing = [name for name in MEDMNIST_3D if name not in found]
    if not found:
        print(
            f"bench_medmnist: cannot run here: none of the six MedMNIST v2 3D files ({', '.join(MEDMNIST_3D)}.npz) "
            f"is in {data_dir}. Download them from https://zenodo.org/record/6496656 and pass --data-dir. "
            "The paper's numbers (Table 2) for comparison:\n" + render_table({}, args.label),
            file=sys.stderr,
        )
        return 1
    if missing:
        print(f"bench_medmnist: not in {data_dir}, left out: {', '.join(f'{n}.npz' for n in missing)}")

    ours: dict[str, dict] = {}
    for name, path in found.items():
        print(f"=== {name} ===")
        fields = {k: v for k, v in vars(args).items() if k not in ("data_dir", "results", "label")}
        fields.update(data=str(path), output_dir=str(Path(args.output_dir) / name))
        config = config_from_args(ClassificationConfig, fields)
        try:
            ours[name] = fit_classifier(config)
        except (ValueError, FileNotFoundError) as error:
            print(f"bench_medmnist: {name}: error: {error}", file=sys.stderr)
            return 2

    table = render_table(ours, args.label)
    settings = (
        f"Test AUC / ACC (%) of the model with the best validation AUC; ours: --model {config.model}, "
        f"--pretrained {config.pretrained}, {config.epochs} epochs, lr sweep {list(config.lr_sweep) or [config.lr]}, "
        f"input {config.input_size}. Not run: {', '.join(missing) or 'none'}.\n\n"
    )
    results_path = Path(args.results)
    with atomic_path(results_path) as tmp:
        Path(tmp).write_text("# MedMNIST v2 3D (paper Table 2)\n\n" + settings + table)
    write_json_atomic(
        results_path.with_suffix(".json"), {"ours": ours, "missing": missing, "paper": PAPER_TABLE2}
    )
    print(table)
    print(f"written: {results_path} and {results_path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
