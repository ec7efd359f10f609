"""IdentityBatchSampler: G distinct identities x k samples, no repeats within an epoch unless
needed, determinism, mid-epoch resumption, query/key pairs."""
import time

import numpy as np
import pytest
import torch

from protomem.data import IdentityBatchSampler, SyntheticIdentities


def long_tail_labels(num_classes=400, seed=0):
    """Long-tailed labels (MegaFace2-like counts), shuffled and with sparse label values."""
    labels = SyntheticIdentities(num_classes, seed=seed).labels.numpy() * 7 + 3
    return labels[np.random.default_rng(seed).permutation(len(labels))]


def split(batch, group, k, pairs):
    """A batch -> (queries [G, k], keys [G, k] or None) of sample indices."""
    batch = np.asarray(batch)
    assert len(batch) == group * k * (2 if pairs else 1)
    if not pairs:
        return batch.reshape(group, k), None
    half = len(batch) // 2
    return batch[:half].reshape(group, k), batch[half:].reshape(group, k)


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


@pytest.mark.parametrize("pairs", [False, True])
def test_batch_structure_and_no_repeats(pairs):
    labels = long_tail_labels()
    group, k = 16, 4  # the MegaFace2-like tail has identities of 3 samples
    sampler = IdentityBatchSampler(labels, group, k, seed=1, pairs=pairs)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) > 0
    count_of = dict(zip(*np.unique(labels, return_counts=True)))
    seen = []
    for batch in batches:
        queries, keys = split(batch, group, k, pairs)
        ids = labels[queries]
        assert (ids == ids[:, :1]).all()  # k samples of one identity per row
        assert len(np.unique(ids[:, 0])) == group  # G distinct identities
        seen.append(np.asarray(batch))
        if pairs:
            assert (labels[keys] == ids).all()  # key i has query i's identity
            differs = keys != queries
            small = np.vectorize(count_of.get)(ids) < 2
            assert (differs | small).all()  # a different sample whenever there is one
    seen = np.concatenate(seen)
    idx, times = np.unique(seen, return_counts=True)
    needed = k * (2 if pairs else 1)
    repeated = idx[times > 1]
    assert all(count_of[labels[i]] < needed for i in repeated)  # repeats only when too few samples
    assert len(repeated) > 0  # the long tail does have identities with fewer (not vacuous)
    # most samples are used in an epoch
    assert len(idx) > 0.6 * len(labels)


def test_small_identity_samples_with_repetition_inside_identity():
    labels = np.array([0] * 2 + [1] * 5 + [2] * 1 + [3] * 9)
    sampler = IdentityBatchSampler(labels, 2, 4, seed=0)
    for batch in epoch_batches(sampler, 0):
        rows, _ = split(batch, 2, 4, False)
        for row in rows:
            ident = labels[row[0]]
            assert (labels[row] == ident).all()
            members = np.nonzero(labels == ident)[0]
            if len(members) < 4:  # all of the identity's samples, each at least once
                assert set(row.tolist()) == set(members.tolist())
            else:
                assert len(set(row.tolist())) == 4


def test_deterministic_and_epoch_dependent():
    labels = long_tail_labels(seed=2)
    a = IdentityBatchSampler(torch.from_numpy(labels), 8, 2, seed=5)
    b = IdentityBatchSampler(labels, 8, 2, seed=5)
    c = IdentityBatchSampler(labels, 8, 2, seed=6)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) == epoch_batches(a, 3)  # iterating again repeats the epoch
    assert epoch_batches(a, 4) != epoch_batches(a, 3)
    assert len(epoch_batches(a, 4)) == len(epoch_batches(a, 3)) == len(a)
    assert epoch_batches(c, 3) != epoch_batches(a, 3)


