"""Tokenizer training steps per second.

One step is what `pumit_pretrain tokenizer` does per batch: generator forward + loss + backward
+ AdamW step, then the discriminator's (hinge loss, its own AdamW). Batches are random crops
of the preset's shapes (the loader is benchmarked separately, 5a / 5b), timed apart for 2D
crops (aniso_d 5, one slice) and 3D crops (aniso_d 0, the deepest crop), after warm-up steps.

    python benchmarks/bench_tokenizer.py                   # tiny preset on CPU
    python benchmarks/bench_tokenizer.py --preset paper    # the paper's configuration (use a GPU)

The paper configuration: batch 48 (here --batch-size, per device), crops 128 in-plane by
4 x 16 slices (aniso_d 0), 1024 codes, bf16 autocast on CUDA. LPIPS is left out unless
--lpips-weights is given (no weights can be downloaded here). Results go to
``benchmarks/results/tokenizer_<preset>_<device>.{json,md}`` with the device, torch version
and thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.trainers.pretrain_base import config_from_args
from pumit_seg.trainers.tokenizer_trainer import TokenizerConfig, TokenizerTrainer

RESULTS = Path(__file__).parent / "results"


class RandomCropLoader:
    """Infinite random batches in [0, 1] of one crop shape (stands in for the store loader)."""

    def __init__(self, batch_size: int, depth: int, in_plane: int, aniso_d: int):
        self.shape = (batch_size, 3, depth, in_plane, in_plane)
        self.aniso_d = aniso_d

    def __iter__(self):
        while True:
            yield {"image": torch.rand(self.shape), "aniso_d": self.aniso_d, "keys": []}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class BenchTokenizerTrainer(TokenizerTrainer):
    def build_loader(self):
        return None  # batches come from `time_steps`


def time_steps(trainer: TokenizerTrainer, loader: RandomCropLoader, warmup: int, steps: int) -> dict:
    batches = iter(loader)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for step in range(warmup):
        trainer.training_step(trainer.to_device(next(batches)), step)
    sync()
    start = time.perf_counter()
    for step in range(steps):
        trainer.training_step(trainer.to_device(next(batches)), warmup + step)
    sync()
    elapsed = time.perf_counter() - start
    return {
        "crop": list(loader.shape[1:]),
        "aniso_d": loader.aniso_d,
        "batch_size": loader.shape[0],
        "steps": steps,
        "seconds": round(elapsed, 3),
        "steps_per_s": round(steps / elapsed, 3),
        "samples_per_s": round(steps * loader.shape[0] / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="per device (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 tiny, 10 paper)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--lpips-weights", nargs="+", default=())
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    values: dict = {
        "store": "random",
        "output_dir": tempfile.mkdtemp(prefix="bench_tokenizer_"),
        "device": args.device,
    }
    if args.preset == "tiny":
        values["preset"] = "tiny"
    values["lpips_weights"] = tuple(args.lpips_weights)
    values["perceptual_weight"] = 1.0 if args.lpips_weights else 0.0
    config = config_from_args(TokenizerConfig, values)
    if args.batch_size:
        config.batch_size = args.batch_size
    steps = args.steps or (20 if args.preset == "tiny" else 10)
    trainer = BenchTokenizerTrainer(config)
    in_plane = config.crop_in_plane
    deepest = config.crop_depth_units * 16  # aniso_d 0: depth_units * (16 >> 0) slices
    runs = {
        "2D": time_steps(trainer, RandomCropLoader(config.batch_size, 1, in_plane, 5), args.warmup, steps),
        "3D": time_steps(
            trainer, RandomCropLoader(config.batch_size, deepest, in_plane, 0), args.warmup, steps
        ),
    }
    device = trainer.device
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    result = {
        "benchmark": "tokenizer training steps per second",
        "preset": args.preset,
        "device": str(device),
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs on a shared machine slow CPU runs
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": trainer.precision,
        "perceptual": trainer.perceptual is not None,
        "num_codes": config.num_codes,
        "channels": list(config.down_channels),
        "parameters_generator": sum(p.numel() for p in trainer.model.parameters()),
        "parameters_discriminator": sum(
            p.numel() for p in trainer.extra_modules["discriminator"].parameters()
        ),
        "runs": runs,
    }
    out = Path(args.output_dir)
    stem = f"tokenizer_{args.preset}_{device.type}"
    write_json_atomic(out / f"{stem}.json", result)
    lines = [
        f"# Tokenizer training speed: {args.preset} preset on {device_name} ({device})",
        "",
        f"torch {torch.__version__}, {result['torch_threads']} threads (machine load {result['load_average_1min']}), "
        f"precision {trainer.precision}, "
        f"LPIPS {'on' if result['perceptual'] else 'off'}, {result['parameters_generator']:,} tokenizer + "
        f"{result['parameters_discriminator']:,} discriminator parameters.",
        "",
        "| crops | aniso_d | batch | steps/s | samples/s |",
        "|---|---|---|---|---|",
    ]
    for kind, run in runs.items():
        lines.append(
            f"| {kind} {'x'.join(map(str, run['crop'][1:]))} | {run['aniso_d']} | {run['batch_size']} | "
            f"{run['steps_per_s']} | {run['samples_per_s']} |"
        )
    with atomic_path(out / f"{stem}.md") as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    trainer.close()
    return result


if __name__ == "__main__":
    main()
