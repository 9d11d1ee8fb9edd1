"""`pumit_pretrain import`: the authors' released checkpoints -> our safetensors files (docs/weights_format.md).

    pumit_pretrain import pumit.ckpt -o pumit_b_vit.safetensors --kind vit        # for fine-tuning
    pumit_pretrain import pumit.ckpt -o pumit_b_mim.safetensors --kind mim        # to continue MIM
    pumit_pretrain import tokenizer.ckpt -o tokenizer.safetensors --kind tokenizer

The kind is detected from the keys when ``--kind`` is not given (the released ``pumit.ckpt`` is a
MIM checkpoint, so it detects as ``mim``). Every key is reported as used, adapted or skipped
(printed, and written as JSON beside the output); missing keys, mismatched shapes and unknown keys
stop the import, naming them. The written file carries our architecture header (LayerNorm eps
1e-5 as the authors', 3 input channels, the input normalisation), so ``load_model`` rebuilds the
model and ``PUMITTrainer`` / ``pumit_pretrain mim`` load it. The mapping itself lives in
`pumit_seg.models.pumit_checkpoint`; this module is the command around it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.cli_checks import check_output_path, float_in_range, int_in_range
from pumit_seg.models.pumit_checkpoint import (
    AUTHORS_NORM_EPS,
    AUTHORS_ROPE_BASE,
    AUTHORS_ROPE_BASE_DEPTH,
    KINDS,
    TRUST_PICKLE_FLAG,
    ImportOptions,
    ImportReport,
    file_sha256,
    import_checkpoint,
    input_spec,
)
from pumit_seg.weights import load_model, save_model

__all__ = ["add_arguments", "run", "import_to_file", "default_report_path"]

REPORT_SUFFIX = ".import.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="the authors' checkpoint (pumit.ckpt, a tokenizer .ckpt)"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="the safetensors file to write (ends in .safetensors)",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="vit: the encoder (fine-tuning); mim: encoder + mask token + MIM head; tokenizer: the "
        "SimpleVQTokenizer. Default: detected from the keys",
    )
    parser.add_argument(
        TRUST_PICKLE_FLAG,
        dest="trust_pickle",
        action="store_true",
        help="RISK: allow unpickling Python objects stored in the checkpoint (a Lightning checkpoint's "
        "hyper-parameters / training state). Unpickling runs code chosen by whoever made the file; use it "
        "only for a file from a source you trust. Without it the file is read with weights_only=True",
    )
    parser.add_argument(
        "--num-heads",
        type=int_in_range(1),
        default=None,
        help="attention heads (not stored in the weights); default: width / 64, the authors' B and L",
    )
    parser.add_argument(
        "--norm-eps",
        type=float_in_range(0.0, 1.0, low_open=True),
        default=AUTHORS_NORM_EPS,
        help="ViT LayerNorm eps (authors: %(default)g)",
    )
    parser.add_argument(
        "--rope-base",
        type=float_in_range(1.0, low_open=True),
        default=AUTHORS_ROPE_BASE,
        help="ViT in-plane RoPE base (%(default)g)",
    )
    parser.add_argument(
        "--rope-base-depth",
        type=float_in_range(1.0, low_open=True),
        default=AUTHORS_ROPE_BASE_DEPTH,
        help="ViT depth RoPE base (%(default)g)",
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help="wrapper prefix in front of the model's keys (e.g. 'model.'); default: found from the keys",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help=f"where to write the JSON report of every key (default: OUTPUT with {REPORT_SUFFIX})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file (and its --report)"
    )


def default_report_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".safetensors") + REPORT_SUFFIX)


def import_to_file(
    checkpoint: str | Path,
    output: str | Path,
    kind: str | None = None,
    options: ImportOptions | None = None,
    *,
    trust_pickle: bool = False,
    overwrite: bool = False,
    report_path: str | Path | None = None,
) -> ImportReport:
    """Import `checkpoint` and write `output` (+ the JSON report); nothing is written on any error."""
    checkpoint, output = Path(checkpoint), Path(output)
    report_path = Path(report_path) if report_path is not None else default_report_path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"-o/--output {output}: must end in .safetensors")
    if report_path.resolve() == output.resolve():
        raise ValueError(f"--report {report_path} is the output file itself")
    # before the checkpoint is read: an existing, unwritable or input path as an output is refused
    check_output_path(output, overwrite=overwrite, inputs=[checkpoint], option="-o/--output")
    check_output_path(report_path, overwrite=overwrite, inputs=[checkpoint], option="--report")

    result = import_checkpoint(checkpoint, kind, options, trust_pickle=trust_pickle)
    report = result.report
    extra = {
        "input": input_spec(report.kind, result.model),
        "pumit_import": {
            "kind": report.kind,
            "source_file": checkpoint.name,
            "source_sha256": file_sha256(checkpoint),
            "trust_pickle": trust_pickle,
            "entry": report.entry,
            "prefix": report.prefix,
            "counts": report.counts(),
            "assumptions": report.assumptions,
        },
    }
    with atomic_path(output) as tmp:
        save_model(result.model, tmp, extra=extra)
        load_model(tmp)  # the header alone must rebuild the model, before the file takes the output's name
        write_json_atomic(report_path, {**report.as_dict(), "output": str(output)})
    return report


def run(args: argparse.Namespace) -> int:
    options = ImportOptions(
        num_heads=args.num_heads,
        norm_eps=args.norm_eps,
        rope_base=args.rope_base,
        rope_base_depth=args.rope_base_depth,
        prefix=args.prefix,
    )
    try:
        report = import_to_file(
            args.checkpoint,
            args.output,
            args.kind,
            options,
            trust_pickle=args.trust_pickle,
            overwrite=args.overwrite,
            report_path=args.report,
        )
    except (ValueError, OSError) as error:  # our errors name the file / key / option; nothing was written
        print(f"pumit_pretrain import: error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    report_path = args.report or default_report_path(args.output)
    print(f"wrote {args.output} ({report.kind}) and the key report {report_path}")
    return 0
