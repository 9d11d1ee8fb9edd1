"""Helpers and a subprocess entry point for the pre-training trainer tests (not collected by pytest).

`PhantomLoader` is a small in-memory, rank-aware, resumable stand-in for the store loader
(a fixed set of 2D and 3D phantoms, random flips from a generator seeded by its position),
so trainer mechanics (DDP, checkpoints, resume) are tested apart from the data pipeline.

    python tests/pretrain_worker.py fit OUT [flags...]     # TokenizerTrainer.fit on phantoms
    torchrun --standalone --nproc_per_node 2 tests/pretrain_worker.py grads OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from test_tokenizer import phantom_images  # noqa: E402

from pumit_seg.trainers.pretrain_base import add_config_arguments, config_from_args  # noqa: E402
from pumit_seg.trainers.tokenizer_trainer import TokenizerConfig, TokenizerTrainer  # noqa: E402

GLOBAL_BATCH = 4
# the 2-rank worker's configuration: gradients, then a 2-step run with a checkpoint
DDP_RUN = {"perceptual_weight": 0.0, "max_steps": 2, "ckpt_every": 2, "val_every": 2, "log_every": 1}


def phantom_batches() -> list[dict]:
    """Two global batches in [0, 1]: 2D (aniso_d 5) and 3D (aniso_d 2, 8 slices)."""
    return [
        {"image": (phantom_images(0, GLOBAL_BATCH, 1) + 1) / 2, "aniso_d": 5},
        {"image": (phantom_images(1, GLOBAL_BATCH, 8) + 1) / 2, "aniso_d": 2},
    ]


class PhantomLoader:
    """Infinite batches cycling over `phantom_batches`, this rank's share, with random flips."""

    def __init__(self, local_batch: int, rank: int, world_size: int, seed: int):
        self.batches = phantom_batches()
        self.local_batch, self.rank, self.world_size, self.seed = local_batch, rank, world_size, seed
        self.position = 0

    def __iter__(self):
        while True:
            source = self.batches[self.position % len(self.batches)]
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
            images = source["image"]
            if bool(torch.rand((), generator=g) < 0.5):
                images = images.flip(-1)
            start = self.rank * self.local_batch
            self.position += 1
            yield {
                "image": images[start : start + self.local_batch],
                "aniso_d": source["aniso_d"],
                "keys": [f"phantom{i}" for i in range(start, start + self.local_batch)],
            }

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class PhantomTokenizerTrainer(TokenizerTrainer):
    def build_loader(self):
        return PhantomLoader(self.local_batch_size, self.dist.rank, self.dist.world_size, self.config.seed)

    def validation_batches(self) -> list[dict]:
        return [dict(b, keys=[f"val{i}" for i in range(GLOBAL_BATCH)]) for b in phantom_batches()]


def tiny_config(output_dir, **overrides) -> TokenizerConfig:
    return config_from_args(
        TokenizerConfig,
        {
            "preset": "tiny",
            "store": "in-memory",
            "output_dir": str(output_dir),
            "batch_size": GLOBAL_BATCH,
            **overrides,
        },
    )


def generator_gradients(trainer: TokenizerTrainer, use_gan: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Gradients of the generator loss on this rank's part of the 3D phantom batch (after DDP's averaging)."""
    batch = phantom_batches()[1]
    start = trainer.dist.rank * trainer.local_batch_size
    x = batch["image"][start : start + trainer.local_batch_size] * 2 - 1
    trainer.extra_modules["discriminator"].requires_grad_(False)
    loss, _, terms = trainer.generator_loss(x, batch["aniso_d"], use_gan=use_gan)
    trainer.model.zero_grad()
    loss.backward()
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in trainer.model.named_parameters()}
    values = {k: float(v.detach()) for k, v in terms.items()}
    return grads, values


def main(argv: list[str]) -> None:
    mode, output = argv[0], Path(argv[1])
    if mode == "grads":
        trainer = PhantomTokenizerTrainer(tiny_config(output / "run", **DDP_RUN))
        grads, values = generator_gradients(trainer, use_gan=True)
        if trainer.dist.is_main:
            save_file(
                grads, str(output / "grads.safetensors"), metadata={k: repr(v) for k, v in values.items()}
            )
        trainer.fit()  # then a short DDP run: validation on rank 0, checkpoint with every rank's state
        trainer.close()
    elif mode == "fit":  # the remaining arguments are `pumit_pretrain tokenizer` flags
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, TokenizerConfig)
        flags = {k: v for k, v in vars(parser.parse_args(argv[2:])).items() if v is not None}
        trainer = PhantomTokenizerTrainer(tiny_config(output, **flags))
        try:
            trainer.fit()
        finally:
            trainer.close()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
