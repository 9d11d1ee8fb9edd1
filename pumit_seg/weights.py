"""Weight files: safetensors with a JSON architecture header, and reading foreign checkpoints.

Every model we save carries ``self.config`` (JSON-serialisable constructor kwargs). The
safetensors metadata entry ``"pumit_seg"`` holds
``{"format_version": 1, "class": "<module>.<Class>", "config": {...}, **extra}``, so
`load_model` rebuilds the model without any pickled code. Only classes under
``pumit_seg.`` are ever instantiated from a header. `save_model` refuses weights holding
NaN / inf (a diverged run) unless ``allow_non_finite=True``.

Foreign checkpoints (``.pth`` / ``.ckpt`` / ``.pt``) are read with
``torch.load(weights_only=True)``. A PyTorch Lightning checkpoint such as the authors'
``pumit.ckpt`` also stores optimizer state and hyper-parameters as arbitrary pickled
objects, which ``weights_only`` refuses; ``allow_pickle=True`` lifts that. Unpickling runs
code chosen by whoever made the file: only do it for files from a source you trust.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pumit_seg.atomic import atomic_path

__all__ = [
    "TRUST_PICKLE_FLAG",
    "CheckpointReadError",
    "PickledCheckpointError",
    "read_checkpoint",
    "FORMAT_VERSION",
    "HEADER_KEY",
    "save_model",
    "non_finite_tensors",
    "describe_non_finite",
    "load_model",
    "read_header",
    "load_state_dict_file",
    "unwrap_state_dict",
]

HEADER_KEY = "pumit_seg"
FORMAT_VERSION = 1
TRUSTED_CLASS_PREFIX = "pumit_seg."
# Top-level entries that wrap the real state dict (Lightning, EVA, DDP-style checkpoints).
STATE_DICT_WRAPPERS = ("state_dict", "model", "module")
# The one flag name, in every command, by which a user consents to unpickling a checkpoint.
TRUST_PICKLE_FLAG = "--trust-pickle"


def non_finite_tensors(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Name -> number of NaN / inf values, for the floating-point tensors that hold any."""
    counts = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                counts[name] = bad
    return counts


def describe_non_finite(counts: Mapping[str, int]) -> str:
    """``N tensor(s) hold NaN / inf, e.g. 'a' (3 values), 'b' (1 value)`` for `non_finite_tensors`'s result."""
    shown = ", ".join(f"{name!r} ({n} value{'s' if n > 1 else ''})" for name, n in list(counts.items())[:3])
    return f"{len(counts)} tensor(s) hold NaN / inf, e.g. {shown}"


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    extra: dict | None = None,
    allow_non_finite: bool = False,
    allow_non_finite_hint: str = "pass allow_non_finite=True",
) -> None:
    """Write `model`'s state dict and architecture header to a safetensors file, atomically.

    Weights holding NaN / inf are refused (ValueError naming the tensors; nothing is written)
    unless ``allow_non_finite=True``: a diverged model must not pass for a trained one.
    `allow_non_finite_hint` is how the user of the calling tool lifts the refusal (a flag).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(model).__name__} has no `config` dict; cannot save it with its architecture")
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    extra = dict(extra or {})
    reserved = {"format_version", "class", "config"} & extra.keys()
    if reserved:
        raise ValueError(f"extra header entries may not override {sorted(reserved)}")
    header = {"format_version": FORMAT_VERSION, "class": model_class, "config": config, **extra}
    metadata = {HEADER_KEY: json.dumps(header)}  # fails here, before any file is touched, if not JSON-able
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    if not allow_non_finite:
        bad = non_finite_tensors(tensors)
        if bad:
            raise ValueError(
                f"{path}: refusing to write weights of {type(model).__name__} with non-finite values "
                f"({describe_non_finite(bad)}); {allow_non_finite_hint} to write them anyway"
            )

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_header(path: str | os.PathLike) -> dict:
    """The ``pumit_seg`` architecture header of a safetensors file we wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    if HEADER_KEY not in metadata:
        raise ValueError(
            f"{path}: safetensors file without a {HEADER_KEY!r} header (not written by save_model)"
        )
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupt {HEADER_KEY!r} header ({error})") from error
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported header format {header.get('format_version')!r}")
    return header


