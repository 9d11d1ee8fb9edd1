"""What one training step of PUMITSegNet costs next to nnU-Net's default network at the same patch.

    python benchmarks/bench_training.py [--config paper_btcv cpu_small ...] [--skip-wall] [--tag NAME]
    python benchmarks/bench_training.py --calibrate      # fit the planner's memory model

For each configuration (``CONFIGS`` below; ``paper_btcv`` is the paper's BTCV fine-tuning: ViT-B,
48x192x192, batch 4, aniso_d 2, 14 classes) and for both networks:

* model FLOPs of one training step, forward and backward (`torch.utils.flop_counter`, fake tensors: nothing
  is allocated), and for PUMITSegNet per part (encoder, full-resolution branch, pyramid, decoder);
* peak memory of a steady-state AdamW step (`torch.distributed._tools.mem_tracker` on fake tensors), in
  fp32 and under a bf16 autocast (the CPU autocast stands in for CUDA's), with the planner's estimate;
* wall time of forward, backward and the optimiser step on this machine (real tensors; only for
  configurations marked ``wall``: the paper's step costs ~15 TFLOPs, minutes on two CPU cores), and, on a
  GPU, ``torch.cuda.max_memory_allocated`` and the model FLOPs utilisation in bf16. Each network takes its
  trainer's optimiser: AdamW (fused where supported, `build_adamw`) for PUMIT, SGD with Nesterov momentum
  for nnU-Net;
* the cost cuts (`benchmarks/step_cost.py` `COST_CUTS`): the same measurements with each cut undone
  ("before") next to the network as it is ("after").

Results go to ``benchmarks/results/training_<tag>.json`` and ``.md`` with the machine and its load.

``--calibrate`` measures the bf16 peak of the activations and temporaries of a forward + backward pass over ``CALIBRATION_GRID`` (ViT size, patch, batch, aniso_d, gradient checkpointing), fits the
planner's per-element constants (`pumit_seg.planners.memory_model.MemoryModel`) by least squares and
writes ``benchmarks/results/memory_calibration.json`` (the constants there are copied into MemoryModel).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from device_peaks import bf16_peak_tflops
from step_cost import (
    COST_CUTS,
    activation_peak_memory,
    adamw_for_tracking,
    network_without_cut,
    nnunet_default_network,
    nnunet_sgd,
    pumit_part_flops,
    step_flops,
    step_peak_memory,
)

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.models.seg_net import PUMITSegNet, build_arch_kwargs
from pumit_seg.planners.memory_model import (
    ACTIVATION_TERMS,
    MemoryModel,
    estimate_training_memory,
    token_grid,
)
from pumit_seg.trainers.optim import build_adamw

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

CONFIGS = {
    "paper_btcv": {
        "model": "base", "aniso_d": 2, "patch": [48, 192, 192], "batch": 4, "channels": 1, "classes": 14,
        "spacing": [3.0, 0.75, 0.75], "arch": {}, "wall": False,
    },
    "cpu_small": {
        "model": "tiny", "aniso_d": 2, "patch": [16, 96, 96], "batch": 2, "channels": 1, "classes": 14,
        "spacing": [3.0, 0.75, 0.75], "arch": {}, "wall": True,
    },
}  # fmt: skip


CALIBRATION_GRID = [
    # (model, aniso_d, patch, batch, grad_checkpointing)
    ("tiny", 2, [16, 64, 64], 2, False),
    ("tiny", 2, [32, 128, 128], 2, False),
    ("tiny", 0, [32, 64, 64], 2, False),
    ("tiny", 5, [1, 128, 128], 4, False),
    ("tiny", 2, [32, 128, 128], 2, True),
    ("base", 2, [16, 96, 96], 1, False),
    ("base", 2, [32, 128, 128], 2, False),
    ("base", 2, [32, 128, 128], 2, True),
    ("base", 1, [32, 128, 128], 1, False),
]
CALIBRATION_CLASSES = 14


def calibrate() -> dict:
    """Measured activation peaks over CALIBRATION_GRID and the least-squares constants of the memory model."""
    import numpy as np

    from pumit_seg.planners.memory_model import memory_units

    rows = []
    for model, aniso_d, patch, batch, checkpointing in CALIBRATION_GRID:
        spatial_dims = 2 if aniso_d == 5 and patch[0] == 1 else 3
        arch_kwargs = build_arch_kwargs(
            model, spatial_dims, aniso_d, vit_overrides={"grad_checkpointing": checkpointing}
        )
        shape_patch = patch[1:] if spatial_dims == 2 else patch
        arch_kwargs["vit"]["pos_grid_shape"] = token_grid(shape_patch, aniso_d)

        def factory(arch_kwargs=arch_kwargs):
            return PUMITSegNet(1, CALIBRATION_CLASSES, True, **arch_kwargs)

        print(
            f"calibration: {model} aniso_d {aniso_d} patch {patch} batch {batch} ckpt {checkpointing}",
            flush=True,
        )
        activations = activation_peak_memory(factory, [batch, 1, *shape_patch], torch.bfloat16)
        num_parameters = sum(p.numel() for p in _meta(factory).parameters())
        units = memory_units(arch_kwargs, num_parameters, CALIBRATION_CLASSES, shape_patch, batch)
        rows.append(
            {
                "model": model, "aniso_d": aniso_d, "patch": patch, "batch": batch, "grad_checkpointing": checkpointing,
                "measured_activation_bytes": activations, "units": units,
            }
        )  # fmt: skip
    keys = list(ACTIVATION_TERMS)
    a = np.array([[row["units"][k] for k in keys] for row in rows])
    y = np.array([row["measured_activation_bytes"] for row in rows])
    # relative least squares: every configuration counts the same, small or large
    weights = 1 / y
    from scipy.optimize import nnls

    coefficients, _ = nnls(a * weights[:, None], y * weights)  # bytes per element cannot be negative
    fitted = a @ coefficients
    for row, estimate in zip(rows, fitted, strict=True):
        row["fitted_activation_bytes"] = float(estimate)
        row["relative_error"] = float(estimate / row["measured_activation_bytes"] - 1)
    return {
        "constants": {ACTIVATION_TERMS[key]: float(c) for key, c in zip(keys, coefficients, strict=True)},
        "max_relative_error": float(max(abs(row["relative_error"]) for row in rows)),
        "rows": rows,
    }


def pumit_arch_kwargs(config: dict) -> dict:
    arch_kwargs = build_arch_kwargs(config["model"], 3, config["aniso_d"], **config["arch"])
    arch_kwargs["vit"]["pos_grid_shape"] = token_grid(config["patch"], config["aniso_d"])  # as the planner
    return arch_kwargs


def pumit_factory(config: dict):
    arch_kwargs = pumit_arch_kwargs(config)
    return arch_kwargs, lambda: PUMITSegNet(config["channels"], config["classes"], True, **arch_kwargs)


def pumit_optimizer(network, **adamw_kwargs):
    """PUMITTrainer's optimiser (its learning rate and weight decay do not change the cost)."""
    return build_adamw(network, lr=1e-4, weight_decay=0.05, **adamw_kwargs)


