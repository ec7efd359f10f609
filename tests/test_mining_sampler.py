"""DoppelgangerBatchSampler: look-alikes put together, G x k structure kept, determinism from
(seed, epoch, lists), mid-epoch resume with the lists, DCQ's pairs mode."""
import numpy as np
import pytest

from protomem.data import DoppelgangerBatchSampler, IdentityBatchSampler
from protomem.mining import DoppelgangerLists
from test_sampler import epoch_batches, long_tail_labels, split

G, K = 16, 2


def partner(label):
    """The planted look-alike of a label of long_tail_labels (values 7c + 3): class c ^ 1."""
    return ((label - 3) // 7 ^ 1) * 7 + 3


def twin_lists(labels):
    lists = DoppelgangerLists(int(labels.max()) + 1, k=2)
    ids = np.unique(labels)
    lists.update(ids, partner(ids), np.full(len(ids), 0.8, np.float32))
    return lists


def paired_identities(ids):
    """How many identities of a batch have their planted partner in it too."""
    return int(np.isin(partner(ids), ids).sum())


@pytest.mark.parametrize("pairs", [False, True])
def test_lookalikes_join_their_anchors_and_the_structure_holds(pairs):
    labels = long_tail_labels()
    sampler = DoppelgangerBatchSampler(labels, G, K, twin_lists(labels), fraction=0.5, seed=1, pairs=pairs)
    base = IdentityBatchSampler(labels, G, K, seed=1, pairs=pairs)
    mined, random = [], []
    for batch, plain in zip(epoch_batches(sampler, 0), epoch_batches(base, 0)):
        queries, keys = split(batch, G, K, pairs)
        ids = labels[queries]
        assert (ids == ids[:, :1]).all() and len(np.unique(ids[:, 0])) == G
        if pairs:
            assert (labels[keys] == ids).all()
        mined.append(paired_identities(ids[:, 0]))
        random.append(paired_identities(labels[split(plain, G, K, pairs)[0]][:, 0]))
    # about G/2 look-alikes per batch, each with its anchor: ~G paired identities (random: ~0)
    assert np.mean(mined) > 0.75 * G and np.mean(random) < 1


def test_empty_lists_or_no_fraction_give_the_plain_batches():
    labels = long_tail_labels()
    plain = epoch_batches(IdentityBatchSampler(labels, G, K, seed=3), 1)
    empty = DoppelgangerLists(int(labels.max()) + 1)
    assert epoch_batches(DoppelgangerBatchSampler(labels, G, K, empty, 0.5, seed=3), 1) == plain
    assert epoch_batches(DoppelgangerBatchSampler(labels, G, K, twin_lists(labels), 0.0, seed=3), 1) == plain


def test_deterministic_from_seed_epoch_and_lists():
    labels = long_tail_labels()
    a = DoppelgangerBatchSampler(labels, G, K, twin_lists(labels), seed=2)
    b = DoppelgangerBatchSampler(labels, G, K, twin_lists(labels), seed=2)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    ids = np.unique(labels)
    b.lists.update(ids, np.roll(ids, 5), np.full(len(ids), 0.99, np.float32))  # other lists: other batches
    assert epoch_batches(a, 0) != epoch_batches(b, 0)


def feed(lists, batch, labels):
    """A stand-in for the trainer's update: each batch's identities pair with the next one."""
    ids = np.unique(labels[np.asarray(batch)])
    lists.update(ids, np.roll(ids, 1), np.linspace(0, 0.9, len(ids)).astype(np.float32))


@pytest.mark.parametrize("pairs", [False, True])
def test_resume_mid_epoch_restores_the_lists(pairs):
    labels = long_tail_labels()
    C = int(labels.max()) + 1

    def make():
        return DoppelgangerBatchSampler(labels, G, K, DoppelgangerLists(C, 3), 0.4, seed=5, pairs=pairs)

    one = make()
    whole = []
    for batch in one:
        whole.append(batch)
        feed(one.lists, batch, labels)
    first = make()
    it = iter(first)
    for _ in range(5):
        feed(first.lists, next(it), labels)
    state = first.state_dict()
    resumed = make()  # fresh lists: all of their state comes from the checkpoint
    resumed.load_state_dict(state)
    rest = []
    for batch in resumed:
        rest.append(batch)
        feed(resumed.lists, batch, labels)
    assert whole[5:] == rest and len(rest) == len(one) - 5
    np.testing.assert_array_equal(resumed.lists.others, one.lists.others)
    assert sum(paired_identities(labels[np.asarray(b)]) for b in rest) > 0  # mining did act


def test_bad_arguments():
    labels = long_tail_labels()
    with pytest.raises(ValueError, match="fraction"):
        DoppelgangerBatchSampler(labels, G, K, twin_lists(labels), fraction=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        DoppelgangerBatchSampler(labels, G, K, DoppelgangerLists(10))
