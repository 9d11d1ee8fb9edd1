"""Prediction cost on the CPU: a PUMIT model next to nnU-Net's default model, both trained (a few iterations) on
the same tiny dataset, predicting the same volumes through nnU-Net's predictor, taking turns.

    python benchmarks/bench_predict.py                       # ~10 min on 2 busy cores
    python benchmarks/bench_predict.py --work-dir /tmp/bp    # keep (and reuse) the datasets and models
    python benchmarks/bench_predict.py --mirroring           # with test-time mirroring (8x the forward passes)

Steps (as tests/test_nnunet_e2e.py builds its pipeline, in one process):

1. phantom CT datasets at 3 x 0.75 x 0.75 mm (`write_phantom_dataset`): a training set (6 cases, ~16x64x64)
   and larger prediction volumes (~24x128x128, several tiles each);
2. nnU-Net's default plans (``nnUNetv2_plan_and_preprocess -c 3d_fullres``), then PUMIT's
   (``pumit_plan_and_preprocess``, default ViT-B and decoder widths) at the patch nnU-Net chose, so the two
   networks see the same tiles;
3. ``--iterations`` training iterations of ``nnUNetTrainer`` and ``PUMITTrainer`` (one epoch, in process,
   no validation): real checkpoints in real model folders; the weights do not change the cost;
4. ``nnUNetPredictor.initialize_from_trained_model_folder`` for each model (same step size, mirroring on or
   off for both, Gaussian blending), then ``predict_single_npy_array`` on every volume, the two models taking
   turns: seconds per volume in all and in the sliding window (the rest is preprocessing and export);
5. where each network's forward pass spends its time (one tile, parts timed apart under
   ``torch.inference_mode``), and the inference cost cuts of `pumit_seg.models.seg_net` undone and redone.

Results: ``benchmarks/results/predict_cpu.{json,md}`` with the machine's load average (the machine may be
shared with other jobs: wall times then move with their load, which is why the two models take turns).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
TRAIN_ID, PREDICT_ID = 971, 972
TRAIN_NAME, PREDICT_NAME = f"Dataset{TRAIN_ID}_PredictBench", f"Dataset{PREDICT_ID}_PredictBenchVolumes"
SPACING = (3.0, 0.75, 0.75)
TRAINERS = {"pumit": ("PUMITTrainer", "PUMITPlans"), "nnunet": ("nnUNetTrainer", "nnUNetPlans")}


def run(command: list[str], env: dict) -> None:
    print("$ " + " ".join(command), flush=True)
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")


def prepare(root: Path, env: dict, args) -> dict:
    """Datasets and plans (skipped where already there)."""
    from pumit_seg.phantoms.abdomen import PhantomConfig, write_phantom_dataset

    raw = root / "nnUNet_raw"
    if not (raw / TRAIN_NAME).is_dir():
        write_phantom_dataset(str(raw), TRAIN_ID, "PredictBench", num_training=6, num_test=0,
                              config=PhantomConfig(shape=(16, 64, 64), spacing=SPACING), seed=3)  # fmt: skip
    if not (raw / PREDICT_NAME).is_dir():
        write_phantom_dataset(str(raw), PREDICT_ID, "PredictBenchVolumes", num_training=1, num_test=args.volumes,
                              config=PhantomConfig(shape=tuple(args.volume_shape), spacing=SPACING), seed=4)  # fmt: skip
    preprocessed = root / "nnUNet_preprocessed" / TRAIN_NAME
    if not (preprocessed / "nnUNetPlans.json").is_file():
        run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(TRAIN_ID), "-c", "3d_fullres", "-np", "1",
             "-npfp", "1"], env)  # fmt: skip
    nnunet_plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    patch = nnunet_plans["configurations"]["3d_fullres"]["patch_size"]
    if not (preprocessed / "PUMITPlans.json").is_file():
        run([str(BIN / "pumit_plan_and_preprocess"), "-d", str(TRAIN_ID), "-c", "3d_fullres", "-np", "1",
             "-npfp", "1", "--model", args.model, "--patch_size_3d", *map(str, patch),
             "--batch_size", "2"], env)  # fmt: skip
    pumit_plans = json.loads((preprocessed / "PUMITPlans.json").read_text())
    return {
        "nnunet_patch": patch,
        "pumit_patch": pumit_plans["configurations"]["3d_fullres"]["patch_size"],
        "nnunet_batch": nnunet_plans["configurations"]["3d_fullres"]["batch_size"],
        "pumit_batch": pumit_plans["configurations"]["3d_fullres"]["batch_size"],
    }


def model_folder(root: Path, label: str) -> Path:
    trainer, plans = TRAINERS[label]
    return root / "nnUNet_results" / TRAIN_NAME / f"{trainer}__{plans}__3d_fullres"


def train(root: Path, label: str, iterations: int) -> float:
    """`iterations` training iterations (one epoch, no validation) into the model folder; seconds taken."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    if (model_folder(root, label) / "fold_0" / "checkpoint_final.pth").is_file():
        return 0.0
    trainer_name, plans = TRAINERS[label]
    start = time.perf_counter()
    trainer = get_trainer_from_args(
        str(TRAIN_ID), "3d_fullres", 0, trainer_name, plans, device=torch.device("cpu")
    )
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    return time.perf_counter() - start


