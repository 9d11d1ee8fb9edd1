"""Batch sampling for pre-training: dataset weights, one aniso_d per batch, ranks, exact resume.

See docs/pretraining.md, "The pre-training data", and docs/method.md, "Degree of anisotropy and SAC".

`AnisoBatchSampler` draws an infinite sequence of **global** batches. Global batch ``b`` depends only
on ``(seed, b)`` (a counter-based generator seeded with both), never on what was drawn before, so:

* resuming is exact: start again at the first batch not yet consumed (`state_dict` holds it);
* ranks are disjoint: global batch ``b`` is ``batch_size * world_size`` draws and rank ``r`` takes
  draws ``r * batch_size ... (r + 1) * batch_size - 1``; every rank computes the same global draw
  itself, with no communication, so the ranks together see exactly what one process with the global
  batch would see. Draws are with replacement (the same image may come twice, with different crops),
  which keeps the weights exact; ``distinct=True`` draws the images of a global batch without
  replacement (no image on two ranks in one step), at the price of under-drawing an image that
  carries more than about 1 / global batch of its bucket's weight;
* a batch first draws its bucket with probability equal to the bucket's share of the total weight,
  then its images within the bucket by weight, so over many batches image ``i`` is drawn with
  probability ``weight_i / sum(weight)``: the store's weights (a dataset's weight shared by its
  images) are followed exactly.

Buckets are by aniso_d, with 2D images (one slice) a bucket of their own apart from 3D images of
aniso_d 5 (their crops have different depths), so every batch stacks into one tensor.

Each element the sampler yields is a list of `SampleRef` (row, aniso_d, batch index, position in the
global batch): the dataset derives the sample's crop and augmentation randomness from them, so a
batch's content is reproducible too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch.utils.data

__all__ = ["SampleRef", "AnisoBatchSampler", "TWO_D_BUCKET"]

TWO_D_BUCKET = -1  # bucket id of 2D images (aniso_d 5, depth 1)
MAX_REDRAWS = 64  # duplicate-removal rounds before falling back to a plain weighted choice


class SampleRef(NamedTuple):
    """What one sample of a batch is: the table row, the batch's aniso_d, and where it was drawn."""

    row: int
    aniso_d: int
    batch_index: int
    position: int  # in the global batch


class AnisoBatchSampler(torch.utils.data.Sampler):
    """Infinite weighted batches of one aniso_d each, split across ranks; see the module doc.

    `weights` (n,) non-negative sampling weights, `aniso_d` (n,) ints, `two_d` (n,) bools; rows of weight
    0 are never drawn. `batch_size` is the per-rank batch size.
    """

    def __init__(
        self,
        weights,
        aniso_d,
        two_d,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        distinct: bool = False,
    ):
        weights = np.asarray(weights, dtype=np.float64)
        aniso_d = np.asarray(aniso_d, dtype=np.int64)
        two_d = np.asarray(two_d, dtype=bool)
        if not (weights.shape == aniso_d.shape == two_d.shape) or weights.ndim != 1:
            raise ValueError("weights, aniso_d and two_d must be 1D arrays of one length")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not weights.sum() > 0:
            raise ValueError("sampling weights must be finite, non-negative and not all zero")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} / world_size {world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch_size = batch_size * world_size
        self.distinct = distinct
        self.next_batch = 0
        bucket_of_row = np.where(two_d, TWO_D_BUCKET, aniso_d)
        self.bucket_ids, self.bucket_rows, self.bucket_cdfs = [], [], []
        for bucket in np.unique(bucket_of_row):
            rows = np.flatnonzero((bucket_of_row == bucket) & (weights > 0))
            if len(rows):
                self.bucket_ids.append(int(bucket))
                self.bucket_rows.append(rows.astype(np.int32 if len(weights) < 2**31 else np.int64))
                self.bucket_cdfs.append(np.cumsum(weights[rows]))
        totals = np.array([cdf[-1] for cdf in self.bucket_cdfs])
        self.bucket_cdf = np.cumsum(totals)

    def bucket_aniso_d(self, bucket: int) -> int:
        return 5 if bucket == TWO_D_BUCKET else bucket

    def _weighted(self, rng: np.random.Generator, cdf: np.ndarray, count: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right"), len(cdf) - 1)

    def draw(self, batch_index: int) -> tuple[int, np.ndarray]:
        """(bucket, table rows of the whole global batch) of global batch `batch_index`."""
        rng = np.random.default_rng([self.seed, batch_index])
        which = int(self._weighted(rng, self.bucket_cdf, 1)[0])
        cdf, rows = self.bucket_cdfs[which], self.bucket_rows[which]
        picks = self._weighted(rng, cdf, self.global_batch_size)
        if self.distinct and len(rows) >= self.global_batch_size:
            # without replacement: redraw repeated picks (successive weighted sampling)
            for _ in range(MAX_REDRAWS):
                _, first = np.unique(picks, return_index=True)
                repeated = np.setdiff1d(np.arange(len(picks)), first)
                if not len(repeated):
                    break
                picks[repeated] = self._weighted(rng, cdf, len(repeated))
            else:  # extreme weights: finish with numpy's exact weighted choice without replacement
                p = np.diff(cdf, prepend=0.0) / cdf[-1]
                picks = rng.choice(len(rows), size=self.global_batch_size, replace=False, p=p)
        return self.bucket_ids[which], rows[picks]

    def rank_batch(self, batch_index: int) -> list[SampleRef]:
        """This rank's part of global batch `batch_index`."""
        bucket, rows = self.draw(batch_index)
        aniso_d = self.bucket_aniso_d(bucket)
        start = self.rank * self.batch_size
        return [
            SampleRef(int(rows[p]), aniso_d, batch_index, p) for p in range(start, start + self.batch_size)
        ]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        batch_index = self.next_batch
        while True:
            yield self.rank_batch(batch_index)
            batch_index += 1

    def state_dict(self) -> dict:
        return {
            "next_batch": self.next_batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch_size"] != self.global_batch_size or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for seed {state['seed']} and global batch {state['global_batch_size']}, "
                f"this run has seed {self.seed} and global batch {self.global_batch_size} "
                "(batch size x world size): an exact resume needs the same"
            )
        self.next_batch = int(state["next_batch"])