def import_trusted_class(class_path, source: str) -> type:
    """The class at ``class_path`` (a dotted path from a file), refused unless it is one of ours:
    a file must never make us import and instantiate arbitrary code."""
    if not isinstance(class_path, str) or not class_path.startswith(TRUSTED_CLASS_PREFIX):
        raise ValueError(
            f"{source}: refusing to instantiate {class_path!r} (only {TRUSTED_CLASS_PREFIX}* classes)"
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{source}: model class {class_path!r} cannot be imported ({error})") from error


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model named in the header (classes under ``pumit_seg.`` only) and load its weights."""
    header = read_header(path)
    class_path = header.get("class", "")
    model_class = import_trusted_class(class_path, str(path))
    model = model_class(**header.get("config", {}))
    state_dict = load_state_dict_file(path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path}: weights do not fit {class_path} built from its header:\n{error}"
        ) from error
    return model


def unwrap_state_dict(obj: Mapping, source: str) -> dict[str, Tensor]:
    """Descend into "state_dict" / "model" / "module" wrappers; check that every value is a tensor."""
    while isinstance(obj, Mapping):
        wrapper = next((k for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    not_tensors = [key for key, value in obj.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: entries that are not tensors: {not_tensors[:5]}")
    return dict(obj)


def load_state_dict_file(
    path: str | os.PathLike, allow_pickle: bool = False, allow_pickle_hint: str = "pass allow_pickle=True"
) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch checkpoint, unwrapping common wrappers.

    Read with `read_checkpoint`: ``weights_only=True`` unless ``allow_pickle=True``, which
    unpickles arbitrary objects and so can run arbitrary code: use it only for files you trust
    (see the module docstring). `allow_pickle_hint` is how the user of the calling tool lifts the
    restriction (a flag or environment variable), named in the error.
    """
    checkpoint = read_checkpoint(path, trust_pickle=allow_pickle, trust_hint=allow_pickle_hint)
    return unwrap_state_dict(checkpoint, source=str(path))


# --------------------------------------------------------------------------------------
# Reading checkpoints (the one reader for every foreign file)
# --------------------------------------------------------------------------------------


class CheckpointReadError(ValueError):
    """The file cannot be read as a checkpoint (truncated, another format); a missing file is FileNotFoundError."""


class PickledCheckpointError(CheckpointReadError):
    """``torch.load(weights_only=True)`` refused pickled Python objects in the file."""

    def __init__(self, path: str | Path, objects: list[str], hint: str = f"add {TRUST_PICKLE_FLAG}"):
        self.path = str(path)
        self.objects = list(objects)
        named = ", ".join(self.objects[:8]) + (
            f" and {len(self.objects) - 8} more" if len(self.objects) > 8 else ""
        )
        super().__init__(
            f"{path}: cannot read the checkpoint without unpickling: it holds Python objects besides its tensors ({named or 'unknown'}), "
            "typically a Lightning checkpoint's hyper-parameters or training state. torch.load(weights_only=True) "
            "refuses to unpickle them, and so do we by default: unpickling runs code chosen by whoever made the "
            "file, so a downloaded checkpoint could execute anything on this machine with your rights. If you "
            f"trust where the file comes from (e.g. the authors' GitHub release, checksum compared), {hint} "
            "and run again: the file is then unpickled, classes missing here become inert placeholders, and only the "
            "tensors of its state dict are used."
        )


class _MissingClass:
    """Stands in for a class the checkpoint names but this environment lacks; does nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _PlaceholderUnpickler(pickle.Unpickler):
    """Unpickler for trusted files: classes that cannot be imported become `_MissingClass` subclasses."""

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_MissingClass,), {"__module__": f"missing.{module}"})


# torch.load(pickle_module=...) needs a module with `Unpickler` and `load`.
_placeholder_pickle = types.ModuleType("pumit_placeholder_pickle")
_placeholder_pickle.Unpickler = _PlaceholderUnpickler
_placeholder_pickle.load = pickle.load


def read_checkpoint(
    path: str | Path, *, trust_pickle: bool = False, trust_hint: str = f"add {TRUST_PICKLE_FLAG}"
):
    """Read a torch checkpoint (or a safetensors file) with ``weights_only=True``.

    Pickled objects -> `PickledCheckpointError` naming them and `trust_hint` (how the calling
    tool's user consents: a flag or an environment variable), unless
    `trust_pickle` (then the file is unpickled: only for files from a source you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointReadError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses both pickled objects and files that are no torch checkpoint at all
        try:
            objects, detail = torch.serialization.get_unsafe_globals_in_checkpoint(path), ""
        except Exception as inner:  # not a torch zip checkpoint (a legacy-format one can still be trusted)
            objects, detail = [], str(inner).splitlines()[0] if str(inner) else type(inner).__name__
        if not trust_pickle:
            if not objects:
                raise CheckpointReadError(
                    f"{path}: not a readable torch checkpoint (truncated, corrupt or another format)"
                    + (f": {detail}" if detail else "")
                ) from error
            raise PickledCheckpointError(path, objects, trust_hint) from error
    except Exception as error:  # torch.load raises RuntimeError / EOFError / OSError on broken files
        raise CheckpointReadError(
            f"{path}: not a readable torch checkpoint (truncated, corrupt or another format): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_placeholder_pickle)
    except Exception as error:
        raise CheckpointReadError(f"{path}: unpickling failed ({type(error).__name__}: {error})") from error
