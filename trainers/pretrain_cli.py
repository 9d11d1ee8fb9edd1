"""`pumit_pretrain`: the pre-training command line.

    pumit_pretrain prepare   CONFIG -o STORE ...      folders of images -> pre-training store
    pumit_pretrain tokenizer --store STORE -o RUN ...  universal visual tokenizer
    pumit_pretrain mim       --store STORE -o RUN ...  masked image modelling of the universal ViT
    pumit_pretrain export    CHECKPOINT -o FILE        a training checkpoint -> safetensors
    pumit_pretrain import    CKPT -o FILE              the authors' released weights -> safetensors

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args)``; only the module of the subcommand being run is imported, so ``pumit_pretrain
prepare`` starts without loading the training code.

Exit status of ``tokenizer`` / ``mim``: 0 the run finished and its export holds finite weights,
2 bad options or inputs (nothing trained; a rerun on a run folder with other options is one, see
``--allow-option-change``), 3 the run stopped itself (``--max-bad-steps`` steps in a row with a
NaN / inf loss or gradient, or a health check such as ``--stop-on-collapse``), 1 a loader worker
died (lower ``--num-workers``). ``export`` refuses a checkpoint holding NaN / inf (exit 2) unless
``--allow-non-finite``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("pumit_seg.data.prepare", "turn folders of images into a pre-training store"),
    "tokenizer": ("pumit_seg.trainers.tokenizer_trainer", "pre-train the universal visual tokenizer"),
    "mim": ("pumit_seg.trainers.mim_trainer", "masked image modelling of the universal ViT"),
    "export": ("pumit_seg.trainers.export", "turn a MIM or tokenizer checkpoint into safetensors"),
    "import": ("pumit_seg.trainers.pumit_import", "import the authors' released checkpoints"),
}


def build_parser(subcommand: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``subcommand``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="pumit_pretrain", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if subcommand in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    # with no (or an unknown) subcommand only the list of commands is needed: import nothing
    parser = build_parser(subcommand) if subcommand else build_parser("")
    args = parser.parse_args(argv)
    result = args.run(args)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
