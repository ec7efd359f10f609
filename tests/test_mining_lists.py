"""DoppelgangerLists against a plain per-class dict reference of the same rule (decayed
evidence), on random pairs with repeats, plus state_dict, size and bad input."""
import numpy as np
import pytest
import torch

from protomem.mining import DoppelgangerLists, pack_pairs


class DictLists:
    """The rule written the slow way: {class: {other: score}}, one class at a time."""

    def __init__(self, k, decay, symmetric):
        self.k, self.decay, self.symmetric, self.lists = k, decay, symmetric, {}

    def update(self, rows, others, cos, C):
        pairs = [(a, b, c) for a, b, c in zip(rows, others, cos)
                 if 0 <= a < C and 0 <= b < C and a != b and np.isfinite(c)]
        if self.symmetric:
            pairs += [(b, a, c) for a, b, c in pairs]
        new = {}
        for a, b, c in pairs:
            s = float(np.float32(min(max((1 + c) / 2, 0.0), 1.0)))
            new.setdefault(a, {})
            new[a][b] = new[a].get(b, 0.0) + s
        for a, cands in new.items():
            old = {b: float(np.float16(s)) * self.decay for b, s in self.lists.get(a, {}).items()}
            for b, s in cands.items():
                old[b] = old.get(b, 0.0) + s
            best = sorted(old.items(), key=lambda t: (-np.float32(t[1]), t[0]))[: self.k]
            self.lists[a] = {b: s for b, s in best}

    def others(self, a, k):
        items = sorted(self.lists.get(a, {}).items(), key=lambda t: (-np.float16(t[1]), t[0]))
        return [b for b, _ in items] + [-1] * (k - len(items))


@pytest.mark.parametrize("k,decay,symmetric", [(3, 0.9, True), (1, 1.0, False), (4, 0.5, True)])
def test_lists_match_the_dict_reference(k, decay, symmetric):
    C = 37
    lists, ref = DoppelgangerLists(C, k, decay, symmetric), DictLists(k, decay, symmetric)
    rng = np.random.default_rng(k)
    for _ in range(25):
        n = int(rng.integers(1, 30))
        rows = rng.integers(-2, C + 2, n)  # some out of range: ignored
        others = np.where(rng.random(n) < 0.5, (rows + 1) % C, rng.integers(-1, C, n))
        cos = rng.choice(np.linspace(-1, 1, 9), n).astype(np.float32)  # repeats and ties
        cos[rng.random(n) < 0.05] = np.nan
        lists.update(rows, others, cos)
        ref.update(rows.tolist(), others.tolist(), cos.tolist(), C)
    got = lists.lookalikes(np.arange(C))
    want = np.array([ref.others(a, k) for a in range(C)])
    assert (got >= 0).mean() > 0.5  # the lists did fill
    np.testing.assert_array_equal(got, want)


def test_a_lookalike_that_stops_coming_back_fades():
    lists = DoppelgangerLists(10, k=1, decay=0.5, symmetric=False)
    lists.update([0], [1], [0.9])
    assert lists.lookalikes([0])[0, 0] == 1
    lists.update([0], [2], [0.5])  # 1: 0.95 * 0.5 = 0.475 < 0.75
    assert lists.lookalikes([0])[0, 0] == 2
    lists.update([0, 0], [1, 1], [-0.6, -0.6])  # seen again, twice: 0.475 * 0.5 + 2 * 0.2 beats 0.75 * 0.5
    assert lists.lookalikes([0])[0, 0] == 1


def test_update_from_packed_device_pairs_and_state_dict():
    a, b = DoppelgangerLists(50, 2), DoppelgangerLists(50, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        rows, others = torch.randint(50, (20,), generator=g), torch.randint(50, (20,), generator=g)
        cos = torch.rand(20, generator=g)
        a.update_packed(pack_pairs(rows, others, cos))
        b.update(rows, others, cos)
    np.testing.assert_array_equal(a.others, b.others)
    state = a.state_dict()
    c = DoppelgangerLists(50, 2)
    c.load_state_dict(state)
    np.testing.assert_array_equal(c.others, a.others)
    np.testing.assert_array_equal(c.scores, a.scores)
    assert c.updates == 5
    before = a.others.copy()
    state["others"][0, 0] += 1  # a copy, not a view of the lists
    np.testing.assert_array_equal(a.others, before)
    with pytest.raises(ValueError, match="k=2, these lists 3"):
        DoppelgangerLists(50, 3).load_state_dict(a.state_dict())


def test_size_is_six_bytes_per_entry():
    lists = DoppelgangerLists(1000, 4)
    assert lists.nbytes == 1000 * 4 * 6
    assert lists.others.dtype == np.int32 and lists.scores.dtype == np.float16


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(num_classes=10, k=0),
                                    dict(num_classes=10, decay=0.0), dict(num_classes=2**31)])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        DoppelgangerLists(**kwargs)