def predictors(root: Path, args) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    result = {}
    for label in TRAINERS:
        predictor = nnUNetPredictor(
            tile_step_size=args.step_size, use_gaussian=True, use_mirroring=args.mirroring,
            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False,
        )  # fmt: skip
        predictor.initialize_from_trained_model_folder(
            str(model_folder(root, label)), (0,), "checkpoint_final.pth"
        )
        result[label] = predictor
    return result


class SlidingWindowTimer:
    """Wraps a predictor's ``predict_sliding_window_return_logits`` to add up its seconds."""

    def __init__(self, predictor):
        self.seconds = 0.0
        self.tiles = 0
        inner = predictor.predict_sliding_window_return_logits
        slicers = predictor._internal_get_sliding_window_slicers

        def timed(image):
            start = time.perf_counter()
            try:
                return inner(image)
            finally:
                self.seconds += time.perf_counter() - start

        def counted(image_size):
            found = slicers(image_size)
            self.tiles += len(found)
            return found

        predictor.predict_sliding_window_return_logits = timed
        predictor._internal_get_sliding_window_slicers = counted


def time_predictions(predictors: dict, volumes: list[Path], repeats: int) -> list[dict]:
    """Seconds per volume, every model on every volume `repeats` times, the models taking turns (the first
    model alternates), after one untimed prediction each (warm-up)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    images = [SimpleITKIO().read_images([str(v)]) for v in volumes]
    labels = list(predictors)
    timers = {label: SlidingWindowTimer(p) for label, p in predictors.items()}
    for label in labels:
        predictors[label].predict_single_npy_array(*images[0])
    rows = []
    for index, (volume, (image, properties)) in enumerate(zip(volumes, images, strict=True)):
        row = {"volume": volume.name, "shape": list(image.shape[1:]),
               **{label: {"seconds": [], "sliding_window_seconds": []} for label in labels}}  # fmt: skip
        for repeat in range(repeats):
            order = labels if (index + repeat) % 2 == 0 else labels[::-1]
            for label in order:
                timer = timers[label]
                timer.seconds, timer.tiles = 0.0, 0
                start = time.perf_counter()
                predictors[label].predict_single_npy_array(image, properties)
                row[label]["seconds"].append(round(time.perf_counter() - start, 3))
                row[label]["sliding_window_seconds"].append(round(timer.seconds, 3))
                row[label]["tiles"] = timer.tiles
                row[label]["load_average_1min"] = round(os.getloadavg()[0], 2)
        for label in labels:
            row[label]["median_seconds"] = sorted(row[label]["seconds"])[len(row[label]["seconds"]) // 2]
        row["ratio_pumit_over_nnunet"] = round(
            row["pumit"]["median_seconds"] / row["nnunet"]["median_seconds"], 3
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def forward_parts(predictors: dict, repeats: int) -> dict:
    """Median seconds of one tile's forward pass and of each network's parts, under torch.inference_mode with
    the predictor's thread count (nnU-Net sets it to nnUNet_def_n_proc for prediction)."""
    import torch
    from nnunetv2.configuration import default_num_processes

    threads = torch.get_num_threads()
    torch.set_num_threads(min(default_num_processes, threads))
    result = {"threads": torch.get_num_threads()}
    try:
        for label, predictor in predictors.items():
            network = predictor.network.eval()
            patch = predictor.configuration_manager.patch_size
            result[label] = {"patch": list(patch), **_network_parts(label, network, patch, repeats)}
            result[label]["parameters"] = sum(p.numel() for p in network.parameters())
    finally:
        torch.set_num_threads(threads)
    return result


