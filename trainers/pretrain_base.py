"""The pre-training trainer base shared by `pumit_pretrain tokenizer` and `pumit_pretrain mim`.

A subclass says *what* is trained (model, optimisers, one training step, validation, export);
this base does the rest the same way for every pre-training stage:

* distributed data parallel from torchrun's environment (``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK``; gloo on CPU, nccl on CUDA), a single process without torchrun. We never
  spawn processes ourselves, so multi-node runs are plain ``torchrun --nnodes ...``;
* the loader (`pumit_seg.data.pretrain_loader.build_pretrain_loader`, rank-aware, global
  batch split over ranks) and the held-out validation batches;
* precision: ``auto`` = bf16 autocast on CUDA, fp32 on CPU (``fp16`` uses a GradScaler);
* the learning rate of every optimiser set for the current step before each step
  (`WarmupCosineLRScheduler.step(step)`), so a resumed run sees the same rates;
* ``fit()``: progress bar (losses, samples / s), ``log.csv`` (and TensorBoard when
  installed), ``val.csv``, a loss-curve PNG, atomic checkpoints ``checkpoint_last.pt``
  (models, optimisers, schedulers, GradScaler, step, every rank's loader and RNG state),
  exact resume when the output folder holds one, final export to safetensors.

Subclass hooks: `build_model`, `build_extra_modules`, `build_optimizers`, `crop_config`,
`training_step`, `validate`, `export`; the class attributes `kind` (written into
checkpoints, read by `pumit_pretrain export`) and `export_name`.

Configs are dataclasses; `add_config_arguments` / `config_from_args` turn one into
command-line flags (every field a flag whose default is the paper's value) with named
presets (``--preset tiny`` runs on a CPU). Number flags refuse NaN and inf when parsed.

Run health: a step whose loss or gradient norm is NaN / inf is not applied (the optimiser
step is skipped, the trainer's own state such as the discriminator-loss EMA is put back), and
is counted in ``log.csv`` (column ``skipped_steps``). After ``--max-bad-steps`` (default 5)
such steps in a row the run stops with exit status 3 and a message naming the loss terms or
gradients that were not finite and the step; the last checkpoint is kept and nothing is
exported. No checkpoint or export is ever written from weights holding NaN / inf.

Resuming: the checkpoint records the options of the run. Starting the command again on the
same ``--output-dir`` with other options is refused before any heavy work, listing each
differing option with its old and new value, unless ``--allow-option-change`` is given. These
options may change on resume without it (`RESUME_SAFE_OPTIONS`): ``--max-steps`` (not below
the checkpoint's step; the warm-up + cosine schedule is recomputed for the new total),
``--log-every``, ``--val-every``, ``--ckpt-every``, ``--val-batch-size``,
``--val-max-batches``, ``--num-workers``, ``--device``, ``--max-bad-steps``, ``--output-dir``
(the folder moved) and the picture / gradient-checkpointing options. Every change is printed
and recorded in ``config.json`` under ``"changes"`` (step, option, old, new); the optimisers
and schedules follow the new values from that step on, so ``config.json`` never claims a
value the run did not use.

Exit status of a training command: 0 done, 2 bad options or inputs (nothing trained),
3 stopped by a health check (diverged, or e.g. ``--stop-on-collapse``), 1 a loader worker
died (usually out of memory: lower ``--num-workers``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
import types
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.cli_checks import check_output_path
from pumit_seg.trainers.optim import WarmupCosineLRScheduler, build_adamw
from pumit_seg.weights import describe_non_finite, non_finite_tensors, save_model

__all__ = [
    "CHECKPOINT_NAME",
    "PretrainConfig",
    "PretrainTrainer",
    "add_config_arguments",
    "config_from_args",
    "load_checkpoint",
    "DistributedContext",
    "run_pretraining",
    "PretrainingStopped",
    "TrainingDiverged",
    "LoaderWorkerDied",
    "RESUME_SAFE_OPTIONS",
    "default_num_workers",
    "finite_float",
]

CHECKPOINT_NAME = "checkpoint_last.pt"
CHECKPOINT_FORMAT = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STOPPED_EXIT_CODE = 3  # a run ended by its own health check (e.g. --stop-on-collapse)


class PretrainingStopped(RuntimeError):
    """A run ended on purpose before --max-steps (`PretrainTrainer.stop_requested` gave a reason)."""


class TrainingDiverged(PretrainingStopped):
    """--max-bad-steps steps in a row with a non-finite loss or gradient, or weights holding NaN / inf."""


class LoaderWorkerDied(RuntimeError):
    """A data-loader worker process was killed (most often by the kernel, out of memory)."""


LOADER_DIED_EXIT_CODE = 1
DEFAULT_MAX_BAD_STEPS = 5
# Options that may differ when a run folder is resumed: they change neither the data, the model nor the
# optimisation of a step (--max-steps changes the schedule's length, which is recomputed and recorded).
RESUME_SAFE_OPTIONS = (
    "max_steps", "log_every", "val_every", "ckpt_every", "val_batch_size", "val_max_batches", "num_workers",
    "device", "max_bad_steps", "output_dir", "picture_samples", "val_pictures", "grad_checkpointing",
    "trust_pickle",
)  # fmt: skip
# Not options of the run: never compared nor recorded as a change.
RESUME_IGNORED_OPTIONS = ("allow_option_change",)
# Path options: the same file given another way (relative / absolute) is no change.
PATH_OPTIONS = ("store", "output_dir", "tokenizer", "init_from", "eva02_weights", "lpips_weights")
# Memory one loader worker may take at the paper's crop sizes (prefetched batches of float crops and the
# decompressed chunks they come from); the default --num-workers keeps their sum within half the memory.
WORKER_MEMORY_BYTES = 3 * 2**30
MAX_DEFAULT_WORKERS = 8


def _memory_bytes() -> int | None:
    """Physical memory, or the cgroup (container) limit when that is lower; None when unknown."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            sizes.append(int(text))
    return min(sizes) if sizes else None


