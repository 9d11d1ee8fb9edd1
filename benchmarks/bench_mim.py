"""MIM training throughput: tokens per second and model FLOPs utilisation (MFU).

    python benchmarks/bench_mim.py                  # tiny preset on CPU; ViT-B at the paper's crop too when CUDA is there
    python benchmarks/bench_mim.py --only base --batch-size 24 --steps 30

One measured step is what `pumit_pretrain mim` does per batch: the frozen tokenizer's targets, the MIM
forward and backward, gradient-norm clipping and an AdamW step (mixed precision as the trainer: bf16
autocast on CUDA, fp32 on CPU). Inputs are random crops of the configured size (throughput does not
depend on the pixels or on the weights). Tokens per second count the ViT's patch tokens
(batch x token grid). Model FLOPs are those of the MIM model's forward + backward, counted once with
`torch.utils.flop_counter.FlopCounterMode` (the tokenizer's forward is extra work, reported apart);
MFU = model FLOPs per second / the device's peak (dense bf16 for known GPUs; on CPU only with
``--peak-tflops``). Results are merged into ``benchmarks/results/mim_throughput.{json,md}``, one entry
per (configuration, device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from pumit_seg.cli_checks import float_in_range

RESULTS = Path(__file__).resolve().parent / "results" / "mim_throughput"
# (ViT preset, tokenizer preset, crop in-plane, crop depth units, aniso_d, batch size, device kind)
CONFIGURATIONS = {
    "tiny": ("tiny", "tiny", 64, 2, 2, 4, "cpu"),
    "base": ("base", "paper", 160, 5, 2, 24, "cuda"),  # the paper's crop: a 5x10x10 token grid
}


def device_peak(device: torch.device, peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    from device_peaks import bf16_peak_tflops  # benchmarks/device_peaks.py: one table for every benchmark

    peak = bf16_peak_tflops(torch.cuda.get_device_name(device))
    return peak * 1e12 if peak else None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def build(name: str, device: torch.device):
    from pumit_seg.models.mim import MIMModel
    from pumit_seg.models.tokenizer import tokenizer_paper, tokenizer_tiny
    from pumit_seg.models.vit import VIT_SIZES
    from pumit_seg.trainers.optim import build_adamw

    vit, tokenizer_preset, in_plane, depth_units, aniso_d, batch, _ = CONFIGURATIONS[name]
    grid = (depth_units, in_plane // 16, in_plane // 16)
    encoder = VIT_SIZES[vit](pos_grid_shape=grid)
    tokenizer = (
        (tokenizer_tiny if tokenizer_preset == "tiny" else tokenizer_paper)().eval().requires_grad_(False)
    )
    model = MIMModel(encoder=encoder.config, codebook_size=tokenizer.num_codes)
    optimizer = build_adamw(model, lr=2e-5, weight_decay=0.05)
    depth = depth_units * max(16 >> aniso_d, 1)
    return model.to(device), tokenizer.to(device), optimizer, (depth, in_plane, in_plane), aniso_d, grid


def measure(name: str, device: torch.device, steps: int, warmup: int, batch_size: int | None, peak_tflops):
    from torch.utils.flop_counter import FlopCounterMode

    from pumit_seg.models.mim import mim_step

    model, tokenizer, optimizer, crop, aniso_d, grid = build(name, device)
    batch = batch_size or CONFIGURATIONS[name][5]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    image = torch.rand(batch, 3, *crop, device=device)

    def step():
        with autocast:
            result = mim_step(model, tokenizer, image, aniso_d)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with FlopCounterMode(display=False) as counter:  # one step: model forward + backward (+ tokenizer)
        with autocast:
            with torch.no_grad():
                tokenizer.token_distribution(2 * image - 1, aniso_d)
        tokenizer_flops = counter.get_total_flops()
        step()
    model_flops = counter.get_total_flops() - 2 * tokenizer_flops  # step() ran the tokenizer once more

    for _ in range(warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * grid[0] * grid[1] * grid[2]
    peak = device_peak(device, peak_tflops)
    return {
        "configuration": name,
        "vit": CONFIGURATIONS[name][0],
        "device": device_description(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "batch_size": batch,
        "crop": list(crop),
        "aniso_d": aniso_d,
        "token_grid": list(grid),
        "seconds_per_step": round(seconds, 5),
        "images_per_s": round(batch / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "model_gflop_per_step": round(model_flops / 1e9, 3),
        "tokenizer_gflop_per_step": round(tokenizer_flops / 1e9, 3),
        "achieved_tflops": round(model_flops / seconds / 1e12, 4),
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": round(model_flops / seconds / peak, 4) if peak else None,
        "steps": steps,
        "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs sharing the machine
        "torch": torch.__version__,
    }


def write_results(entries: list[dict]) -> None:
    from pumit_seg.atomic import atomic_path, write_json_atomic

    path = RESULTS.with_suffix(".json")
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(e["configuration"], e["device"]) for e in entries}
    merged = [e for e in old if (e["configuration"], e["device"]) not in keys] + entries
    write_json_atomic(path, merged)
    lines = [
        "# MIM training throughput (`python benchmarks/bench_mim.py`)",
        "",
        "One step = tokenizer targets + MIM forward/backward + grad clip + AdamW. Model FLOPs counted with",
        "torch's FlopCounterMode (forward + backward of the MIM model); MFU only where the peak is known.",
        "load = the machine's 1-minute load average during the run (other jobs share the cores).",
        "",
        "| configuration | device | precision | batch | token grid | s/step | tokens/s | model GFLOP/step | TFLOP/s | MFU | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in merged:
        mfu = f"{100 * e['mfu']:.1f} %" if e["mfu"] is not None else "n/a (peak unknown)"
        lines.append(
            f"| {e['configuration']} (ViT-{e['vit']}) | {e['device']} | {e['precision']} | {e['batch_size']} | "
            f"{'x'.join(map(str, e['token_grid']))} | {e['seconds_per_step']:.4f} | {e['tokens_per_s']:.0f} | "
            f"{e['model_gflop_per_step']:.2f} | {e['achieved_tflops']:.3f} | {mfu} | {e.get('load_average_1min', '')} |"
        )
    with atomic_path(RESULTS.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CONFIGURATIONS), default=None, help="one configuration")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None, help="override the configuration's batch")
    parser.add_argument(
        "--peak-tflops",
        type=float_in_range(0.0, None, low_open=True),
        default=None,
        help="device peak for MFU (e.g. a CPU's)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [args.only] if args.only else [n for n, c in CONFIGURATIONS.items() if c[6] == "cpu"]
    if not args.only and torch.cuda.is_available():
        names += [n for n, c in CONFIGURATIONS.items() if c[6] == "cuda"]
    entries = []
    for name in names:
        kind = CONFIGURATIONS[name][6]
        if kind == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--only {name} needs a CUDA device; none is available")
        device = torch.device(kind)
        torch.manual_seed(0)
        entry = measure(name, device, args.steps, args.warmup, args.batch_size, args.peak_tflops)
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    if not args.no_save:
        write_results(entries)


if __name__ == "__main__":
    main()