def _network_parts(label: str, network, patch, repeats: int) -> dict:
    import torch

    from pumit_seg.models.vit import tokens_to_grid

    torch.manual_seed(0)
    x = torch.randn(1, 1, *patch)
    with torch.inference_mode():
        network(x)  # warm-up
        parts = {"whole": _median_time(lambda: network(x), repeats)}
        if label == "pumit":
            aniso_d, blocks = network.aniso_d, tuple(network.pyramid_blocks)
            encoded = network.encoder(x, aniso_d, return_blocks=blocks)
            features = [tokens_to_grid(t[:, 1:], encoded.grid) for t in encoded.block_outputs]
            skips = network.full_res_branch(x, aniso_d) + network.pyramid(features, aniso_d)
            parts["encoder"] = _median_time(
                lambda: network.encoder(x, aniso_d, return_blocks=blocks), repeats
            )
            parts["full_res_branch"] = _median_time(lambda: network.full_res_branch(x, aniso_d), repeats)
            parts["pyramid"] = _median_time(lambda: network.pyramid(features, aniso_d), repeats)
            parts["decoder"] = _median_time(lambda: network.decoder(skips, aniso_d), repeats)
        else:
            skips = network.encoder(x)
            parts["encoder"] = _median_time(lambda: network.encoder(x), repeats)
            parts["decoder"] = _median_time(lambda: network.decoder(skips), repeats)
    return {k: round(v, 4) for k, v in parts.items()}


def forward_flops(predictors: dict) -> dict:
    """Forward FLOPs of one tile (FlopCounterMode; matmuls and convolutions) per network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    result = {}
    for label, predictor in predictors.items():
        network = predictor.network
        patch = predictor.configuration_manager.patch_size
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            network(torch.zeros(1, 1, *patch))
        result[label] = float(counter.get_total_flops())
    return result


def measure_inference_cuts(predictor, volume: Path, repeats: int, window_repeats: int = 3) -> dict:
    """Each inference cut undone (a copy of the PUMIT network) next to the network as it is: one tile's forward
    pass (`repeats` times) and the sliding window over `volume` (`window_repeats` times), taking turns, and the largest
    difference of the logits."""
    import copy

    import torch
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from step_cost import INFERENCE_CUTS, without_inference_cut

    image = torch.from_numpy(
        SimpleITKIO().read_images([str(volume)])[0]
    ).float()  # raw intensities: cost only
    patch = predictor.configuration_manager.patch_size
    now = predictor.network.eval()
    result = {}
    threads = torch.get_num_threads()
    every_cut = {**INFERENCE_CUTS, "all": "every inference cut above undone at once"}
    for cut, description in every_cut.items():
        before = copy.deepcopy(now)
        for undone in INFERENCE_CUTS if cut == "all" else [cut]:
            before = without_inference_cut(before, undone)
        variants = {"after": now, "before": before}
        torch.manual_seed(0)
        x = torch.randn(1, image.shape[0], *patch)
        tile = {name: [] for name in variants}
        window = {name: [] for name in variants}
        outputs = {}
        torch.set_num_threads(min(default_num_processes, threads))
        try:
            with torch.inference_mode():
                for name, network in variants.items():
                    outputs[name] = network(x)  # warm-up
                for _ in range(repeats):
                    for name, network in variants.items():
                        start = time.perf_counter()
                        network(x)
                        tile[name].append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
        for _ in range(window_repeats):
            for name, network in variants.items():
                predictor.network = network
                start = time.perf_counter()
                predictor.predict_logits_from_preprocessed_data(image)
                window[name].append(time.perf_counter() - start)
        predictor.network = now
        result[cut] = {
            "description": description,
            "tile_seconds": {k: [round(t, 4) for t in v] for k, v in tile.items()},
            "sliding_window_seconds": {k: [round(t, 3) for t in v] for k, v in window.items()},
            "volume": volume.name,
            "max_abs_logit_difference": float((outputs["after"] - outputs["before"]).abs().max()),
            "max_abs_logit": float(outputs["after"].abs().max()),
        }
        print(json.dumps({cut: result[cut]}), flush=True)
    return result


def cut_lines(cuts: dict) -> list[str]:
    lines = [
        "Inference cost cuts: each undone (before) next to the network as it is (after), taking turns; minimum "
        "and median seconds (the minimum is the least disturbed by other jobs).",
        "",
        "| cut | one tile min before / after | median before / after | sliding window (one volume) min before / "
        "after | largest logit difference | what it is |",
        "|---|---|---|---|---|---|",
    ]
    for cut, entry in cuts.items():
        tile, window = entry["tile_seconds"], entry["sliding_window_seconds"]

        def median(values):
            return sorted(values)[len(values) // 2]

        lines.append(
            f"| {cut} | {min(tile['before']):.3f} / {min(tile['after']):.3f} s "
            f"({min(tile['after']) / min(tile['before']) - 1:+.0%}) | {median(tile['before']):.3f} / "
            f"{median(tile['after']):.3f} s | {min(window['before']):.2f} / {min(window['after']):.2f} s "
            f"({min(window['after']) / min(window['before']) - 1:+.0%}) | {entry['max_abs_logit_difference']:.1e} "
            f"(logits up to {entry['max_abs_logit']:.1f}) | {entry['description']} |"
        )
    return lines


def analysis_lines(result: dict) -> list[str]:
    """Where PUMIT's extra prediction time goes and why the rest is not cut (from the measured figures)."""
    parts, flops = result["forward_parts"], result["forward_flops"]
    p, n = parts["pumit"], parts["nnunet"]
    ratios = [row["ratio_pumit_over_nnunet"] for row in result["volumes"]]
    from pumit_seg.models.sac import aniso_d_from_spacing
    from pumit_seg.planners.memory_model import token_grid

    grid = token_grid(p["patch"], aniso_d_from_spacing(SPACING))
    tokens = grid[0] * grid[1] * grid[2] + 1  # + CLS
    return [
        "Where the time goes: per tile PUMIT does "
        f"{flops['pumit'] / flops['nnunet']:.2f}x nnU-Net's FLOPs in {p['whole'] / n['whole']:.2f}x its time "
        f"(whole volumes: {min(ratios):.2f}-{max(ratios):.2f}x). Its ViT-B encoder takes {p['encoder']:.3f} s of "
        f"{p['whole']:.3f} s: at batch 1 (nnU-Net's predictor runs one tile at a time) a {'x'.join(map(str, p['patch']))} "
        f"tile is only {tokens} tokens, so every block streams its weights (about 86 M of the "
        f"{p['parameters'] / 1e6:.0f} M parameters) for a few matrix rows, a memory-bound product on the CPU; the "
        f"pyramid and decoder ({p['pyramid'] + p['decoder']:.3f} s, widths 768 / 128-512 as the reference) are the "
        "rest. Cut: the two inference cuts above (no change of function, outputs equal to float rounding, tested in "
        "tests/test_step_cost.py). Not cut, because each would change the function or the predictor: fewer or "
        "narrower layers, a smaller ViT, batching tiles (nnU-Net's predictor, not the network, picks one tile per "
        "forward pass). PyTorch's CPU convolution also sends batch-1 3D convolutions on small maps (N·C·D·H at most "
        "20480: the 1/8 and 1/16 levels here) and single-threaded 1x1x1 convolutions to its slower im2col path "
        "instead of oneDNN (torch.profiler: slow_conv3d_forward); nothing in the network chooses that. On a GPU these figures do not carry over: benchmarks/gpu_pack.sh measures prediction there.",
    ]