def nnunet_optimizer(network):
    return nnunet_sgd(network.parameters())


def nnunet_factory(config: dict):
    """nnU-Net's default network for the configuration (``nnunet_features``: narrower widths, smoke runs only)."""
    return lambda: nnunet_default_network(
        config["patch"],
        config["spacing"],
        config["channels"],
        config["classes"],
        **config.get("nnunet_features", {}),
    )


def wall_times(variants: dict, input_shape, device: torch.device, repeats: int, autocast_dtype=None) -> dict:
    """Median seconds of forward, backward and optimiser step of each variant, ``{name: (factory,
    make_optimizer)}``, over `repeats` steps after one warm-up step. The variants take turns step by step, so
    that a machine getting slower or faster during the run (other load, clocks) touches all of them alike."""
    x = torch.randn(*input_shape, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs = {}
    for name, (factory, make_optimizer) in variants.items():
        torch.manual_seed(0)
        network = factory().to(device).train()
        runs[name] = (network, make_optimizer(network), {"forward": [], "backward": [], "optimizer": []})
    peaks = {}
    for step in range(repeats + 1):
        for name, (network, optimizer, times) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = network(x)
                loss = sum(o.float().mean() for o in (output if isinstance(output, list) else [output]))
            sync()
            forward_end = time.perf_counter()
            loss.backward()
            sync()
            backward_end = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            end = time.perf_counter()
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            if step:  # the first step is warm-up (allocator, kernels)
                times["forward"].append(forward_end - start)
                times["backward"].append(backward_end - forward_end)
                times["optimizer"].append(end - backward_end)
    results = {}
    for name, (_, _, times) in runs.items():
        result = {key: sorted(values)[len(values) // 2] for key, values in times.items()}
        result["step"] = sum(result.values())
        if device.type == "cuda":
            result["max_memory_allocated_bytes"] = peaks[name]
        results[name] = result
    return results


def bench_config(name: str, config: dict, skip_wall: bool, repeats: int, with_cuts: bool) -> dict:
    input_shape = [config["batch"], config["channels"], *config["patch"]]
    arch_kwargs, pumit = pumit_factory(config)
    nnunet = nnunet_factory(config)
    row = {"config": {"name": name, **config}}
    tracked_optimizers = {"pumit": adamw_for_tracking, "nnunet": nnunet_sgd}
    for label, factory in (("pumit", pumit), ("nnunet", nnunet)):
        print(f"{name} / {label}: FLOPs and memory on fake tensors ...", flush=True)
        entry = {
            "parameters": sum(p.numel() for p in _meta(factory).parameters()),
            "flops": step_flops(factory, input_shape),
            "peak_memory_fp32": step_peak_memory(
                factory, input_shape, make_optimizer=tracked_optimizers[label]
            ),
            "peak_memory_bf16": step_peak_memory(
                factory, input_shape, torch.bfloat16, make_optimizer=tracked_optimizers[label]
            ),
        }
        if label == "pumit":
            entry["flops_per_part"] = pumit_part_flops(
                arch_kwargs, config["channels"], config["classes"], input_shape
            )
            model = MemoryModel()
            entry["planner_estimate_bytes_without_overhead"] = (
                estimate_training_memory(
                    arch_kwargs,
                    entry["parameters"],
                    config["classes"],
                    config["patch"],
                    config["batch"],
                    model,
                )
                - model.overhead_bytes
            )
        row[label] = entry
    if config["wall"] and not skip_wall:
        print(f"{name}: wall time on {DEVICE}, the two networks taking turns ...", flush=True)
        walls = wall_times(
            {"pumit": (pumit, pumit_optimizer), "nnunet": (nnunet, nnunet_optimizer)},
            input_shape,
            DEVICE,
            repeats,
            AUTOCAST_DTYPE,
        )
        for label, wall in walls.items():
            row[label]["wall_seconds"] = wall
            peak = bf16_peak_tflops(DEVICE_NAME)
            if DEVICE.type == "cuda" and peak:
                flops = row[label]["flops"]["forward"] + row[label]["flops"]["backward"]
                row[label]["mfu_bf16"] = flops / wall["step"] / (peak * 1e12)
    if with_cuts:
        row["cost_cuts"] = bench_cuts(row["config"], skip_wall, repeats)
    return row


# Opt-in settings that trade compute for memory (arch kwargs changes), measured next to the default network.
OPTIONS = {
    "vit_grad_checkpointing": "ViT blocks recomputed in the backward pass (`pumit_plan_and_preprocess "
    "--grad_checkpointing`): one block's activations kept instead of all",
}


def with_option(option: str, arch_kwargs: dict) -> dict:
    if option == "vit_grad_checkpointing":
        return {**arch_kwargs, "vit": {**arch_kwargs["vit"], "grad_checkpointing": True}}
    raise ValueError(f"unknown option {option!r}")


def bench_cuts(config: dict, skip_wall: bool, repeats: int) -> dict:
    """FLOPs, bf16 peak memory and (for ``wall`` configurations) wall times with each cost cut undone and each
    of `OPTIONS` switched on; the entry ``as_it_is`` is the network as it is."""
    input_shape = [config["batch"], config["channels"], *config["patch"]]
    arch_kwargs = pumit_arch_kwargs(config)
    cuts, variants = {}, {}
    for cut in [None, *COST_CUTS, *OPTIONS]:
        if cut in OPTIONS:
            factory, adamw_kwargs = network_without_cut(
                None, with_option(cut, arch_kwargs), config["channels"], config["classes"]
            )
        else:
            factory, adamw_kwargs = network_without_cut(
                cut, arch_kwargs, config["channels"], config["classes"]
            )
        name = cut or "as_it_is"
        print(f"{config['name']}: {'as it is' if cut is None else 'with/without ' + cut} ...", flush=True)
        flops = step_flops(factory, input_shape)
        cuts[name] = {
            "flops": flops["forward"] + flops["backward"],
            "peak_memory_bf16": step_peak_memory(factory, input_shape, torch.bfloat16)["Total"],
        }
        variants[name] = (
            factory,
            lambda network, adamw_kwargs=adamw_kwargs: pumit_optimizer(network, **adamw_kwargs),
        )
    if config["wall"] and not skip_wall:
        print(f"{config['name']}: wall times, every variant taking turns ...", flush=True)
        for name, wall in wall_times(variants, input_shape, DEVICE, repeats, AUTOCAST_DTYPE).items():
            cuts[name]["wall_seconds"] = wall
    return cuts


def _meta(factory):
    with torch.device("meta"):
        return factory()


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Training step cost: PUMITSegNet vs nnU-Net's default network (same patch)",
        "",
        f"Machine: {machine['device']}, {machine['cpu_count']} CPU cores, load average {machine['load_average']}, "
        f"torch {machine['torch']}. FLOPs and peak memory are measured on fake tensors (exact, load-independent); "
        "memory excludes the CUDA context and allocator fragmentation. Wall times are medians on this machine.",
        "",
    ]
    for row in rows:
        config = row["config"]
        lines += [
            f"## {config['name']}: {config['model']} ViT, patch {'x'.join(map(str, config['patch']))}, "
            f"batch {config['batch']}, aniso_d {config['aniso_d']}",
            "",
            "| | PUMITSegNet | nnU-Net default | ratio |",
            "|---|---|---|---|",
        ]

        def add(label, a, b, unit, scale, lines=lines):
            lines.append(f"| {label} | {a / scale:.3g} {unit} | {b / scale:.3g} {unit} | {a / b:.2f} |")

        p, n = row["pumit"], row["nnunet"]
        add("parameters", p["parameters"], n["parameters"], "M", 1e6)
        add("forward FLOPs", p["flops"]["forward"], n["flops"]["forward"], "TFLOP", 1e12)
        add("backward FLOPs", p["flops"]["backward"], n["flops"]["backward"], "TFLOP", 1e12)
        add("peak memory fp32", p["peak_memory_fp32"]["Total"], n["peak_memory_fp32"]["Total"], "GiB", 2**30)
        add(
            "peak memory bf16 autocast",
            p["peak_memory_bf16"]["Total"],
            n["peak_memory_bf16"]["Total"],
            "GiB",
            2**30,
        )
        if "wall_seconds" in p and "wall_seconds" in n:
            for key in ("forward", "backward", "optimizer", "step"):
                add(f"wall {key}", p["wall_seconds"][key], n["wall_seconds"][key], "s", 1)
        lines += ["", "PUMITSegNet per part (TFLOP, forward / backward):", ""]
        for part, flops in p["flops_per_part"].items():
            lines.append(f"* {part}: {flops['forward'] / 1e12:.3g} / {flops['backward'] / 1e12:.3g}")
        lines += [
            "",
            f"Planner memory model (activations + 16 B/parameter, bf16): "
            f"{p['planner_estimate_bytes_without_overhead'] / 2**30:.3g} GiB vs measured bf16 peak "
            f"{p['peak_memory_bf16']['Total'] / 2**30:.3g} GiB.",
            "",
        ]
        if "cost_cuts" in row:
            lines += cost_cut_lines(row["cost_cuts"])
    return "\n".join(lines)


def cost_cut_lines(cuts: dict) -> list[str]:
    """Markdown tables: each cost cut undone (before) next to the network as it is (after), then each option
    off (the network as it is) next to on."""
    now = cuts["as_it_is"]
    return [
        *comparison_table(
            "Cost cuts: each row undoes one cut (before) and compares with the network as it is (after).",
            "cut",
            "before / after",
            [(cut, cuts[cut], now, description) for cut, description in COST_CUTS.items()],
        ),
        *comparison_table(
            "Options: the default network (off) next to the option switched on.",
            "option",
            "off / on",
            [(option, now, cuts[option], description) for option, description in OPTIONS.items()],
        ),
    ]


def comparison_table(title: str, first_column: str, pair: str, rows: list[tuple]) -> list[str]:
    """Markdown table of (name, left entry, right entry, description) rows: step FLOPs, bf16 peak and, where
    measured, wall step and optimiser times, each as "left / right" with the relative change."""
    with_wall = all("wall_seconds" in left and "wall_seconds" in right for _, left, right, _ in rows)
    lines = [
        title,
        "",
        f"| {first_column} | step FLOPs {pair} | peak bf16 {pair} | "
        + (f"wall step {pair} | " if with_wall else "")
        + "what it is |",
        "|---|---|---|" + ("---|" if with_wall else "") + "---|",
    ]
    for name, left, right, description in rows:
        cells = [
            f"{left['flops'] / 1e12:.3g} / {right['flops'] / 1e12:.3g} TFLOP "
            f"({right['flops'] / left['flops'] - 1:+.0%})",
            f"{left['peak_memory_bf16'] / 2**30:.3g} / {right['peak_memory_bf16'] / 2**30:.3g} GiB "
            f"({right['peak_memory_bf16'] / left['peak_memory_bf16'] - 1:+.0%})",
        ]
        if with_wall:
            a, b = left["wall_seconds"], right["wall_seconds"]
            cells.append(
                f"{a['step']:.3g} / {b['step']:.3g} s (optimiser {a['optimizer']:.3g} / {b['optimizer']:.3g} s)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {description} |")
    return [*lines, ""]


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or "cpu"
# the trainers' precision: bf16 autocast on CUDA; fp32 on the CPU (its bf16 convolutions are not what we time)
AUTOCAST_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--skip-wall", action="store_true", help="no wall-time measurement")
    parser.add_argument("--skip-cuts", action="store_true", help="no before / after rows of the cost cuts")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (default 3)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: cpu or the GPU name)")
    parser.add_argument("--calibrate", action="store_true", help="fit the planner's memory model instead")
    args = parser.parse_args(argv)
    if args.calibrate:
        result = calibrate()
        os.makedirs(RESULTS, exist_ok=True)
        write_json_atomic(os.path.join(RESULTS, "memory_calibration.json"), result)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
        return
    if args.repeats < 1:
        parser.error(f"argument --repeats: must be >= 1, got {args.repeats}")

    device_name = DEVICE_NAME
    machine = {
        "device": device_name,
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    rows = [
        bench_config(name, CONFIGS[name], args.skip_wall, args.repeats, not args.skip_cuts)
        for name in args.config
    ]
    machine["load_average_after"] = [round(v, 1) for v in os.getloadavg()]
    tag = args.tag or ("cpu" if DEVICE.type == "cpu" else device_name.replace(" ", "_"))
    os.makedirs(RESULTS, exist_ok=True)
    write_json_atomic(os.path.join(RESULTS, f"training_{tag}.json"), {"machine": machine, "rows": rows})
    text = markdown(rows, machine)
    with atomic_path(os.path.join(RESULTS, f"training_{tag}.md")) as tmp, open(tmp, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
