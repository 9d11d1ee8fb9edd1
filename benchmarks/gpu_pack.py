"""Every GPU measurement of the project in one command, sized for a short GPU slot (at most 8 minutes).

    bash benchmarks/gpu_pack.sh                           # on one CUDA GPU
    python benchmarks/gpu_pack.py --budget-s 300          # the same, a tighter budget
    python benchmarks/gpu_pack.py --reduced --allow-cpu   # tiny shapes, one step each: a CPU smoke run

Rows, in the order they run (the compiled training steps last: compilation time is the least predictable):

* ``train_eager``: one training step at the paper's BTCV configuration (ViT-B, 48x192x192, batch 4,
  14 classes, aniso_d 2, bf16 autocast), PUMITSegNet with its AdamW against nnU-Net's default network
  (`PlainConvUNet` as nnU-Net's default 3d_fullres plan builds it for that patch and spacing) with nnU-Net's
  SGD (Nesterov momentum 0.99), the two taking turns step by step in one process
  (``bench_training.wall_times``): ms per step, the ratio, model FLOPs utilisation, and each network's
  peak ``torch.cuda.max_memory_allocated`` of a steady-state step measured alone, next to the planner's
  memory model (`MemoryModel`; its estimate includes a fixed allowance for the CUDA context, which
  ``max_memory_allocated`` does not see: both with and without it are written);
* ``predict``: nnU-Net's sliding-window prediction (``nnUNetPredictor.predict_sliding_window_return_logits``,
  Gaussian blending, step 0.5, fp16 autocast as nnU-Net opens it; PUMITSegNet switches it to bf16) of one
  synthetic BTCV-sized volume (150x512x512 voxels at nnU-Net's spacing, random weights) for both networks
  at the same patch, without and with mirroring: seconds per volume;
* ``mim``: the MIM step at the paper's crop (``bench_mim.measure``: ViT-B, 160x160 in-plane by 5 x (16 >> 2)
  slices, a 5x10x10 token grid): tokens/s and MFU against the device's bf16 peak (`device_peaks`);
* ``tokenizer``: the tokenizer's training step at the paper's configuration (``bench_tokenizer``'s trainer
  and timing): steps/s for 2D and 3D crops;
* ``train_compiled``: ``train_eager`` again with both networks under ``torch.compile`` (nnU-Net's trainer
  compiles on CUDA by default).

Every row runs under a time guard (an alarm interrupts it at its share of the budget; the row is written as
``timed_out`` with what it measured so far) and is skipped, with the reason written, when the remaining
budget is below what it needs. Where a batch does not fit the GPU's memory it is halved and retried, and the
batch used is written. Results are written after every row (a killed run leaves what it measured) to
``benchmarks/results/gpu_<device name>.{json,md}`` with the device, driver, CUDA, cuDNN and torch versions
and every setting. Without CUDA the pack refuses to start (one line, exit status 2) unless ``--reduced
--allow-cpu`` asks for the CPU smoke form (tiny networks and volume, one timed step each, compile with the
``eager`` backend: it checks that every row runs and is written, its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PACK_START = time.monotonic()  # the budget counts from here, imports included
BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
DEFAULT_BUDGET_S = 480.0  # 8 minutes of wall time, start-up included
ROWS = ("train_eager", "predict", "mim", "tokenizer", "train_compiled")
# Share of the budget each row may take at most (seconds) and the least it needs to start; the full pack's
# rows on an H100-class GPU were sized from the FLOPs measured on fake tensors (bench_training.py): a
# PUMIT step ~15 TFLOP, a prediction of 150x512x512 at 48x192x192 and step 0.5 = 150 tiles (x 8 with
# mirroring), compilation of both networks 1-3 minutes.
ROW_LIMITS_S = {"train_eager": 90, "predict": 150, "mim": 60, "tokenizer": 75, "train_compiled": 300}
ROW_MINIMUM_S = {"train_eager": 30, "predict": 40, "mim": 20, "tokenizer": 20, "train_compiled": 60}
RESERVE_S = 10.0  # kept for writing the results

FULL = {
    "train": {
        "model": "base", "aniso_d": 2, "patch": [48, 192, 192], "batch": 4, "channels": 1, "classes": 14,
        "spacing": [3.0, 0.75, 0.75], "arch": {}, "repeats": 10,
    },
    "predict": {"volume": [150, 512, 512], "tile_step_size": 0.5, "mirror_axes": [0, 1, 2]},
    "mim": {"configuration": "base", "batch": 84, "warmup": 3, "steps": 10},
    "tokenizer": {"preset": "paper", "batch": 48, "warmup": 2, "steps": 5},
    "compile_backend": "inductor",
}  # fmt: skip
REDUCED = {
    "train": {
        "model": "tiny", "aniso_d": 2, "patch": [8, 64, 64], "batch": 1, "channels": 1, "classes": 3,
        "spacing": [3.0, 0.75, 0.75], "repeats": 1,
        "arch": {"decoder_channels": [8, 16, 16, 16], "full_res_channels": [4, 8]},
        "nnunet_features": {"base_features": 4, "max_features": 16},
    },
    "predict": {"volume": [10, 72, 72], "tile_step_size": 0.5, "mirror_axes": [0, 1, 2]},
    "mim": {"configuration": "tiny", "batch": 1, "warmup": 0, "steps": 1},
    "tokenizer": {"preset": "tiny", "batch": 1, "warmup": 0, "steps": 1},
    "compile_backend": "eager",
}  # fmt: skip

NO_CUDA = (
    "gpu_pack: no CUDA device is visible (torch.cuda.is_available() is False); this pack measures GPU rows "
    "only (--reduced --allow-cpu runs its tiny CPU smoke form)"
)


class RowTimeout(Exception):
    """Raised by the alarm when a row has used its share of the budget."""


@contextlib.contextmanager
def time_guard(seconds: float):
    """Interrupt the block with `RowTimeout` after `seconds` (SIGALRM; the main thread only)."""

    def interrupt(signum, frame):
        raise RowTimeout(f"stopped after its time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_halving_batch(run, batch: int, notes: list[str]):
    """`run(batch)`, halving the batch after an out-of-memory error until it fits (noted in `notes`)."""
    while True:
        try:
            return run(batch), batch
        except RuntimeError as error:
            if not is_out_of_memory(error) or batch == 1:
                raise
            notes.append(f"batch {batch} ran out of memory; halved to {batch // 2}")
        # outside the except block: its traceback no longer holds the failed run's tensors
        free_memory()
        batch //= 2


# ---------------------------------------------------------------------------------------------- environment


def environment(device) -> dict:
    import torch

    info = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["compute_capability"] = f"{properties.major}.{properties.minor}"
        info["memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["driver"] = nvidia_driver_version()
    from device_peaks import bf16_peak_tflops

    info["bf16_peak_tflops"] = bf16_peak_tflops(info["device_name"]) if device.type == "cuda" else None
    for package in ("nnunetv2", "dynamic_network_architectures"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info[package] = version(package.replace("_", "-"))
    return info


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def nvidia_driver_version() -> str | None:
    with contextlib.suppress(Exception):
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        return output.strip().splitlines()[0]
    return None


# ---------------------------------------------------------------------------------------------- training


def training_networks(config: dict):
    """{label: (factory, make_optimizer)} of PUMITSegNet (AdamW) and nnU-Net's default network (SGD)."""
    from bench_training import nnunet_factory, nnunet_optimizer, pumit_factory, pumit_optimizer

    _, pumit = pumit_factory(config)
    return {"pumit": (pumit, pumit_optimizer), "nnunet": (nnunet_factory(config), nnunet_optimizer)}