@pytest.mark.parametrize("pairs", [False, True])
def test_resume_mid_epoch(pairs):
    labels = long_tail_labels(seed=3)
    sampler = IdentityBatchSampler(labels, 8, 2, seed=9, pairs=pairs)
    full = epoch_batches(sampler, 2)
    sampler.set_epoch(2)
    it = iter(sampler)
    consumed = [next(it) for _ in range(5)]
    assert consumed == full[:5]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 5
    # the consumer may say how far training got (a DataLoader prefetches ahead of it)
    state_at_3 = sampler.state_dict(batches_done=3)

    resumed = IdentityBatchSampler(labels, 8, 2, seed=0, pairs=pairs)  # the seed comes from state
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual loop call: the same epoch keeps the resume position
    assert [list(b) for b in resumed] == full[5:]
    assert epoch_batches(resumed, 2) == full  # the next pass is the whole epoch again
    assert epoch_batches(resumed, 3) == epoch_batches(sampler, 3)

    again = IdentityBatchSampler(labels, 8, 2, pairs=pairs)
    again.load_state_dict(state_at_3)
    assert [list(b) for b in again] == full[3:]
    # a state at the end of the epoch resumes with nothing left of it
    done = IdentityBatchSampler(labels, 8, 2, pairs=pairs)
    done.load_state_dict({**state, "batches_done": len(full)})
    assert list(done) == []
    # another epoch than the saved one starts from its beginning
    other = IdentityBatchSampler(labels, 8, 2, pairs=pairs)
    other.load_state_dict(state)
    assert epoch_batches(other, 3) == epoch_batches(sampler, 3)


def test_resume_rejects_other_settings():
    labels = long_tail_labels(seed=4)
    state = IdentityBatchSampler(labels, 8, 2).state_dict()
    with pytest.raises(ValueError):
        IdentityBatchSampler(labels, 8, 3).load_state_dict(state)
    with pytest.raises(ValueError):
        IdentityBatchSampler(labels[:-50], 8, 2).load_state_dict(state)
    with pytest.raises(ValueError):
        IdentityBatchSampler(labels, 8, 2).load_state_dict({**state, "batches_done": 10**9})


def test_pairs_with_single_sample_identities():
    labels = np.array([0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 4])
    sampler = IdentityBatchSampler(labels, 3, 2, pairs=True, seed=0)
    for batch in epoch_batches(sampler, 1):
        queries, keys = split(batch, 3, 2, True)
        assert (labels[keys] == labels[queries]).all()
        for q, kk in zip(queries.ravel(), keys.ravel()):
            if (labels == labels[q]).sum() >= 2:
                assert q != kk


def test_heavy_head_identity_never_doubles_in_a_batch():
    labels = np.concatenate([np.zeros(1000, np.int64), np.repeat(np.arange(1, 11), 4)])
    sampler = IdentityBatchSampler(labels, 4, 2)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        rows, _ = split(batch, 4, 2, False)
        assert len(np.unique(labels[rows[:, 0]])) == 4


def test_drop_last_false_yields_a_smaller_last_batch():
    labels = np.repeat(np.arange(23), 2)  # 23 chunks of k=2: 4 batches of 5 and one of 3
    keep = IdentityBatchSampler(labels, 5, 2, drop_last=False)
    drop = IdentityBatchSampler(labels, 5, 2, drop_last=True)
    assert len(keep) == len(drop) + 1 == 5
    batches = epoch_batches(keep, 0)
    assert [len(b) for b in batches] == [10, 10, 10, 10, 6]
    last = np.asarray(batches[-1]).reshape(3, 2)
    assert (labels[last] == labels[last][:, :1]).all() and len(np.unique(labels[last[:, 0]])) == 3
    assert sorted(np.concatenate(batches).tolist()) == list(range(46))  # every sample once


def test_dataloader_batch_sampler():
    labels = long_tail_labels(seed=5)
    sampler = IdentityBatchSampler(labels, 4, 2, seed=1)
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    expected = epoch_batches(sampler, 0)
    got = [(idx.tolist(), y) for idx, y in loader]
    assert len(got) == len(loader) == len(expected)
    for (idx, y), batch in zip(got, expected):
        assert idx == batch and torch.equal(y, torch.from_numpy(labels[batch]))


def test_fast_on_a_million_samples():
    counts = np.random.default_rng(0).integers(1, 20, size=100_000)
    labels = np.repeat(np.arange(100_000), counts)  # about 1e6 samples
    start = time.perf_counter()
    sampler = IdentityBatchSampler(labels, 64, 4, pairs=True)
    sampler.set_epoch(1)
    n = sum(1 for _ in sampler)
    elapsed = time.perf_counter() - start
    assert n == len(sampler) > 1000
    assert elapsed < 5.0, f"{elapsed:.2f} s for {len(labels)} samples"


@pytest.mark.parametrize("args", [(8, 0), (0, 2), (400, 2)])
def test_bad_arguments(args):
    labels = np.repeat(np.arange(100), 3)
    with pytest.raises(ValueError):
        IdentityBatchSampler(labels, *args)
    with pytest.raises(ValueError):
        IdentityBatchSampler(labels.astype(np.float32), 8, 2)
