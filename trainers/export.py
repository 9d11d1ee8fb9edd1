"""`pumit_pretrain export`: a pre-training checkpoint (``checkpoint_last.pt``) -> its safetensors file.

    pumit_pretrain export RUN/checkpoint_last.pt -o tokenizer.safetensors

Useful to take weights out of a run that is still going, or was stopped before its final
export. The checkpoint is read with ``torch.load(weights_only=True)``; what is exported
depends on the checkpoint's ``kind`` (written by the trainer): each kind registers one
function in `EXPORTERS` that turns the checkpoint into the module to save (plus extra
header entries). A new kind is one function and one `EXPORTERS` entry.

A checkpoint whose weights hold NaN / inf (a diverged run) is refused, nothing is written,
unless ``--allow-non-finite`` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from pumit_seg.cli_checks import check_output_path
from pumit_seg.trainers.pretrain_base import load_checkpoint
from pumit_seg.weights import describe_non_finite, import_trusted_class, non_finite_tensors, save_model

__all__ = ["EXPORTERS", "rebuild_model", "export_checkpoint", "add_arguments", "run"]


def rebuild_model(checkpoint: dict, source: str) -> nn.Module:
    """The trainer's model from the class path and config stored in the checkpoint, with its weights."""
    class_path = checkpoint.get("model_class", "")
    model_class = import_trusted_class(class_path, source)
    model = model_class(**(checkpoint.get("model_config") or {}))
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            f"{source}: weights do not fit {class_path} built from its config: {error}"
        ) from error
    return model


def _export_tokenizer(checkpoint: dict, source: str) -> tuple[nn.Module, dict]:
    return rebuild_model(checkpoint, source), {"kind": "tokenizer", "step": int(checkpoint["step"])}


def _export_mim(checkpoint: dict, source: str) -> tuple[nn.Module, dict]:
    """A MIM run exports its encoder alone (what the fine-tuning trainers load), not the MIM head."""
    from pumit_seg.trainers.mim_trainer import export_mim_checkpoint

    return export_mim_checkpoint(rebuild_model(checkpoint, source), checkpoint)


# checkpoint kind -> function(checkpoint, source) -> (module to save, extra header entries)
EXPORTERS: dict[str, Callable[[dict, str], tuple[nn.Module, dict]]] = {
    "tokenizer": _export_tokenizer,
    "mim": _export_mim,
}


def export_checkpoint(
    checkpoint_path: str | Path, output: str | Path, allow_non_finite: bool = False
) -> Path:
    """Write the safetensors file of a training checkpoint; returns its path.

    Weights with NaN / inf values are refused (ValueError) unless `allow_non_finite`."""
    checkpoint = load_checkpoint(checkpoint_path)
    kind = checkpoint.get("kind")
    if kind not in EXPORTERS:
        raise ValueError(
            f"{checkpoint_path}: checkpoint kind {kind!r} has no exporter (known: {sorted(EXPORTERS)})"
        )
    module, extra = EXPORTERS[kind](checkpoint, str(checkpoint_path))
    bad = non_finite_tensors(module.state_dict())
    if bad and not allow_non_finite:
        raise ValueError(
            f"{checkpoint_path}: the weights of step {checkpoint.get('step')} are not finite "
            f"({describe_non_finite(bad)}): the run diverged; nothing exported (pass --allow-non-finite "
            "to export them anyway)"
        )
    save_model(
        module, output, extra={**extra, "source_checkpoint": str(checkpoint_path)},
        allow_non_finite=allow_non_finite, allow_non_finite_hint="pass --allow-non-finite",
    )  # fmt: skip
    return Path(output)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (RUN/checkpoint_last.pt)")
    parser.add_argument("-o", "--output", required=True, help="safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--allow-non-finite", action="store_true",
        help="write the weights even when they hold NaN / inf values (a diverged run); refused by default",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        # never onto the checkpoint itself or another file of a run; an existing file needs --overwrite
        check_output_path(
            args.output, overwrite=args.overwrite, inputs=[args.checkpoint], option="-o/--output"
        )
        path = export_checkpoint(args.checkpoint, args.output, args.allow_non_finite)
    except (ValueError, FileNotFoundError) as error:
        print(f"pumit_pretrain export: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {path}", flush=True)
    return 0