def peak_memory_alone(factory, make_optimizer, input_shape, device, autocast_dtype) -> int | None:
    """``torch.cuda.max_memory_allocated`` of the second of two training steps (the first creates the
    optimiser state) of one network alone on the device: what a trainer would see."""
    import torch

    if device.type != "cuda":
        return None
    free_memory()
    torch.manual_seed(0)
    network = factory().to(device).train()
    optimizer = make_optimizer(network)
    x = torch.randn(*input_shape, device=device)
    peak = 0
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = network(x)
            loss = sum(o.float().mean() for o in (output if isinstance(output, list) else [output]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    del network, optimizer, x, output, loss
    free_memory()
    return peak


def planner_estimate(config: dict) -> dict:
    from bench_training import pumit_arch_kwargs

    from pumit_seg.planners.memory_model import MemoryModel, count_parameters, estimate_training_memory

    arch_kwargs = pumit_arch_kwargs(config)
    model = MemoryModel()
    estimate = estimate_training_memory(
        arch_kwargs,
        count_parameters(arch_kwargs, config["channels"], config["classes"]),
        config["classes"],
        config["patch"],
        config["batch"],
        model,
    )
    return {"estimate_bytes": estimate, "estimate_bytes_without_overhead": estimate - model.overhead_bytes}


_FLOPS_CACHE: dict = {}


def model_flops(label: str, factory, config: dict, input_shape) -> float:
    """Model FLOPs of one training step (forward + backward): from ``benchmarks/results/training_cpu.json``
    where it holds this configuration (bench_training.py counted them on fake tensors), else counted now
    (fake tensors on the CPU: exact, no device time, ~10-60 s for the paper's configuration)."""
    from step_cost import step_flops

    key = (label, json.dumps(config, sort_keys=True))
    if key not in _FLOPS_CACHE:
        keys = ("model", "aniso_d", "patch", "batch", "channels", "classes", "spacing", "arch")
        with contextlib.suppress(Exception):
            for row in json.loads((RESULTS / "training_cpu.json").read_text())["rows"]:
                if (
                    all(row["config"].get(k) == config.get(k) for k in keys)
                    and "nnunet_features" not in config
                ):
                    flops = row[label]["flops"]
                    _FLOPS_CACHE[key] = flops["forward"] + flops["backward"]
        if key not in _FLOPS_CACHE:
            flops = step_flops(factory, input_shape)
            _FLOPS_CACHE[key] = flops["forward"] + flops["backward"]
    return _FLOPS_CACHE[key]


def row_training(spec: dict, device, compiled: bool, compile_backend: str, notes: list[str], partial: dict):
    import torch
    from bench_training import wall_times

    config = spec["train"]
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    networks = training_networks(config)
    input_shape = [config["batch"], config["channels"], *config["patch"]]
    partial["precision"] = "bf16 autocast" if autocast_dtype else "fp32 (CPU)"
    partial["optimizers"] = {"pumit": "AdamW (fused)", "nnunet": "SGD, Nesterov momentum 0.99"}
    partial["repeats"] = config["repeats"]
    if not compiled:
        partial["planner"] = planner_estimate(config)
        for label, (factory, make_optimizer) in networks.items():
            partial.setdefault(label, {})["max_memory_allocated_bytes"] = peak_memory_alone(
                factory, make_optimizer, input_shape, device, autocast_dtype
            )
    for label, (factory, _) in networks.items():
        partial.setdefault(label, {})["model_flops_per_step"] = model_flops(
            label, factory, config, input_shape
        )
    if compiled:
        partial["compile_backend"] = compile_backend
        torch._dynamo.reset()

        def compiled_factory(factory):
            def build():
                return torch.compile(factory().to(device), backend=compile_backend)

            return build

        networks = {label: (compiled_factory(f), o) for label, (f, o) in networks.items()}
    start = time.perf_counter()
    walls = wall_times(networks, input_shape, device, config["repeats"], autocast_dtype)
    partial["seconds_with_warmup_and_compilation"] = round(time.perf_counter() - start, 2)
    from device_peaks import bf16_peak_tflops

    peak = bf16_peak_tflops(device_name(device)) if device.type == "cuda" else None
    for label, wall in walls.items():
        entry = partial[label]
        entry["ms_per_step"] = {
            k: round(1000 * v, 3) for k, v in wall.items() if k != "max_memory_allocated_bytes"
        }
        entry["mfu_bf16"] = (
            round(entry["model_flops_per_step"] / wall["step"] / (peak * 1e12), 4) if peak else None
        )
    partial["ratio_pumit_over_nnunet"] = round(walls["pumit"]["step"] / walls["nnunet"]["step"], 3)
    return partial


# ---------------------------------------------------------------------------------------------- prediction


def nnunet_predictor(network, patch, classes: int, mirror_axes, tile_step_size: float, device):
    """nnU-Net's predictor around an in-process network (no trained folder: random weights time the same)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {
        "dataset_name": "Dataset000_GPUPack",
        "plans_name": "GPUPackPlans",
        "configurations": {
            "3d_fullres": {
                "data_identifier": "gpu_pack",
                "preprocessor_name": "DefaultPreprocessor",
                "patch_size": list(patch),
                "spacing": [3.0, 0.75, 0.75],
                "architecture": {
                    "network_class_name": f"{type(network).__module__}.{type(network).__qualname__}",
                    "arch_kwargs": {},
                    "_kw_requires_import": [],
                },
            }
        },
    }
    dataset_json = {
        "labels": {"background": 0, **{f"organ{i}": i for i in range(1, classes)}},
        "channel_names": {"0": "CT"},
        "file_ending": ".nii.gz",
    }
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(
        tile_step_size=tile_step_size,
        use_mirroring=mirror_axes is not None,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, plans_manager, plans_manager.get_configuration("3d_fullres"), None, dataset_json,
        "GPUPack", tuple(mirror_axes) if mirror_axes is not None else None,
    )  # fmt: skip
    return predictor


def row_predict(spec: dict, device, notes: list[str], partial: dict):
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    from step_cost import nnunet_default_network

    from pumit_seg.models.seg_net import PUMITSegNet

    config, predict = spec["train"], spec["predict"]
    from bench_training import pumit_arch_kwargs

    arch_kwargs = pumit_arch_kwargs(config)
    builders = {
        "pumit": lambda: PUMITSegNet(config["channels"], config["classes"], False, **arch_kwargs),
        "nnunet": lambda: nnunet_default_network(
            config["patch"],
            config["spacing"],
            config["channels"],
            config["classes"],
            deep_supervision=False,
            **config.get("nnunet_features", {}),
        ),
    }
    networks = {}
    for label, build in builders.items():
        torch.manual_seed(0)
        networks[label] = build().to(device).eval()
    torch.manual_seed(1)
    volume = torch.randn(
        config["channels"], *predict["volume"]
    )  # on the CPU, as nnU-Net's preprocessing gives it
    steps = compute_steps_for_sliding_window(predict["volume"], config["patch"], predict["tile_step_size"])
    partial.update(
        volume=predict["volume"], patch=config["patch"], tile_step_size=predict["tile_step_size"],
        tiles=len(steps[0]) * len(steps[1]) * len(steps[2]), gaussian=True,
        autocast="fp16 (nnU-Net's predictor; PUMITSegNet runs it as bf16)" if device.type == "cuda" else "none (CPU)",
        seconds_per_volume={},
    )  # fmt: skip
    # warm-up: one tile each (cuDNN picks its kernels; nnU-Net's predictor turns cudnn.benchmark on)
    for network in networks.values():
        predictor = nnunet_predictor(network, config["patch"], config["classes"], None, 0.5, device)
        predictor.predict_sliding_window_return_logits(torch.zeros(config["channels"], *config["patch"]))
    for mirroring in (False, True):
        key = "mirroring" if mirroring else "no_mirroring"
        for label, network in networks.items():  # the two networks take turns
            predictor = nnunet_predictor(
                network, config["patch"], config["classes"], predict["mirror_axes"] if mirroring else None,
                predict["tile_step_size"], device,
            )  # fmt: skip
            synchronize(device)
            start = time.perf_counter()
            predictor.predict_sliding_window_return_logits(volume)
            synchronize(device)
            partial["seconds_per_volume"].setdefault(key, {})[label] = round(time.perf_counter() - start, 3)
            free_memory()
        times = partial["seconds_per_volume"][key]
        times["ratio_pumit_over_nnunet"] = round(times["pumit"] / times["nnunet"], 3)
    return partial


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- pre-training


def row_mim(spec: dict, device, notes: list[str], partial: dict):
    import torch
    from bench_mim import CONFIGURATIONS, measure

    mim = spec["mim"]
    vit, _, in_plane, depth_units, aniso_d, default_batch, _ = CONFIGURATIONS[mim["configuration"]]
    partial.update(
        configuration=mim["configuration"], vit=vit, crop=[depth_units * max(16 >> aniso_d, 1), in_plane, in_plane],
        aniso_d=aniso_d, requested_batch=mim["batch"],
    )  # fmt: skip

    def run(batch):
        torch.manual_seed(0)
        return measure(mim["configuration"], device, mim["steps"], mim["warmup"], batch, None)

    result, batch = with_halving_batch(run, mim["batch"], notes)
    partial.update(result)
    partial["batch"] = batch
    return partial


def row_tokenizer(spec: dict, device, notes: list[str], partial: dict):
    from bench_tokenizer import BenchTokenizerTrainer, RandomCropLoader, time_steps

    from pumit_seg.trainers.pretrain_base import config_from_args
    from pumit_seg.trainers.tokenizer_trainer import TokenizerConfig

    tokenizer = spec["tokenizer"]
    partial.update(
        preset=tokenizer["preset"], requested_batch=tokenizer["batch"], lpips="off (no weights here)"
    )

    def run(batch):
        values = {
            "store": "random",
            "output_dir": tempfile.mkdtemp(prefix="gpu_pack_tokenizer_"),
            "device": device.type,
            "lpips_weights": (),
            "perceptual_weight": 0.0,
        }
        if tokenizer["preset"] == "tiny":
            values["preset"] = "tiny"
        config = config_from_args(TokenizerConfig, values)
        config.batch_size = batch
        trainer = BenchTokenizerTrainer(config)
        try:
            in_plane, deepest = config.crop_in_plane, config.crop_depth_units * 16
            runs = partial.setdefault("runs", {})  # kept as they come: a timed-out row keeps what it measured
            for kind, depth, aniso_d in (("2D", 1, 5), ("3D", deepest, 0)):
                runs[kind] = time_steps(
                    trainer,
                    RandomCropLoader(batch, depth, in_plane, aniso_d),
                    tokenizer["warmup"],
                    tokenizer["steps"],
                )
            partial["precision"] = trainer.precision
            partial["parameters"] = sum(p.numel() for p in trainer.model.parameters())
            return runs
        finally:
            trainer.close()
            free_memory()

    def run_fresh(batch):
        partial["runs"] = {}
        return run(batch)

    runs, batch = with_halving_batch(run_fresh, tokenizer["batch"], notes)
    partial.update(batch=batch, runs=runs)
    return partial


# ---------------------------------------------------------------------------------------------- the pack


def run_pack(args) -> dict:
    import torch

    started = PACK_START
    reduced = args.reduced
    spec = REDUCED if reduced else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer and predictor
    if args.threads:
        torch.set_num_threads(args.threads)
    name = device_name(device)
    stem = (
        "gpu_"
        + "".join(c if c.isalnum() or c in "-." else "_" for c in name)
        + ("_reduced" if reduced else "")
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["python benchmarks/gpu_pack.py", *sys.argv[1:]]) if args.command is None else args.command,
        "reduced": reduced,
        "budget_s": args.budget_s,
        "environment": environment(device),
        "settings": {**spec, "row_limits_s": ROW_LIMITS_S, "row_minimum_s": ROW_MINIMUM_S,
                     "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)},
        "rows": {},
    }  # fmt: skip
    runners = {
        "train_eager": lambda notes, partial: row_training(
            spec, device, False, spec["compile_backend"], notes, partial
        ),
        "predict": lambda notes, partial: row_predict(spec, device, notes, partial),
        "mim": lambda notes, partial: row_mim(spec, device, notes, partial),
        "tokenizer": lambda notes, partial: row_tokenizer(spec, device, notes, partial),
        "train_compiled": lambda notes, partial: row_training(
            spec, device, True, spec["compile_backend"], notes, partial
        ),
    }
    for row in args.rows:
        remaining = args.budget_s - (time.monotonic() - started) - RESERVE_S
        limit = min(ROW_LIMITS_S[row], remaining)
        notes: list[str] = []
        partial: dict = {}
        entry = {"status": "skipped", "limit_s": round(limit, 1)}
        print(f"gpu_pack: {row} (limit {limit:.0f} s) ...", flush=True)
        if not reduced and remaining < ROW_MINIMUM_S[row]:
            entry["reason"] = (
                f"budget spent: {max(remaining, 0):.0f} s left of {args.budget_s:.0f} s, the row needs at least "
                f"{ROW_MINIMUM_S[row]} s"
            )
        else:
            row_start = time.monotonic()
            try:
                with time_guard(limit if not reduced else max(limit, 60)):
                    runners[row](notes, partial)
                entry["status"] = "ok"
            except RowTimeout as error:
                entry.update(status="timed_out", reason=str(error))
            except Exception as error:  # a failed row must not cost the others their slot
                entry.update(status="failed", reason=f"{type(error).__name__}: {error}"[:2000])
                traceback.print_exc()
            entry["seconds"] = round(time.monotonic() - row_start, 2)
            free_memory()
        entry.update(partial)
        if notes:
            entry["notes"] = notes
        result["rows"][row] = entry
        print(f"gpu_pack: {row}: {entry['status']}" + (f" ({entry.get('reason')})" if entry.get("reason") else ""),
              flush=True)  # fmt: skip
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        write(result, out_dir, stem)
    result["environment"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    write(result, out_dir, stem)
    return result


def write(result: dict, out_dir: Path, stem: str) -> None:
    from pumit_seg.atomic import atomic_path, write_json_atomic

    write_json_atomic(out_dir / f"{stem}.json", result)
    with atomic_path(out_dir / f"{stem}.md") as tmp:
        Path(tmp).write_text(markdown(result) + "\n")


def _gib(value) -> str:
    return f"{value / 2**30:.2f} GiB" if value else "n/a"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# GPU measurement pack: {env['device_name']}"
        + (" (reduced CPU smoke form: figures mean nothing)" if result["reduced"] else ""),
        "",
        f"Command: `{result['command']}`; {result['elapsed_s']} s of a {result['budget_s']:.0f} s budget.",
        "",
        f"Device {env['device']} ({env['device_name']}), driver {env.get('driver')}, CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}, torch {env['torch']}, nnunetv2 {env.get('nnunetv2')}, bf16 peak "
        f"{env['bf16_peak_tflops'] or 'unknown'} TFLOP/s, {env['cpu_count']} CPU cores, load average "
        f"{env['load_average']}. Every setting is in the .json next to this file.",
        "",
    ]
    rows = result["rows"]
    for name in ROWS:
        if name not in rows:
            continue
        entry = rows[name]
        lines += [f"## {name}: {entry['status']}", ""]
        if entry.get("reason"):
            lines += [f"{entry['reason']}", ""]
        lines += _row_lines(name, entry, result)
        for note in entry.get("notes", []):
            lines.append(f"* {note}")
        lines.append("")
    return "\n".join(lines)


def _row_lines(name: str, entry: dict, result: dict) -> list[str]:
    settings = result["settings"]
    lines = []
    if name.startswith("train") and "pumit" in entry and "ms_per_step" in entry["pumit"]:
        config = settings["train"]
        lines += [
            f"ViT-{config['model']}, patch {'x'.join(map(str, config['patch']))}, batch {config['batch']}, "
            f"{config['classes']} classes, {entry.get('precision')}, median of {entry.get('repeats')} steps after one "
            f"warm-up, the two networks taking turns"
            + (f"; torch.compile backend {entry.get('compile_backend')}" if name == "train_compiled" else "")
            + ".",
            "",
            "| | PUMITSegNet (AdamW) | nnU-Net default (SGD) | ratio |",
            "|---|---|---|---|",
        ]
        p, n = entry["pumit"], entry["nnunet"]
        for key in ("forward", "backward", "optimizer", "step"):
            a, b = p["ms_per_step"][key], n["ms_per_step"][key]
            lines.append(
                f"| ms {key} | {a:.1f} | {b:.1f} | {a / b:.2f} |" if b else f"| ms {key} | {a} | {b} | |"
            )
        lines.append(
            f"| model TFLOP per step | {p['model_flops_per_step'] / 1e12:.3g} | {n['model_flops_per_step'] / 1e12:.3g} | |"
        )
        mfu = [f"{100 * e['mfu_bf16']:.1f} %" if e.get("mfu_bf16") is not None else "n/a" for e in (p, n)]
        lines.append(f"| MFU (bf16 peak) | {mfu[0]} | {mfu[1]} | |")
        if "max_memory_allocated_bytes" in p:
            lines.append(
                f"| peak max_memory_allocated (alone) | {_gib(p['max_memory_allocated_bytes'])} | "
                f"{_gib(n['max_memory_allocated_bytes'])} | |"
            )
        if "planner" in entry:
            planner = entry["planner"]
            lines += [
                "",
                f"Planner memory model for PUMITSegNet: {_gib(planner['estimate_bytes'])} "
                f"({_gib(planner['estimate_bytes_without_overhead'])} without its CUDA-context allowance) vs measured "
                f"{_gib(p.get('max_memory_allocated_bytes'))}.",
            ]
        if "seconds_with_warmup_and_compilation" in entry:
            lines.append(f"Timing with warm-up{' and compilation' if name == 'train_compiled' else ''}: "
                         f"{entry['seconds_with_warmup_and_compilation']} s.")  # fmt: skip
    elif name == "predict" and entry.get("seconds_per_volume"):
        lines += [
            f"Volume {'x'.join(map(str, entry['volume']))}, patch {'x'.join(map(str, entry['patch']))}, step "
            f"{entry['tile_step_size']} ({entry['tiles']} tiles), Gaussian blending, autocast {entry['autocast']}.",
            "",
            "| | PUMITSegNet s/volume | nnU-Net default s/volume | ratio |",
            "|---|---|---|---|",
        ]
        for key, times in entry["seconds_per_volume"].items():
            if "ratio_pumit_over_nnunet" in times:
                lines.append(
                    f"| {key.replace('_', ' ')} | {times['pumit']:.2f} | {times['nnunet']:.2f} | "
                    f"{times['ratio_pumit_over_nnunet']:.2f} |"
                )
    elif name == "mim" and "tokens_per_s" in entry:
        mfu = f"{100 * entry['mfu']:.1f} %" if entry.get("mfu") is not None else "n/a (peak unknown)"
        lines += [
            f"ViT-{entry['vit']}, crop {'x'.join(map(str, entry['crop']))} (token grid "
            f"{'x'.join(map(str, entry['token_grid']))}), batch {entry['batch']} (requested "
            f"{entry['requested_batch']}), {entry['precision']}, {entry['steps']} timed steps.",
            "",
            "| s/step | tokens/s | model GFLOP/step | TFLOP/s | MFU |",
            "|---|---|---|---|---|",
            f"| {entry['seconds_per_step']:.4f} | {entry['tokens_per_s']:.0f} | {entry['model_gflop_per_step']:.1f} | "
            f"{entry['achieved_tflops']:.1f} | {mfu} |",
        ]
    elif name == "tokenizer" and "runs" in entry:
        lines += [
            f"Preset {entry['preset']}, batch {entry.get('batch', 'n/a')} (requested {entry['requested_batch']}), precision "
            f"{entry.get('precision')}, LPIPS {entry['lpips']}.",
            "",
            "| crops | aniso_d | batch | steps/s | samples/s |",
            "|---|---|---|---|---|",
        ]
        for kind, run in entry["runs"].items():
            lines.append(
                f"| {kind} {'x'.join(map(str, run['crop'][1:]))} | {run['aniso_d']} | {run['batch_size']} | "
                f"{run['steps_per_s']} | {run['samples_per_s']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reduced", action="store_true", help="tiny shapes, one timed step each (smoke form)"
    )
    parser.add_argument("--allow-cpu", action="store_true", help="with --reduced: run on the CPU")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-time budget (default 480)"
    )
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="run only these rows")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where gpu_<device>.{json,md} go")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)  # the wrapper's command line
    args = parser.parse_args(argv)
    if args.allow_cpu and not args.reduced:
        parser.error("--allow-cpu needs --reduced: the full pack on a CPU would take hours")
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(NO_CUDA, file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCHMARKS))  # bench_training, bench_mim, bench_tokenizer, device_peaks
    result = run_pack(args)
    print(json.dumps({row: entry["status"] for row, entry in result["rows"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
