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
presets (``--preset tiny`` runs on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
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
from pumit_seg.trainers.optim import WarmupCosineLRScheduler, build_adamw
from torch import Tensor, nn

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.weights import save_model

__all__ = [
    "CHECKPOINT_NAME",
    "PretrainConfig",
    "PretrainTrainer",
    "add_config_arguments",
    "config_from_args",
    "load_checkpoint",
    "DistributedContext",
    "run_pretraining",
]

CHECKPOINT_NAME = "checkpoint_last.pt"
CHECKPOINT_FORMAT = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    num_workers: int = field(default=8, metadata={"help": "loader worker processes per rank"})
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
        return origin, {"type": args[0] if args else str, "nargs": "+"}
    if annotation in (int, float, str):
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
        # a run folder holding an unreadable or foreign checkpoint fails now, before any heavy setup
        self._resume_from = self._read_resume_checkpoint()
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
        """Backward, optional grad clip, optimiser step (GradScaler-aware); returns the grad norm (or nan).

        With several optimisers per step pass ``update_scaler=False`` to all but the last one
        (the GradScaler is updated once per step).
        """
        optimizer, _ = self.optimizers[optimizer_name]
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = float("nan")
        if self.config.grad_clip > 0:
            self.scaler.unscale_(optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip))
        self.scaler.step(optimizer)
        if update_scaler:
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
        }

    def extra_checkpoint_state(self) -> dict:
        """Subclass state to checkpoint (plain values / tensors only)."""
        return {}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        pass

    def save_checkpoint(self) -> None:
        state = self.checkpoint_state()  # collective: every rank takes part
        if self.dist.is_main:
            with atomic_path(self.checkpoint_path) as tmp:
                torch.save(state, tmp)
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
        for name, (optimizer, scheduler) in self.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
            scheduler.load_state_dict(checkpoint["schedulers"][name])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = int(checkpoint["step"])
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
        """log.csv (and val.csv) as curves, one panel per column, to ``loss_curves.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = [("train", self._log_rows), ("val", self._val_rows)]
        panels = [(name, key) for name, rows in series for key in (rows[0] if rows else {}) if key != "step"]
        if not panels:
            return
        cols = min(4, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
        for ax, (name, key) in zip(axes.flat, panels, strict=False):
            rows = dict(series)[name]
            steps = [r["step"] for r in rows]
            values = [r[key] for r in rows]
            ax.plot(steps, values, lw=1)
            ax.set_title(f"{name}: {key}", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        with atomic_path(self.output_dir / "loss_curves.png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)

    # ---- main loop ------------------------------------------------------------------

    def _batches(self) -> Iterator[dict]:
        while True:
            yield from self.loader

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
                self.output_dir / "config.json", {"kind": self.kind, **dataclasses.asdict(config)}
            )
            if resumed:
                print(f"resuming {self.output_dir} from step {self.step}", flush=True)
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
            batch = self.to_device(next(batches))
            for _, scheduler in self.optimizers.values():
                scheduler.step(self.step)
            metrics = self.training_step(batch, self.step)
            self.step += 1
            window_samples += config.batch_size
            progress.update(1)
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                metrics = self.dist.mean(metrics, self.device)
                elapsed = time.perf_counter() - window_start
                throughput = window_samples / max(elapsed, 1e-9)
                window_samples, window_start = 0, time.perf_counter()
                lrs = {f"lr_{name}": opt.param_groups[0]["lr"] for name, (opt, _) in self.optimizers.items()}
                if self.dist.is_main:
                    row = {"step": self.step, **metrics, **lrs}
                    self._append_csv(self.output_dir / "log.csv", self._log_rows, row)
                    self._tensorboard_log("train", self.step, {**metrics, "samples_per_s": throughput})
                    progress.set_postfix(
                        {**{k: f"{v:.4g}" for k, v in metrics.items()}, "img/s": f"{throughput:.1f}"}
                    )
            last = self.step == config.max_steps
            if self.step % config.val_every == 0 or last:
                self.run_validation(self.step)
                if self.dist.is_main:
                    self.plot_losses()
            if self.step % config.ckpt_every == 0 or last:
                self.save_checkpoint()
                if self.dist.is_main:
                    print(f"checkpoint step {self.step}", flush=True)
        progress.close()
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
        trainer = trainer_class(config)
        trainer.fit()
    except (ValueError, FileNotFoundError) as error:
        print(f"pumit_pretrain {command}: error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    return 0