def markdown(result: dict) -> str:
    setup, machine = result["setup"], result["machine"]
    lines = [
        "# Prediction cost on the CPU: PUMITSegNet vs nnU-Net's default network (same tiles)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPU cores, torch {machine['torch']}, nnunetv2 "
        f"{machine['nnunetv2']}. **The machine is shared with other jobs**: 1-minute load average "
        f"{machine['load_average_before']} before, {machine['load_average_after']} after (each timing also records "
        "it); the two models take turns on every volume so that load touches both alike. nnU-Net's predictor runs "
        f"the network with {result['forward_parts']['threads']} torch thread(s) (`nnUNet_def_n_proc`).",
        "",
        f"Models: nnU-Net's default plans (`nnUNetTrainer`, patch {setup['nnunet_patch']}) and PUMIT's "
        f"(`PUMITTrainer`, ViT-{setup['model']}, default decoder, patch {setup['pumit_patch']}), each trained "
        f"{setup['iterations']} iterations on the same {setup['training_cases']} phantom CT cases (weights do not "
        f"change the cost). Prediction: `nnUNetPredictor.predict_single_npy_array`, step size {setup['step_size']}, "
        f"mirroring {'on' if setup['mirroring'] else 'off'} for both, Gaussian blending, median of "
        f"{setup['repeats']} per volume.",
        "",
        "| volume | shape | tiles | PUMIT s | nnU-Net s | ratio | PUMIT sliding window s | nnU-Net sliding window s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["volumes"]:
        p, n = row["pumit"], row["nnunet"]
        lines.append(
            f"| {row['volume']} | {'x'.join(map(str, row['shape']))} | {p['tiles']} | {p['median_seconds']:.2f} | "
            f"{n['median_seconds']:.2f} | {row['ratio_pumit_over_nnunet']:.2f} | "
            f"{sorted(p['sliding_window_seconds'])[len(p['sliding_window_seconds']) // 2]:.2f} | "
            f"{sorted(n['sliding_window_seconds'])[len(n['sliding_window_seconds']) // 2]:.2f} |"
        )
    parts, flops = result["forward_parts"], result["forward_flops"]
    lines += [
        "",
        f"One tile's forward pass (median of {result['setup']['part_repeats']}, seconds; parts timed apart):",
        "",
        "| network | parameters | forward GFLOP | whole | parts |",
        "|---|---|---|---|---|",
    ]
    for label in ("pumit", "nnunet"):
        entry = parts[label]
        part_text = ", ".join(
            f"{k} {v:.3f}" for k, v in entry.items() if k not in ("patch", "whole", "parameters")
        )
        lines.append(
            f"| {label} | {entry['parameters'] / 1e6:.1f} M | {flops[label] / 1e9:.1f} | {entry['whole']:.3f} | "
            f"{part_text} |"
        )
    if result.get("cuts"):
        lines += ["", *cut_lines(result["cuts"])]
    lines += ["", *analysis_lines(result)]
    if result.get("notes"):
        lines += ["", *[f"* {note}" for note in result["notes"]]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work-dir", default=None, help="datasets and models (kept; default: a temporary folder)"
    )
    parser.add_argument(
        "--model", default="base", choices=["tiny", "base"], help="PUMIT ViT size (default base)"
    )
    parser.add_argument("--iterations", type=int, default=5, help="training iterations per model (default 5)")
    parser.add_argument("--volumes", type=int, default=3, help="prediction volumes (default 3)")
    parser.add_argument(
        "--volume-shape", type=int, nargs=3, default=[24, 128, 128], help="about D H W voxels"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="predictions of each volume per model (default 1)"
    )
    parser.add_argument(
        "--part-repeats", type=int, default=5, help="timed forward passes per part (default 5)"
    )
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window step (nnU-Net's 0.5)")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring for both models")
    parser.add_argument("--output", default=str(RESULTS / "predict_cpu"), help="results path without suffix")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the .json at --output"
    )
    args = parser.parse_args(argv)
    if args.render:
        from pumit_seg.atomic import atomic_path

        result = json.loads(Path(args.output).with_suffix(".json").read_text())
        with atomic_path(Path(args.output).with_suffix(".md")) as tmp:
            Path(tmp).write_text(markdown(result) + "\n")
        return

    from pumit_seg.trainers.nnunet_ext_dir import nnunet_environment

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_predict_"))
    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work, cpu=True)
    os.environ.update(env)  # before nnunetv2 is imported: it reads its folders at import
    load_before = [round(v, 2) for v in os.getloadavg()]
    setup = prepare(work, env, args)
    training_seconds = {label: round(train(work, label, args.iterations), 1) for label in TRAINERS}
    from importlib.metadata import version

    import torch

    found = predictors(work, args)
    volumes = sorted((work / "nnUNet_raw" / PREDICT_NAME / "imagesTs").glob("*_0000.nii.gz"))
    rows = time_predictions(found, volumes, args.repeats)
    parts = forward_parts(found, args.part_repeats)
    result = {
        "command": "python benchmarks/bench_predict.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "nnunetv2": version("nnunetv2"), "load_average_before": load_before,
        },
        "setup": {**setup, "model": args.model, "iterations": args.iterations, "training_cases": 6,
                  "training_seconds": training_seconds, "step_size": args.step_size, "mirroring": args.mirroring,
                  "repeats": args.repeats, "part_repeats": args.part_repeats},
        "volumes": rows,
        "forward_parts": parts,
        "forward_flops": forward_flops(found),
    }  # fmt: skip
    result["cuts"] = measure_inference_cuts(found["pumit"], volumes[0], args.part_repeats)
    result["notes"] = [
        f"{label}: the trained model already in --work-dir was used (trained by an earlier run, same settings)"
        for label, seconds in training_seconds.items()
        if seconds == 0
    ]
    result["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    from pumit_seg.atomic import atomic_path, write_json_atomic

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output.with_suffix(".json"), result)
    with atomic_path(output.with_suffix(".md")) as tmp:
        Path(tmp).write_text(markdown(result) + "\n")
    print(markdown(result))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