def default_num_workers() -> int:
    """Loader workers that fit this machine: at most 8, one core left to the training process, and
    `WORKER_MEMORY_BYTES` each within half the memory (a 2-core machine gets 1, a 1-core one 0)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = _memory_bytes()
    by_memory = MAX_DEFAULT_WORKERS if memory is None else int(memory // 2 // WORKER_MEMORY_BYTES)
    return max(0, min(MAX_DEFAULT_WORKERS, cpus - 1, by_memory))


def finite_float(text: str) -> float:
    """argparse `type` of every float flag: a number, refusing NaN and inf."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


finite_float.__name__ = "number"  # argparse names the type in "invalid number value" messages


# --------------------------------------------------------------------------------------
# Config dataclasses <-> command-line flags
# --------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    """Fields common to every pre-training stage. Subclasses add theirs and redefine defaults."""

    # Named sets of overrides (``--preset NAME``); a subclass defines its own.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    store: str = field(default="", metadata={"help": "pre-training store folder (pumit_pretrain prepare)"})
    output_dir: str = field(
        default="", metadata={"help": "run folder: logs, pictures, checkpoints, export", "aliases": ("-o",)}
    )
    max_steps: int = field(default=600_000, metadata={"help": "optimisation steps"})
    batch_size: int = field(default=48, metadata={"help": "global batch size (split over ranks)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-6, metadata={"help": "final learning rate of the cosine decay"})
    warmup_steps: int = field(default=25_000, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on norms/biases)"})
    grad_clip: float = field(default=0.0, metadata={"help": "gradient-norm clip; 0 = off"})
    crop_in_plane: int = field(default=128, metadata={"help": "crop size in-plane (pixels)"})
    crop_depth_units: int = field(
        default=4, metadata={"help": "crop depth = units * max(16 >> aniso_d, 1) slices (1 slice in 2D)"}
    )
    num_workers: int = field(
        default_factory=default_num_workers,
        metadata={
            "help": "loader worker processes per rank (default: what this machine's cores and memory allow, "
            "at most 8)"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    log_every: int = field(default=50, metadata={"help": "steps between log.csv rows"})
    val_every: int = field(default=5000, metadata={"help": "steps between validations (pictures, health)"})
    val_batch_size: int = field(default=8, metadata={"help": "validation batch size"})
    val_max_batches: int = field(default=8, metadata={"help": "at most this many validation batches"})
    ckpt_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    max_bad_steps: int = field(
        default=DEFAULT_MAX_BAD_STEPS,
        metadata={
            "help": "stop the run (exit status 3) after this many steps in a row with a NaN / inf loss or "
            "gradient; such steps are skipped, never applied"
        },
    )
    allow_option_change: bool = field(
        default=False,
        metadata={
            "help": "resume a run folder with options other than those it was started with (each change is "
            "recorded in config.json); without it such a resume is refused. Options that may always change: "
            + ", ".join(f"--{n.replace('_', '-')}" for n in RESUME_SAFE_OPTIONS)
        },
    )

    def check(self) -> None:
        """Raise ValueError naming the option for values that cannot work."""
        if not self.store:
            raise ValueError("--store is required (a folder written by `pumit_pretrain prepare`)")
        if not self.output_dir:
            raise ValueError("--output-dir / -o is required")
        positive = (
            "max_steps", "batch_size", "log_every", "val_every", "ckpt_every", "crop_in_plane",
            "crop_depth_units", "val_batch_size",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # every number option, also those parsed without argparse
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple | list) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"--{_flag(f.name)} must be a finite number, got {value}")
        if self.max_bad_steps < 1:
            raise ValueError(f"--max-bad-steps must be >= 1, got {self.max_bad_steps}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{_flag(name)} must be a finite number >= 0, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.crop_in_plane % 16:
            raise ValueError(f"--crop-in-plane must be a multiple of 16, got {self.crop_in_plane}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _argument_type(annotation) -> tuple[Any, dict]:
    """argparse keyword arguments for a field's type (int, float, str, bool, X | None, tuple[int, ...])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _argument_type(inner[0])
    if annotation is bool:
        return bool, {"action": argparse.BooleanOptionalAction}
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item = args[0] if args else str
        return origin, {"type": finite_float if item is float else item, "nargs": "+"}
    if annotation is float:
        return float, {"type": finite_float}
    if annotation in (int, str):
        return annotation, {"type": annotation}
    raise TypeError(f"config field type {annotation!r} has no command-line form")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per dataclass field (``max_steps`` -> ``--max-steps``) plus ``--preset``.

    Flags left out keep the preset's value, else the field's default (shown in --help); the
    defaults are applied by `config_from_args`, so a preset never overrides a given flag.
    """
    presets = getattr(config_class, "PRESETS", {})
    if presets:
        parser.add_argument(
            "--preset", choices=sorted(presets), default=None,
            help="named overrides of the defaults: " + "; ".join(
                f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}" for name, values in presets.items()
            ),
        )  # fmt: skip
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        _, kwargs = _argument_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        flags = [f"--{_flag(f.name)}", *f.metadata.get("aliases", ())]
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kwargs)
        # older spellings: accepted so that no user's script breaks, not shown in --help
        for alias in f.metadata.get("hidden_aliases", ()):
            parser.add_argument(alias, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def config_from_args(config_class: type, args: argparse.Namespace | Mapping):
    """Field defaults <- the chosen preset <- the flags actually given."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    values: dict[str, Any] = {}
    preset = given.get("preset")
    if preset is not None:
        presets = getattr(config_class, "PRESETS", {})
        if preset not in presets:
            raise ValueError(f"--preset {preset!r} is unknown; choose from {sorted(presets)}")
        values.update(presets[preset])
    names = {f.name for f in dataclasses.fields(config_class)}
    values.update({k: v for k, v in given.items() if k in names})
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            values[name] = tuple(value)
    return config_class(**values)


# --------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> DistributedContext:
        """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Average a dict of floats over ranks (same keys on every rank)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return {k: v / self.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}


# --------------------------------------------------------------------------------------
# Checkpoint helpers (everything weights_only-loadable)
# --------------------------------------------------------------------------------------


def _to_safe(obj):
    """Make `obj` loadable with ``torch.load(weights_only=True)``: numpy arrays -> tensors (tagged)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_safe(v) for v in obj)
    if isinstance(obj, list):
        return [_to_safe(v) for v in obj]
    return obj


def _from_safe(obj):
    if isinstance(obj, Mapping):
        if "__ndarray__" in obj and len(obj) == 2:
            return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=True)
        return {k: _from_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_from_safe(v) for v in obj)
    if isinstance(obj, list):
        return [_from_safe(v) for v in obj]
    return obj


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _to_safe(state)


def _set_rng_state(state: dict) -> None:
    state = _from_safe(state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint with ``weights_only=True``; ValueError naming the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a truncated / foreign file
        raise ValueError(f"{path}: not a readable training checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pumit_pretrain training checkpoint (no format {CHECKPOINT_FORMAT})")
    return checkpoint


def _plain(value):
    """A value as config.json holds it (tuples -> lists)."""
    return json.loads(json.dumps(value))


def _same_option(name: str, old, new) -> bool:
    if old == new:
        return True
    if name in PATH_OPTIONS:  # the same file named another way (relative / absolute)
        olds, news = (old, new) if isinstance(old, list) and isinstance(new, list) else ([old], [new])
        return len(olds) == len(news) and all(
            isinstance(a, str) and isinstance(b, str) and bool(a) == bool(b)
            and (a == b or os.path.realpath(a) == os.path.realpath(b))
            for a, b in zip(olds, news, strict=True)
        )  # fmt: skip
    return False


def option_changes(saved: Mapping, config, step: int) -> list[dict]:
    """``[{"step", "option", "old", "new"}]`` for every option of `config` that differs from `saved`
    (a checkpoint's config); options the checkpoint does not know (added since) are not compared."""
    saved = _plain(dict(saved))
    current = _plain(dataclasses.asdict(config))
    return [
        {"step": step, "option": name, "old": saved[name], "new": value}
        for name, value in current.items()
        if name in saved and name not in RESUME_IGNORED_OPTIONS and not _same_option(name, saved[name], value)
    ]


def _describe_changes(changes: list[dict]) -> str:
    return ", ".join(f"--{_flag(c['option'])} {c['old']!r} -> {c['new']!r}" for c in changes)


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


class PretrainTrainer:
    """Base of the pre-training trainers; see the module docstring for the hooks."""

    kind: ClassVar[str] = "base"  # checkpoint kind, dispatched on by `pumit_pretrain export`
    export_name: ClassVar[str] = "model.safetensors"
    # log.csv columns compared when checking a resumed run (subclasses list their losses)
    config: PretrainConfig

    def __init__(self, config: PretrainConfig):
        config.check()
        self.config = config
        self.output_dir = Path(config.output_dir)
        # a run folder holding an unreadable or foreign checkpoint, or one of a run with other options,
        # fails now, before any heavy setup
        self._resume_from = self._read_resume_checkpoint()
        self._new_changes = self._check_resume_options(self._resume_from)
        self._changes: list[dict] = []  # every option change of the run (config.json "changes")
        self.dist = DistributedContext.from_environment()
        self.device = self._pick_device()
        self._init_distributed()
        if config.batch_size % self.dist.world_size:
            raise ValueError(
                f"--batch-size {config.batch_size} is not divisible by the {self.dist.world_size} ranks"
            )
        self.local_batch_size = config.batch_size // self.dist.world_size
        self.precision = self._pick_precision()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.skipped_steps = 0  # steps not applied: non-finite loss or gradient
        self._bad_in_a_row = 0
        self._bad_this_step: list[str] = []
        self._checkpoint_step: int | None = None  # step of checkpoint_last.pt, None if there is none
        self._log_rows: list[dict] = []
        self._val_rows: list[dict] = []
        self._tensorboard = None

        # Same initial weights on every rank (DDP also broadcasts rank 0's), then per-rank streams.
        self._seed_everything(config.seed)
        self.model = self.build_model().to(self.device)
        self.extra_modules: dict[str, nn.Module] = {
            name: module.to(self.device) for name, module in self.build_extra_modules().items()
        }
        self._seed_everything(config.seed + self.dist.rank)
        self.train_model = self.wrap_ddp(self.model)
        self.train_extra = {name: self.wrap_ddp(module) for name, module in self.extra_modules.items()}
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, WarmupCosineLRScheduler]] = (
            self.build_optimizers()
        )
        self.loader = self.build_loader()
        self._val_batches: list | None = None

    # ---- environment ---------------------------------------------------------------

    def _pick_device(self) -> torch.device:
        requested = self.config.device
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is available")
            if requested == "cuda":
                requested = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(torch.device(requested))
        elif requested != "cpu":
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {requested!r}")
        return torch.device(requested)

    def _init_distributed(self) -> None:
        if self.dist.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    def _pick_precision(self) -> str:
        precision = self.config.precision
        if precision == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        return precision

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def autocast(self):
        """bf16 / fp16 autocast per --precision (nothing in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """DDP-wrap `module` when running on several ranks and it has trainable parameters."""
        if not self.dist.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    # ---- hooks ---------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """The trained (and exported) model; it must carry a ``config`` dict for `save_model`."""
        raise NotImplementedError

    def build_extra_modules(self) -> dict[str, nn.Module]:
        """Other trained modules saved in checkpoints (e.g. the discriminator); none by default."""
        return {}

    def build_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, WarmupCosineLRScheduler]]:
        """name -> (AdamW, warm-up + cosine schedule); by default one for `model` at --lr."""
        return {"model": self.make_optimizer(self.model, self.config.lr)}

    def make_optimizer(self, module: nn.Module, lr: float, **adamw_kwargs):
        optimizer = build_adamw(module, lr=lr, weight_decay=self.config.weight_decay, **adamw_kwargs)
        scheduler = WarmupCosineLRScheduler(
            optimizer, lr, self.config.min_lr, self.config.warmup_steps, self.config.max_steps
        )
        return optimizer, scheduler

    def crop_config(self):
        from pumit_seg.data.pretrain_loader import CropConfig

        return CropConfig(in_plane=self.config.crop_in_plane, depth_units=self.config.crop_depth_units)

    def open_store(self):
        from pumit_seg.data.store import PretrainStore

        return PretrainStore(self.config.store)

    def build_loader(self):
        """The rank-aware training loader (infinite); must offer state_dict / load_state_dict."""
        from pumit_seg.data.pretrain_loader import build_pretrain_loader

        self.store = self.open_store()
        return build_pretrain_loader(
            self.store, self.crop_config(), self.local_batch_size, num_workers=self.config.num_workers,
            seed=self.config.seed, rank=self.dist.rank, world_size=self.dist.world_size, split="train",
        )  # fmt: skip

    def validation_batches(self) -> list[dict]:
        """Deterministic held-out batches (built once, main rank only)."""
        if self._val_batches is None:
            from pumit_seg.data.pretrain_loader import validation_batches

            batches = validation_batches(self.store, self.crop_config(), self.config.val_batch_size)
            batches = list(batches)
            if len(batches) > self.config.val_max_batches:  # spread over the aniso_d groups (2D come last)
                picks = np.linspace(0, len(batches) - 1, self.config.val_max_batches).round().astype(int)
                batches = [batches[i] for i in sorted(set(picks.tolist()))]
            self._val_batches = batches
        return self._val_batches

    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        """Forward, backward and optimiser step(s) for one batch; returns the losses to log."""
        raise NotImplementedError

    def validate(self, step: int) -> dict[str, float]:
        """Metrics on the held-out batches; also writes pictures. Runs on the main rank only."""
        return {}

    def export(self, path: str | os.PathLike) -> None:
        save_model(self.model, path, extra={"kind": self.kind, "step": self.step})

    # ---- helpers for training_step --------------------------------------------------

    def to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
        }

    def backward_and_step(
        self, loss: Tensor, optimizer_name: str, module: nn.Module, update_scaler: bool = True
    ) -> float:
        """Backward, optional grad clip, optimiser step (GradScaler-aware); returns the gradient norm.

        A NaN / inf loss or gradient norm is not applied: the step of this optimiser is skipped (on
        every rank alike) and noted for `fit`, which counts it and stops the run after
        ``--max-bad-steps`` in a row. In fp16 the GradScaler skips steps with inf gradients itself
        (its loss-scale search); only a non-finite loss counts there.

        With several optimisers per step pass ``update_scaler=False`` to all but the last one
        (the GradScaler is updated once per step).
        """
        optimizer, _ = self.optimizers[optimizer_name]
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(optimizer)
        if self.config.grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip))
        else:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            grad_norm = float(nn.utils.get_total_norm(grads)) if grads else 0.0
        loss_value = float(loss.detach())
        bad = not math.isfinite(loss_value) or (not math.isfinite(grad_norm) and not self.scaler.is_enabled())
        if self.dist.enabled:  # gradients are already averaged, a loss is per rank: agree on skipping
            flag = torch.tensor([float(bad)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        if bad:
            optimizer.zero_grad(set_to_none=True)
            self._bad_this_step.append(f"{optimizer_name} loss {loss_value:g}, gradient norm {grad_norm:g}")
        else:
            self.scaler.step(optimizer)
        if update_scaler and self.scaler.is_enabled():
            self.scaler.update()
        return grad_norm

    # ---- checkpoints ---------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def checkpoint_state(self) -> dict:
        # tensors inside all_gather_object fail to unpickle (torch 2.13, gloo): gather bytes instead
        buffer = io.BytesIO()
        torch.save({"loader": _to_safe(self.loader.state_dict()), "rng": _rng_state()}, buffer)
        rank_states = [
            torch.load(io.BytesIO(data), weights_only=True)
            for data in self.dist.gather_objects(buffer.getvalue())
        ]
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "step": self.step,
            "world_size": self.dist.world_size,
            "config": dataclasses.asdict(self.config),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "model_config": getattr(self.model, "config", None),
            "model": self.model.state_dict(),
            "extra_modules": {name: module.state_dict() for name, module in self.extra_modules.items()},
            "optimizers": {name: opt.state_dict() for name, (opt, _) in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, (_, sched) in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rank_states": rank_states,
            "trainer_state": self.extra_checkpoint_state(),
            "health": {"skipped_steps": self.skipped_steps},
            "changes": self._changes,
        }

    def extra_checkpoint_state(self) -> dict:
        """Subclass state to checkpoint (plain values / tensors only)."""
        return {}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        pass

    def stop_requested(self) -> str | None:
        """Asked on the main rank after each validation: a reason to end the run now, or None."""
        return None

    def _stop_if_requested(self) -> None:
        reason = self.dist.gather_objects(self.stop_requested() if self.dist.is_main else None)[0]
        if reason:
            raise PretrainingStopped(reason)

    def non_finite_weights(self) -> dict[str, int]:
        """Tensors of the model and extra modules holding NaN / inf (name -> count); empty when healthy."""
        bad = {f"model.{k}": n for k, n in non_finite_tensors(self.model.state_dict()).items()}
        for name, module in self.extra_modules.items():
            bad.update({f"{name}.{k}": n for k, n in non_finite_tensors(module.state_dict()).items()})
        return bad

    def _kept_checkpoint(self) -> str:
        if self._checkpoint_step is None:
            return "no checkpoint had been written"
        return f"the last good checkpoint {self.checkpoint_path} (step {self._checkpoint_step}) is kept"

    def save_checkpoint(self) -> None:
        bad = self.non_finite_weights()  # the same on every rank: DDP keeps the weights equal
        if bad:
            raise TrainingDiverged(
                f"{self.output_dir}: at step {self.step} the weights are not finite ({describe_non_finite(bad)}); "
                f"checkpoint not written, {self._kept_checkpoint()}; nothing exported"
            )
        state = self.checkpoint_state()  # collective: every rank takes part
        if self.dist.is_main:
            with atomic_path(self.checkpoint_path) as tmp:
                torch.save(state, tmp)
        self._checkpoint_step = self.step
        self.dist.barrier()

    def _read_resume_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.exists():
            return None
        checkpoint = load_checkpoint(self.checkpoint_path)
        if checkpoint.get("kind") != self.kind:
            raise ValueError(
                f"{self.checkpoint_path}: a {checkpoint.get('kind')!r} checkpoint, this is a {self.kind!r} run; "
                "use another --output-dir"
            )
        return checkpoint

    def _check_resume_options(self, checkpoint: dict | None) -> list[dict]:
        """The option changes against the checkpoint's run; ValueError listing them unless every one is in
        `RESUME_SAFE_OPTIONS` or --allow-option-change is given."""
        if checkpoint is None or not isinstance(checkpoint.get("config"), Mapping):
            return []
        step = int(checkpoint.get("step", 0))
        changes = option_changes(checkpoint["config"], self.config, step)
        safe = set(RESUME_SAFE_OPTIONS)
        unsafe = [c for c in changes if c["option"] not in safe]
        if unsafe and not self.config.allow_option_change:
            raise ValueError(
                f"{self.output_dir} holds a run (at step {step}) started with other options: "
                f"{_describe_changes(unsafe)}. Repeat the run's options, use another --output-dir, or pass "
                f"--allow-option-change to continue with the new values from step {step} (recorded in "
                "config.json). Options that may change on resume: "
                + ", ".join(f"--{_flag(n)}" for n in RESUME_SAFE_OPTIONS)
            )
        if self.config.max_steps < step:
            raise ValueError(
                f"--max-steps {self.config.max_steps}: {self.checkpoint_path} is at step {step} already; "
                f"give --max-steps >= {step} or use another --output-dir"
            )
        return changes

    def _announce_changes(self, changes: list[dict]) -> None:
        for change in changes:
            line = (
                f"step {change['step']}: --{_flag(change['option'])} changed from {change['old']!r} to "
                f"{change['new']!r} on resume"
            )
            if change["option"] == "max_steps":
                line += (
                    f"; the learning-rate schedule (warm-up + cosine) is recomputed for {change['new']} steps"
                )
            print(line, flush=True)

    def resume(self) -> bool:
        """Load `checkpoint_last.pt` from the output folder if there is one; True when resumed."""
        checkpoint, self._resume_from = self._resume_from, None
        if checkpoint is None:
            checkpoint = self._read_resume_checkpoint()
        if checkpoint is None:
            return False
        try:
            self.model.load_state_dict(checkpoint["model"])
            for name, module in self.extra_modules.items():
                module.load_state_dict(checkpoint["extra_modules"][name])
        except (RuntimeError, KeyError) as error:
            raise ValueError(
                f"{self.checkpoint_path}: its weights do not fit this configuration "
                f"(was the run started with other options?): {error}"
            ) from error
        for name, (optimizer, _) in self.optimizers.items():
            # the moments come from the checkpoint, the hyper-parameters (lr, weight decay, betas) from this
            # run's options; the schedules are not restored but rebuilt from the options (a function of the
            # step only), so a changed --max-steps or --lr takes effect instead of the saved values
            hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(checkpoint["optimizers"][name])
            for group, values in zip(optimizer.param_groups, hyper, strict=True):
                group.update(values)
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = int(checkpoint["step"])
        self._checkpoint_step = self.step
        self.skipped_steps = int(checkpoint.get("health", {}).get("skipped_steps", 0))
        self._changes = [*checkpoint.get("changes", []), *self._new_changes]
        rank_states = checkpoint["rank_states"]
        if len(rank_states) == self.dist.world_size:
            own = rank_states[self.dist.rank]
            self.loader.load_state_dict(_from_safe(own["loader"]))
            _set_rng_state(own["rng"])
        else:
            warnings.warn(
                f"{self.checkpoint_path} was written by {len(rank_states)} ranks, this run has "
                f"{self.dist.world_size}: weights and optimisers resume, sampling restarts from a fresh stream",
                stacklevel=2,
            )
        self.load_extra_checkpoint_state(checkpoint.get("trainer_state", {}))
        self._log_rows = [
            r for r in self._read_csv(self.output_dir / "log.csv") if int(r["step"]) <= self.step
        ]
        self._val_rows = [
            r for r in self._read_csv(self.output_dir / "val.csv") if int(r["step"]) <= self.step
        ]
        if self.dist.is_main:  # drop rows logged after the checkpoint, before the run was stopped
            self._write_csv(self.output_dir / "log.csv", self._log_rows)
            self._write_csv(self.output_dir / "val.csv", self._val_rows)
        return True

    # ---- logs and figures -----------------------------------------------------------

    @staticmethod
    def _read_csv(path: Path) -> list[dict]:
        if not path.exists():
            return []
        with open(path, newline="") as f:
            rows = []
            for row in csv.DictReader(f):
                if row.get("step") and all(v not in (None, "") for v in row.values()):  # a torn last line
                    rows.append({k: (int(v) if k == "step" else float(v)) for k, v in row.items()})
            return rows

    @staticmethod
    def _write_csv(path: Path, rows: list[dict]) -> None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="nan")
            writer.writeheader()
            writer.writerows(rows)

    def _append_csv(self, path: Path, rows: list[dict], row: dict) -> None:
        """Append one row; the file is rewritten (atomically) when the columns change."""
        rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        if not path.exists() or len(rows) == 1 or list(rows[0]) != columns or list(row) != columns:
            self._write_csv(path, rows)
            return
        with open(path, "a", newline="") as f:  # an append-only log; a torn line is dropped on resume
            csv.DictWriter(f, fieldnames=columns, restval="nan").writerow(row)

    def _tensorboard_log(self, prefix: str, step: int, values: dict[str, float]) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
        if self._tensorboard:
            for key, value in values.items():
                self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)

    def plot_losses(self) -> None:
        """log.csv (and val.csv) as curves against the step, one labelled panel per column, to ``loss_curves.png``."""
        from pumit_seg.plotting import CurvePanel, plot_curve_panels

        panels = []
        for name, rows in (("train", self._log_rows), ("validation", self._val_rows)):
            for key in dict.fromkeys(k for row in rows for k in row if k != "step"):
                points = [(r["step"], r[key]) for r in rows if key in r]
                steps, values = zip(*points, strict=True) if points else ((), ())
                panels.append(CurvePanel(f"{name}: {key}", "training step", key, {key: (steps, values)}))
        plot_curve_panels(panels, self.output_dir / "loss_curves.png", title=f"{self.kind} run: log.csv / val.csv")

    # ---- main loop ------------------------------------------------------------------

    def _batches(self) -> Iterator[dict]:
        while True:
            yield from self.loader

    def _next_batch(self, batches: Iterator[dict]) -> dict:
        try:
            return next(batches)
        # torch's loader raises "DataLoader worker (pid X) is killed by signal: Killed." when the kernel kills one
        except RuntimeError as error:
            if "DataLoader worker" not in str(error):
                raise
            raise LoaderWorkerDied(
                f"a data-loader worker died ({str(error).strip().splitlines()[0]}), most likely out of memory: "
                f"run again with fewer --num-workers (this run: {self.config.num_workers}; 0 loads in the "
                "training process); the run resumes from its last checkpoint"
            ) from error

    def _count_bad_step(self, metrics: dict[str, float], trainer_state: dict) -> str | None:
        """Count a step that was not applied; the reason to stop after --max-bad-steps in a row, else None."""
        bad = list(self._bad_this_step)
        loss = metrics.get("loss")
        if not bad and loss is not None and not math.isfinite(loss):  # a step without backward_and_step
            bad.append(f"loss {loss:g}")
        if not bad:
            self._bad_in_a_row = 0
            return None
        self.load_extra_checkpoint_state(trainer_state)  # e.g. an EMA fed a NaN loss: as before the step
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        terms = [f"{k}={v:g}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        what = f"non-finite {', '.join(terms)}; " if terms else ""
        if self.dist.is_main:
            print(f"step {self.step} skipped: {what}{'; '.join(bad)}", file=sys.stderr, flush=True)
        if self._bad_in_a_row < self.config.max_bad_steps:
            return None
        first = self.step - self._bad_in_a_row + 1
        return (
            f"{self.output_dir}: training diverged: {self._bad_in_a_row} steps in a row ({first} to {self.step}) "
            f"with a NaN / inf loss or gradient, none applied (--max-bad-steps {self.config.max_bad_steps}); "
            f"at step {self.step}: {what}{'; '.join(bad)}; {self._kept_checkpoint()}; nothing exported"
        )

    def run_validation(self, step: int) -> None:
        if self.dist.is_main:
            self.model.eval()
            for module in self.extra_modules.values():
                module.eval()
            with torch.no_grad():
                metrics = self.validate(step)
            self.model.train()
            for module in self.extra_modules.values():
                module.train()
            if metrics:
                self._append_csv(self.output_dir / "val.csv", self._val_rows, {"step": step, **metrics})
                self._tensorboard_log("val", step, metrics)
        self.dist.barrier()

    def fit(self) -> Path:
        """Train to --max-steps (resuming if the output folder holds a checkpoint); returns the export path."""
        from tqdm import tqdm

        config = self.config
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        resumed = self.resume()
        if self.dist.is_main:
            write_json_atomic(
                self.output_dir / "config.json",
                {"kind": self.kind, **dataclasses.asdict(config), "changes": self._changes},
            )
            if resumed:
                print(f"resuming {self.output_dir} from step {self.step}", flush=True)
                self._announce_changes(self._new_changes)
        self.model.train()
        for module in self.extra_modules.values():
            module.train()
        batches = self._batches()
        progress = tqdm(
            total=config.max_steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True,
            desc=self.kind, file=sys.stderr,
        )  # fmt: skip
        window_samples, window_start = 0, time.perf_counter()
        while self.step < config.max_steps:
            batch = self.to_device(self._next_batch(batches))
            for _, scheduler in self.optimizers.values():
                scheduler.step(self.step)
            self._bad_this_step = []
            trainer_state = self.extra_checkpoint_state()
            metrics = self.training_step(batch, self.step)
            self.step += 1
            diverged = self._count_bad_step(metrics, trainer_state)
            window_samples += config.batch_size
            progress.update(1)
            if self.step % config.log_every == 0 or self.step == config.max_steps or diverged:
                metrics = self.dist.mean(metrics, self.device)
                elapsed = time.perf_counter() - window_start
                throughput = window_samples / max(elapsed, 1e-9)
                window_samples, window_start = 0, time.perf_counter()
                lrs = {f"lr_{name}": opt.param_groups[0]["lr"] for name, (opt, _) in self.optimizers.items()}
                if self.dist.is_main:
                    row = {"step": self.step, **metrics, **lrs, "skipped_steps": self.skipped_steps}
                    self._append_csv(self.output_dir / "log.csv", self._log_rows, row)
                    self._tensorboard_log("train", self.step, {**metrics, "samples_per_s": throughput})
                    progress.set_postfix(
                        {**{k: f"{v:.4g}" for k, v in metrics.items()}, "img/s": f"{throughput:.1f}"}
                    )
            if diverged:
                progress.close()
                raise TrainingDiverged(diverged)
            last = self.step == config.max_steps
            if self.step % config.val_every == 0 or last:
                self.run_validation(self.step)
                if self.dist.is_main:
                    self.plot_losses()
                self._stop_if_requested()
            if (self.step % config.ckpt_every == 0 and not self._bad_in_a_row) or last:
                # not in the middle of skipped steps: the last checkpoint stays the last good step's
                self.save_checkpoint()
                if self.dist.is_main:
                    print(f"checkpoint step {self.step}", flush=True)
        progress.close()
        if self.skipped_steps and self.dist.is_main:
            print(
                f"{self.skipped_steps} step(s) skipped (non-finite loss or gradient; column skipped_steps of "
                "log.csv)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        export_path = self.output_dir / self.export_name
        if self.dist.is_main:
            self.export(export_path)
            self.plot_losses()
            print(f"exported {export_path}", flush=True)
        self.dist.barrier()
        return export_path

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
        if self.dist.enabled and dist.is_initialized():
            # every rank reaches this point before any tears the group down: a rank leaving early
            # made gloo hang its peer in destroy_process_group
            dist.barrier()
            dist.destroy_process_group()


def run_pretraining(trainer_class: type, config_class: type, args: argparse.Namespace, command: str) -> int:
    """Body of a training subcommand's ``run(args)``: config from flags, fit, clean error messages.

    Bad options, unusable stores and unreadable checkpoints raise ValueError / FileNotFoundError
    naming the option or file; they end the command with that message and exit status 2.
    """
    trainer = None
    try:
        config = config_from_args(config_class, args)
        if config.output_dir:  # a run folder is continued (resumed); its inputs must not be it
            inputs = [
                getattr(config, name, None) for name in ("store", "tokenizer", "init_from", "eva02_weights")
            ]
            check_output_path(
                config.output_dir, is_dir=True, overwrite=True, inputs=inputs, option="-o/--output-dir"
            )
        trainer = trainer_class(config)
        trainer.fit()
    except (ValueError, FileNotFoundError) as error:
        print(f"pumit_pretrain {command}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except PretrainingStopped as reason:
        print(f"pumit_pretrain {command}: stopped: {reason}", file=sys.stderr, flush=True)
        return STOPPED_EXIT_CODE
    except LoaderWorkerDied as error:
        print(f"pumit_pretrain {command}: error: {error}", file=sys.stderr, flush=True)
        return LOADER_DIED_EXIT_CODE
    finally:
        if trainer is not None:
            trainer.close()
    return 0
