"""The pre-training batch sampler: one aniso_d per batch, dataset weights, disjoint ranks, exact resume."""

import itertools

import numpy as np
import pytest

from pumit_seg.data.sampler import TWO_D_BUCKET, AnisoBatchSampler


def _table(seed=0):
    """Three datasets of different sizes and weights, mixed aniso_d, some 2D."""
    rng = np.random.default_rng(seed)
    sizes, dataset_weights = [300, 50, 650], [1.0, 2.0, 0.5]
    dataset = np.repeat(np.arange(3), sizes)
    weights = np.concatenate([np.full(n, w / n) for n, w in zip(sizes, dataset_weights, strict=True)])
    aniso_d = rng.integers(0, 6, size=len(dataset))
    two_d = (aniso_d == 5) & (rng.random(len(dataset)) < 0.7)
    return dataset, weights, aniso_d, two_d, np.array(dataset_weights) / sum(dataset_weights)


def test_batches_share_one_aniso_d_and_follow_weights():
    dataset, weights, aniso_d, two_d, expected_share = _table()
    sampler = AnisoBatchSampler(weights, aniso_d, two_d, batch_size=8, seed=3)
    counts = np.zeros(3)
    for batch in itertools.islice(iter(sampler), 3000):
        rows = np.array([ref.row for ref in batch])
        assert len({ref.aniso_d for ref in batch}) == 1
        assert (aniso_d[rows] == batch[0].aniso_d).all()
        assert len(set(two_d[rows])) == 1  # 2D images never share a batch with 3D ones
        counts += np.bincount(dataset[rows], minlength=3)
    share = counts / counts.sum()
    # 24,000 draws in 3,000 batches of one bucket each: the standard error of each share is about 0.6 %
    np.testing.assert_allclose(share, expected_share, atol=0.025)


@pytest.mark.parametrize("distinct", [False, True])
def test_ranks_get_disjoint_parts_of_the_global_batch(distinct):
    _, weights, aniso_d, two_d, _ = _table()
    world = 3
    single = AnisoBatchSampler(weights, aniso_d, two_d, batch_size=4 * world, seed=7, distinct=distinct)
    ranks = [
        AnisoBatchSampler(weights, aniso_d, two_d, 4, seed=7, rank=r, world_size=world, distinct=distinct)
        for r in range(world)
    ]
    for index in range(50):
        refs = [ref for sampler in ranks for ref in sampler.rank_batch(index)]
        # disjoint draws: each rank holds its own positions of the global batch, together all of them
        assert [ref.position for ref in refs] == list(range(4 * world))
        assert [ref.row for ref in refs] == [ref.row for ref in single.rank_batch(index)]
        if distinct:  # and no image on two ranks in one step
            assert len({ref.row for ref in refs}) == len(refs)
        assert len({ref.aniso_d for part in ranks for ref in part.rank_batch(index)}) == 1


def test_exact_resume_and_state_checks():
    _, weights, aniso_d, two_d, _ = _table()
    sampler = AnisoBatchSampler(weights, aniso_d, two_d, 6, seed=1)
    reference = list(itertools.islice(iter(sampler), 20))
    resumed = AnisoBatchSampler(weights, aniso_d, two_d, 6, seed=1)
    resumed.load_state_dict(sampler.state_dict() | {"next_batch": 13})
    assert list(itertools.islice(iter(resumed), 7)) == reference[13:]
    other = AnisoBatchSampler(weights, aniso_d, two_d, 5, seed=1)
    with pytest.raises(ValueError, match="global batch"):
        other.load_state_dict(sampler.state_dict())


def test_small_bucket_and_zero_weights():
    weights = np.array([1.0, 0.0, 1.0, 1.0])
    sampler = AnisoBatchSampler(weights, [5, 5, 5, 0], [True, True, True, False], 4, seed=0)
    assert sorted(sampler.bucket_ids) == [TWO_D_BUCKET, 0]
    for index in range(30):
        bucket, rows = sampler.draw(index)
        assert 1 not in rows  # weight 0: never drawn
        assert len(rows) == 4  # a bucket smaller than the batch is drawn with replacement
    with pytest.raises(ValueError, match="weights"):
        AnisoBatchSampler([0.0, 0.0], [0, 0], [False, False], 2)
