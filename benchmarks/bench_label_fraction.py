"""What pre-training buys: `PUMITTrainer` from an encoder vs `PUMITTrainer_scratch`, at label fractions.

The shape of the paper's Table 4. For a planned nnU-Net dataset (``pumit_plan_and_preprocess``) and an
encoder file, every label fraction f (default 0.2, 0.4, 0.6, 1.0) fine-tunes both trainers on the first
``round(f * N)`` cases of one fixed shuffled pool of N training cases (nested subsets), with the same
held-out validation cases, the same budget (epochs x iterations, learning rate) and the same seed.
nnU-Net predicts the validation cases at the end of each training (its ``validation/`` folder);
`pumit_seg.evaluation.evaluate_folder` (``pumit_evaluate``) scores them; the table gives the
foreground-mean Dice / ASSD / HD (mm) per fraction and method, and a plot.

    # a real dataset (nnUNet_raw / nnUNet_preprocessed set; trainings go to OUT/nnUNet_results):
    python benchmarks/bench_label_fraction.py run -d 501 -c 3d_fullres --encoder encoder.safetensors -o OUT \
        --epochs 50 --iterations 250 --lr 1e-4
    # the tiny CPU configuration from nothing: phantom pre-training corpus -> prepare -> tokenizer -> mim ->
    # encoder.safetensors, a phantom segmentation dataset, plan, then `run` (tables in benchmarks/results):
    python benchmarks/bench_label_fraction.py tiny -o /tmp/label_fraction_tiny
    # tables from a benchmark folder, finished or not (trainings already done are never repeated):
    python benchmarks/bench_label_fraction.py table -o /tmp/label_fraction_tiny/benchmark --table PREFIX

Each training runs in its own process (this script's hidden ``train`` command), with nnU-Net's results
folder pointed into OUT, so a user's own ``nnUNet_results`` is never touched. The trainer classes are
`PUMITTrainer` / `PUMITTrainer_scratch` with the budget overridden (and, unless ``--mirroring``, without
mirroring, as `PUMITTrainer_test`); the split is given to the trainer directly (no splits file written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pumit_seg.cli_checks import float_in_range

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_FRACTIONS = (0.2, 0.4, 0.6, 1.0)
METHODS = {"pretrained": "PUMITTrainer", "scratch": "PUMITTrainer_scratch"}
TABLE_METRICS = ("Dice", "ASSD", "HD")


# --------------------------------------------------------------------------------------
# Splits and tables (pure functions)
# --------------------------------------------------------------------------------------


def label_fraction_splits(
    identifiers: list[str], fractions, num_val: int, seed: int
) -> tuple[list[str], dict[float, list[str]]]:
    """(validation cases, fraction -> training cases): nested prefixes of one shuffled pool."""
    identifiers = sorted(identifiers)
    if not 1 <= num_val < len(identifiers):
        raise ValueError(f"--num-val must be between 1 and {len(identifiers) - 1}, got {num_val}")
    order = np.random.default_rng(seed).permutation(len(identifiers))
    shuffled = [identifiers[i] for i in order]
    val, pool = sorted(shuffled[:num_val]), shuffled[num_val:]
    train = {}
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--fractions must lie in (0, 1], got {fraction}")
        train[fraction] = sorted(pool[: max(1, round(fraction * len(pool)))])
    return val, train


def fold_number(fraction: float, repeat: int) -> int:
    """nnU-Net folder fold_N: N = 1000 * repeat + percent of the pool (fold_20, fold_1020, ...)."""
    return 1000 * repeat + round(100 * fraction)


def tabulate(rows: list[dict]) -> str:
    """Markdown table: one row per fraction, mean ± standard deviation (min..max) over repeats per method and metric."""
    fractions = sorted({row["fraction"] for row in rows})
    methods = [m for m in METHODS if any(row["method"] == m for row in rows)]
    header = ["fraction", "cases"] + [f"{metric} {method}" for metric in TABLE_METRICS for method in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fraction in fractions:
        selected = [row for row in rows if row["fraction"] == fraction]
        cells = [f"{fraction:g}", str(selected[0]["num_train"])]
        for metric in TABLE_METRICS:
            for method in methods:
                values = [row[metric] for row in selected if row["method"] == method]
                cells.append(_cell(values, 3 if metric == "Dice" else 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    infinite = int(np.sum(~np.isfinite(values)))
    if infinite:  # a distance is inf when a run predicted no foreground for a label
        return f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f}; {infinite} of {len(values)} inf)"
    spread = float(np.std(values, ddof=1))
    return f"{mean:.{digits}f} ± {spread:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def paired_differences(rows: list[dict], metric: str = "Dice") -> dict[float, dict]:
    """Per fraction: pretrained - scratch of `metric` for each repeat (same seed, same split), mean and std."""
    result = {}
    for fraction in sorted({row["fraction"] for row in rows}):
        by = {(row["method"], row["repeat"]): row[metric] for row in rows if row["fraction"] == fraction}
        repeats = sorted({r for (_, r) in by})
        deltas = [
            by[("pretrained", r)] - by[("scratch", r)]
            for r in repeats
            if ("pretrained", r) in by and ("scratch", r) in by
        ]
        if deltas:
            result[fraction] = {
                "differences": [round(d, 4) for d in deltas],
                "mean": float(np.mean(deltas)),
                "std": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else float("nan"),
            }
    return result


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pumit_seg.atomic import atomic_path

    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(4 * len(TABLE_METRICS), 3.2))
    for ax, metric in zip(axes, TABLE_METRICS, strict=True):
        for method in METHODS:
            points = sorted((row["fraction"], row[metric]) for row in rows if row["method"] == method)
            if not points:
                continue
            fractions = sorted({f for f, _ in points})
            means = [np.mean([v for f2, v in points if f2 == f]) for f in fractions]
            ax.plot(fractions, means, marker="o", label=METHODS[method])
            ax.scatter(*zip(*points, strict=True), s=8, alpha=0.4)
        ax.set_xlabel("label fraction")
        ax.set_title(f"{metric} ({'higher' if metric == 'Dice' else 'lower'} is better)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# One training (child process)
# --------------------------------------------------------------------------------------


def make_trainer_class(method: str, budget: dict, mirroring: bool, split: dict):
    """`PUMITTrainer` / `PUMITTrainer_scratch` with `budget` and a fixed split (and no mirroring unless asked)."""
    from pumit_seg.trainers import PUMITTrainer, PUMITTrainer_scratch, PUMITTrainer_test

    bases = (PUMITTrainer_scratch,) if method == "scratch" else (PUMITTrainer,)
    if not mirroring:
        bases = (PUMITTrainer_test, *bases) if method == "scratch" else (PUMITTrainer_test,)

    def do_split(self):
        self.print_to_log_file(
            f"label-fraction split: {len(split['train'])} training, {len(split['val'])} validation"
        )
        return list(split["train"]), list(split["val"])

    attributes = {
        "NUM_EPOCHS": budget["epochs"],
        "NUM_ITERATIONS_PER_EPOCH": budget["iterations"],
        "NUM_VAL_ITERATIONS_PER_EPOCH": budget["val_iterations"],
        "INITIAL_LR": budget["lr"],
        "WARMUP_FRACTION": budget["warmup_fraction"],
        "SAVE_EVERY": 10**6,  # final checkpoint only
        "do_split": do_split,
    }
    return type(f"{METHODS[method]}_labelfraction", bases, attributes)


def train_one(args) -> None:
    """The hidden ``train`` command: one fine-tuning and nnU-Net's prediction of the validation cases."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    request = json.loads(Path(args.request).read_text())
    torch.manual_seed(request["seed"])
    np.random.seed(request["seed"])
    dataset_name = maybe_convert_to_dataset_name(request["dataset"])
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    plans = load_json(str(folder / f"{request['plans']}.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(folder / "dataset.json"))
    trainer_class = make_trainer_class(
        request["method"], request["budget"], request["mirroring"], request["split"]
    )
    device = torch.device(request["device"])
    if device.type == "cpu":
        torch.set_num_threads(max(os.cpu_count() or 1, 1))
    trainer = trainer_class(plans, request["configuration"], request["fold"], dataset_json, device)
    trainer.run_training()
    trainer.perform_actual_validation(False)
    if request["method"] == "pretrained":
        report = trainer.pretrained_weight_report
        print(
            f"encoder: {len(report.loaded)} loaded, {len(report.adapted)} adapted, {len(report.missing)} missing"
        )


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def evaluate_run(output_folder: Path, gt_folder: Path, dataset_json: Path) -> dict[str, float]:
    from pumit_seg.evaluation.evaluate_folder import evaluate_folder

    summary = evaluate_folder(
        str(gt_folder), str(output_folder / "validation"), str(dataset_json),
        str(output_folder / "pumit_summary.json"), "monai", 1, allow_missing=True,
    )  # fmt: skip
    foreground = summary["foreground_mean"]
    return {
        "Dice": float(foreground["Dice"]),
        "ASSD": float(foreground["ASSD"]),
        "HD": float(foreground["HD"]),
    }


def run_benchmark(args) -> list[dict]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from pumit_seg.atomic import write_json_atomic
    from pumit_seg.trainers.nnunet_ext_dir import CPU_NNUNET_SETTINGS

    if not Path(args.encoder).is_file():
        raise SystemExit(f"--encoder {args.encoder}: no such file")
    output = Path(args.output).resolve()
    dataset_name = maybe_convert_to_dataset_name(args.dataset)
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    plans = json.loads((preprocessed / f"{args.plans}.json").read_text())
    data_folder = preprocessed / plans["configurations"][args.configuration]["data_identifier"]
    identifiers = list(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    num_val = args.num_val or max(1, round(0.25 * len(identifiers)))
    val, train = label_fraction_splits(identifiers, args.fractions, num_val, args.split_seed)
    budget = {
        "epochs": args.epochs, "iterations": args.iterations, "val_iterations": args.val_iterations,
        "lr": args.lr, "warmup_fraction": args.warmup_fraction,
    }  # fmt: skip
    env = dict(os.environ, nnUNet_results=str(output / "nnUNet_results"))
    if args.device == "cpu":
        env.update({key: os.environ.get(key, value) for key, value in CPU_NNUNET_SETTINGS.items()})
    rows_file = output / "runs.json"
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else []  # a rerun skips finished runs
    done = {(row["method"], row["fraction"], row["repeat"]) for row in rows}
    for repeat in range(args.repeats):
        for fraction in args.fractions:
            for method in args.methods:
                if (method, fraction, repeat) in done:
                    continue
                fold = fold_number(fraction, repeat)
                request = {
                    "dataset": args.dataset, "configuration": args.configuration, "plans": args.plans,
                    "fold": fold, "method": method, "budget": budget, "mirroring": args.mirroring,
                    "split": {"train": train[fraction], "val": val}, "seed": args.seed + repeat,
                    "device": args.device,
                }  # fmt: skip
                request_file = output / "requests" / f"{method}_fold_{fold}.json"
                write_json_atomic(request_file, request)
                run_env = dict(
                    env,
                    PUMIT_PRETRAINED_WEIGHTS=str(Path(args.encoder).resolve())
                    if method == "pretrained"
                    else "",
                )
                print(
                    f"[{method}] fraction {fraction:g} ({len(train[fraction])} cases), repeat {repeat} ...",
                    flush=True,
                )
                start = time.perf_counter()
                result = subprocess.run(
                    [sys.executable, __file__, "train", "--request", str(request_file)],
                    env=run_env, capture_output=True, encoding="utf-8", errors="replace",
                )  # fmt: skip
                log_file = output / "logs" / f"{method}_fold_{fold}.log"
                log_file.parent.mkdir(parents=True, exist_ok=True)
                log_file.write_text(result.stdout + result.stderr, encoding="utf-8")
                if result.returncode != 0:
                    raise SystemExit(
                        f"training {method} fold {fold} failed; see {log_file}:\n{result.stderr[-3000:]}"
                    )
                trainer_folder = f"{METHODS[method]}_labelfraction__{args.plans}__{args.configuration}"
                run_folder = output / "nnUNet_results" / dataset_name / trainer_folder / f"fold_{fold}"
                metrics = evaluate_run(
                    run_folder, preprocessed / "gt_segmentations", preprocessed / "dataset.json"
                )
                row = {
                    "method": method, "fraction": fraction, "repeat": repeat, "num_train": len(train[fraction]),
                    "num_val": len(val), "seconds": round(time.perf_counter() - start, 1), **metrics,
                }  # fmt: skip
                print("   ", json.dumps(row), flush=True)
                rows.append(row)
                write_json_atomic(rows_file, rows)
    return rows


def write_tables(rows: list[dict], prefix: Path, description: dict) -> None:
    from pumit_seg.atomic import atomic_path, write_json_atomic

    table = tabulate(rows)
    differences = paired_differences(rows)
    write_json_atomic(
        prefix.with_suffix(".json"),
        {
            **description,
            "runs": rows,
            "dice_pretrained_minus_scratch": {str(k): v for k, v in differences.items()},
        },
    )
    text = f"# What pre-training buys ({description.get('name', '')})\n\n"
    text += "".join(f"* {key}: {value}\n" for key, value in description.items() if key != "name")
    text += (
        "\nForeground-mean Dice / ASSD (mm) / HD (mm) of the validation cases (pumit_evaluate, monai), "
        f"mean ± sample standard deviation (min..max) over the seeds:\n\n{table}\n"
    )
    if differences:
        text += "\nDice pretrained - scratch, paired by seed (same split, same seed):\n\n"
        text += "| fraction | per seed | mean ± std |\n|---|---|---|\n"
        for fraction, d in differences.items():
            text += f"| {fraction:g} | {', '.join(f'{v:+.3f}' for v in d['differences'])} | {d['mean']:+.3f} ± {d['std']:.3f} |\n"
    with atomic_path(prefix.with_suffix(".md")) as tmp:
        Path(tmp).write_text(text)
    plot(rows, prefix.with_suffix(".png"), f"label fractions: {description.get('name', '')}")
    print(table)


# --------------------------------------------------------------------------------------
# The tiny CPU configuration
# --------------------------------------------------------------------------------------

TINY_DATASET_ID = 977
# the demo's pre-training budget (pumit_seg.app.demo, setting "demo")
TINY_TOKENIZER_STEPS, TINY_RECONSTRUCTION_STEPS, TINY_MIM_STEPS = 2000, 1000, 400
TINY_PLAN_ARGS = [
    "--model", "tiny", "--patch_size_3d", "8", "64", "64", "--decoder_channels", "16", "32", "32", "32",
    "--full_res_channels", "8", "16", "--batch_size", "2",
]  # fmt: skip


def run_step(command: list[str], env: dict, log: Path) -> None:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}\n")
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {log}:\n{result.stderr[-3000:]}")


def machine_load() -> str:
    """`uptime`'s line: other jobs on a shared machine slow CPU trainings down."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def pretraining_health(work: Path) -> str:
    """The pre-training runs' last verdicts and numbers against their baselines (their health.json)."""
    parts = []
    for name, folder in (("tokenizer", "tokenizer"), ("MIM", "mim")):
        path = work / folder / "health.json"
        if not path.is_file():
            parts.append(f"{name}: no health.json")
            continue
        last = json.loads(path.read_text())["validations"][-1]
        m = last["metrics"]
        if name == "tokenizer":
            numbers = (
                f"L1 {m['val_l1']:.3f} (per-crop mean {m['val_l1_crop_mean']:.3f}, token blocks "
                f"{m['val_l1_token_blocks']:.3f}), input dependence {m['val_input_dependence']:.2f}"
            )
        else:
            numbers = (
                f"masked-token accuracy {m['accuracy']:.3f} (majority code {m['accuracy_majority']:.3f})"
            )
        parts.append(f"{name} {last['status']} at step {last['step']}: {numbers}")
    return "; ".join(parts)


def tiny(args) -> None:
    """Pre-train a tiny encoder on phantoms, make a phantom segmentation dataset, plan it, run the benchmark."""
    from pumit_seg.phantoms.abdomen import PhantomConfig, write_phantom_dataset
    from pumit_seg.phantoms.pretrain import write_pretrain_corpus
    from pumit_seg.trainers.nnunet_ext_dir import nnunet_environment

    work = Path(args.output).resolve()
    bin_dir = Path(sys.executable).parent
    log = work / "pipeline.log"
    encoder = work / "mim" / "encoder.safetensors"
    env = nnunet_environment(work, cpu=True)
    if not encoder.exists():
        config = work / "corpus" / "datasets.json"
        if not config.exists():
            config = write_pretrain_corpus(str(work / "corpus"))
        store = work / "store"
        if not (store / "table.csv").exists():
            run_step([str(bin_dir / "pumit_pretrain"), "prepare", str(config), "-o", str(store)], env, log)
        run_step([str(bin_dir / "pumit_pretrain"), "tokenizer", "--store", str(store), "-o", str(work / "tokenizer"),
                  "--preset", "tiny", "--max-steps", str(args.tokenizer_steps),
                  "--reconstruction-steps", str(args.reconstruction_steps)], env, log)  # fmt: skip
        run_step([str(bin_dir / "pumit_pretrain"), "mim", "--store", str(store), "-o", str(work / "mim"),
                  "--tokenizer", str(work / "tokenizer" / "tokenizer.safetensors"), "--preset", "tiny",
                  "--max-steps", str(args.mim_steps)], env, log)  # fmt: skip
    dataset_name = f"Dataset{TINY_DATASET_ID:03d}_LabelFraction"
    if not (Path(env["nnUNet_preprocessed"]) / dataset_name / "PUMITPlans.json").exists():
        write_phantom_dataset(
            env["nnUNet_raw"], TINY_DATASET_ID, "LabelFraction", num_training=args.num_cases, num_test=0,
            config=PhantomConfig(shape=(16, 64, 64), spacing=(3.0, 0.75, 0.75)), seed=5, overwrite=True,
        )  # fmt: skip
        run_step([str(bin_dir / "pumit_plan_and_preprocess"), "-d", str(TINY_DATASET_ID), "-c", "3d_fullres",
                  "-np", "1", "-npfp", "1", *TINY_PLAN_ARGS], env, log)  # fmt: skip
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_extTrainer")})
    args.dataset, args.configuration, args.plans, args.encoder = (
        str(TINY_DATASET_ID),
        "3d_fullres",
        "PUMITPlans",
        str(encoder),
    )
    args.output = str(work / "benchmark")
    description = {
        "name": "tiny CPU configuration",
        "command": "python benchmarks/bench_label_fraction.py tiny " + " ".join(sys.argv[2:]),
        "pre-training": f"phantom corpus (pumit_seg.phantoms.pretrain), tokenizer --preset tiny "
        f"{args.tokenizer_steps} steps (the first {args.reconstruction_steps} on reconstruction alone), "
        f"mim --preset tiny {args.mim_steps} steps (tiny ViT: width 64, 4 blocks)",
        "pre-training health (last held-out validation)": pretraining_health(work),
        "segmentation": f"{args.num_cases} phantom CT cases 16x64x64 at 3x0.75x0.75 mm "
        f"(pumit_seg.phantoms.abdomen), 3d_fullres, patch 8x64x64, aniso_d 2",
        "budget": f"{args.epochs} epochs x {args.iterations} iterations, lr {args.lr}, warm-up "
        f"{args.warmup_fraction:g}, no mirroring, {args.repeats} seed(s): {list(range(args.seed, args.seed + args.repeats))} (torch / numpy seed of each fine-tuning; one pre-trained encoder)",
        "device": f"{args.device} ({os.cpu_count()} cores, shared with other jobs)",
        "load at start (uptime)": machine_load(),
        "planned runs": len(args.fractions) * len(args.methods) * args.repeats,
    }
    from pumit_seg.atomic import write_json_atomic

    write_json_atomic(Path(args.output) / "description.json", description)  # for `table` on a partial run
    start = time.perf_counter()
    rows = run_benchmark(args)
    description["wall time (benchmark part)"] = f"{time.perf_counter() - start:.0f} s"
    description["load at end (uptime)"] = machine_load()
    write_tables(rows, Path(args.table), description)


def table_from_folder(args) -> None:
    """The ``table`` command: tables from a (possibly unfinished) benchmark folder's runs.json."""
    folder = Path(args.output)
    rows = json.loads((folder / "runs.json").read_text())
    description_file = folder / "description.json"
    description = (
        json.loads(description_file.read_text()) if description_file.exists() else {"name": str(folder)}
    )
    planned = description.get("planned runs")
    if planned and len(rows) < planned:
        description["status"] = (
            f"PARTIAL: {len(rows)} of {planned} runs finished ({args.note or 'stopped early'})"
        )
    write_tables(rows, Path(args.table), description)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_benchmark_arguments(parser: argparse.ArgumentParser, tiny_defaults: bool) -> None:
    parser.add_argument("-o", "--output", required=True, help="work folder (trainings, logs, runs.json)")
    parser.add_argument(
        "--fractions",
        type=float_in_range(0.0, 1.0, low_open=True),
        nargs="+",
        default=list(DEFAULT_FRACTIONS),
    )
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument(
        "--num-val", type=int, default=0, help="validation cases (default: 25%% of the cases)"
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="torch / numpy seed of each training")
    parser.add_argument("--repeats", type=int, default=1, help="repeat every training with seed + r")
    parser.add_argument("--epochs", type=int, default=4 if tiny_defaults else 50)
    parser.add_argument("--iterations", type=int, default=25 if tiny_defaults else 250, help="per epoch")
    parser.add_argument("--val-iterations", type=int, default=2 if tiny_defaults else 50, help="per epoch")
    parser.add_argument(
        "--lr",
        type=float_in_range(0.0, None, low_open=True),
        default=3e-3 if tiny_defaults else 1e-4,
        help="peak learning rate",
    )
    parser.add_argument("--warmup-fraction", type=float_in_range(0.0, 1.0), default=0.1)
    parser.add_argument("--mirroring", action=argparse.BooleanOptionalAction, default=not tiny_defaults)
    parser.add_argument("--device", default="cpu" if tiny_defaults else "cuda")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="benchmark a planned dataset with an encoder file")
    run_parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    run_parser.add_argument("-c", "--configuration", default="3d_fullres")
    run_parser.add_argument("-p", "--plans", default="PUMITPlans")
    run_parser.add_argument("--encoder", required=True, help="encoder.safetensors (pumit_pretrain mim)")
    run_parser.add_argument("--table", default=None, help="table prefix (default OUTPUT/label_fraction)")
    add_benchmark_arguments(run_parser, tiny_defaults=False)
    tiny_parser = commands.add_parser("tiny", help="the tiny CPU configuration, pre-training included")
    tiny_parser.add_argument("--num-cases", type=int, default=12, help="phantom segmentation cases")
    tiny_parser.add_argument("--tokenizer-steps", type=int, default=TINY_TOKENIZER_STEPS)
    tiny_parser.add_argument(
        "--reconstruction-steps", type=int, default=TINY_RECONSTRUCTION_STEPS,
        help="tokenizer steps on reconstruction alone before the soft-token regularisers switch on",
    )  # fmt: skip
    tiny_parser.add_argument("--mim-steps", type=int, default=TINY_MIM_STEPS)
    tiny_parser.add_argument("--table", default=str(RESULTS_DIR / "label_fraction_tiny"))
    add_benchmark_arguments(tiny_parser, tiny_defaults=True)
    table_parser = commands.add_parser("table", help="tables from a benchmark folder (finished or not)")
    table_parser.add_argument("-o", "--output", required=True, help="the benchmark folder (holds runs.json)")
    table_parser.add_argument("--table", required=True, help="table prefix")
    table_parser.add_argument("--note", default="", help="why the run is partial")
    train_parser = commands.add_parser("train", help=argparse.SUPPRESS)
    train_parser.add_argument("--request", required=True)
    args = parser.parse_args(argv)
    if args.command == "train":
        train_one(args)
    elif args.command == "tiny":
        tiny(args)
    elif args.command == "table":
        table_from_folder(args)
    else:
        if "nnUNet_preprocessed" not in os.environ:
            raise SystemExit("set nnUNet_preprocessed (and nnUNet_raw) to the folders of the planned dataset")
        from pumit_seg.trainers.nnunet_ext_dir import nnunet_ext_dir

        os.environ.setdefault("nnUNet_extTrainer", nnunet_ext_dir())
        rows = run_benchmark(args)
        table = Path(args.table) if args.table else Path(args.output) / "label_fraction"
        description = {
            "name": f"dataset {args.dataset} {args.configuration}",
            "command": "python benchmarks/bench_label_fraction.py " + " ".join(sys.argv[1:]),
            "encoder": str(args.encoder),
            "budget": f"{args.epochs} epochs x {args.iterations} iterations, lr {args.lr}",
            "device": args.device,
        }
        write_tables(rows, table, description)


if __name__ == "__main__":
    main()
