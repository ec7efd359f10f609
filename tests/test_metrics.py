"""protomem.metrics against brute-force loops written from the definitions and hand-checked cases."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from protomem import metrics as M


def gen(seed):
    return torch.Generator().manual_seed(seed)


def unit2d(degrees, norm=1.0):
    """2-D embedding at an angle, with an arbitrary norm (the metrics normalise)."""
    a = math.radians(degrees)
    return [norm * math.cos(a), norm * math.sin(a)]


def clustered(seed, n_classes, per_class, dim, noise):
    """Embeddings near one random centre per class; labels 0..n_classes-1 in shuffled order."""
    g = gen(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    emb = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g, dtype=torch.float64)
    return emb.float(), labels


# ------------------------------------------------------------------------------------------------
# brute force, straight from the definitions


def brute_threshold_score(impostors, far):
    """Smallest threshold among all candidate values with #{impostor > t} <= far * n (exact
    decimal arithmetic), found by trying every candidate; None when far * n < 1."""
    impostors = np.asarray(impostors)
    budget = Fraction(str(far)) * len(impostors)
    if budget < 1:
        return None
    for t in [-math.inf] + sorted(set(impostors.tolist())):
        if int(np.sum(impostors > t)) <= budget:
            return t
    raise AssertionError("unreachable: the largest impostor score always qualifies")


def brute_tar_at_far(scores, genuine, far):
    gen_s = [s for s, g in zip(scores, genuine) if g]
    imp_s = [s for s, g in zip(scores, genuine) if not g]
    t = brute_threshold_score(imp_s, far)
    if t is None:
        return None, None
    return sum(1 for s in gen_s if s > t) / len(gen_s), t


def brute_verification(e1, e2, same, nfolds, thresholds, far_target):
    """insightface's calculate_roc / calculate_val rewritten as loops (exact VAL threshold)."""
    e1 = e1.double().numpy()
    e2 = e2.double().numpy()
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = ((e1 - e2) ** 2).sum(1)
    same = np.asarray(same, dtype=bool)
    idx = np.arange(len(dist))
    accs, best_ts, vals, fars = [], [], [], []
    for test in np.array_split(idx, nfolds):
        train = np.setdiff1d(idx, test)
        train_acc = [np.mean((dist[train] < t) == same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        best_ts.append(best)
        accs.append(np.mean((dist[test] < best) == same[test]))
        # VAL: the largest distance threshold with train FAR <= target, by trying candidates
        imp_train = dist[train][~same[train]]
        budget = Fraction(str(far_target)) * len(imp_train)
        t_val = max(t for t in list(imp_train) + [math.inf] if np.sum(imp_train < t) <= budget)
        vals.append(np.mean(dist[test][same[test]] < t_val))
        fars.append(np.mean(dist[test][~same[test]] < t_val))
    return dict(accuracy=np.mean(accs), accuracy_std=np.std(accs), threshold=np.mean(best_ts),
                fold_accuracy=accs, val=np.mean(vals), val_std=np.std(vals), far=np.mean(fars))


def brute_pairs(emb, labels):
    """Every i < j pair, genuine first, each group in (i, j) order."""
    e = emb.double()
    e = e / e.norm(dim=1, keepdim=True)
    gen_p, imp_p = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            (gen_p if labels[i] == labels[j] else imp_p).append((i, j))
    pairs = gen_p + imp_p
    scores = torch.tensor([float(e[i] @ e[j]) for i, j in pairs], dtype=torch.float64)
    return scores, torch.tensor([True] * len(gen_p) + [False] * len(imp_p)), torch.tensor(pairs)


# ------------------------------------------------------------------------------------------------
# k-fold


@pytest.mark.parametrize("n,k", [(10, 10), (6000, 10), (37, 10), (5, 2), (23, 4)])
def test_kfold_split_is_sklearn_rule(n, k):
    splits = M.kfold_split(n, k)
    expected = np.array_split(np.arange(n), k)   # first n % k folds one longer, contiguous
    assert len(splits) == k
    for (train, test), want in zip(splits, expected):
        assert test.tolist() == want.tolist()
        assert sorted(train.tolist() + test.tolist()) == list(range(n))


@pytest.mark.parametrize("n,k", [(5, 1), (5, 6), (5, 2.0)])
def test_kfold_split_bad(n, k):
    with pytest.raises(ValueError, match="nfolds"):
        M.kfold_split(n, k)


# ------------------------------------------------------------------------------------------------
# verification


def test_verification_hand_case():
    # six pairs, three folds of two; distance 2 - 2cos: 0.2 (cos 0.9), 1.0 (cos 0.5), 2.0, 4.0
    cos_of = {0.2: 0.9, 1.0: 0.5, 2.0: 0.0, 4.0: -1.0}
    pairs = [(0.2, True), (2.0, False), (1.0, True), (4.0, False), (1.0, False), (0.2, True)]
    e1 = torch.tensor([unit2d(0, 3.0)] * 6, dtype=torch.float64)
    e2 = torch.tensor([unit2d(math.degrees(math.acos(cos_of[d])), 0.5) for d, _ in pairs],
                      dtype=torch.float64)
    same = [s for _, s in pairs]
    r = M.verification_accuracy(e1, e2, same, nfolds=3, thresholds=[0.5, 1.5, 3.0], far_target=1.0)
    # fold 0 (train 2..5): every threshold gets 3/4 right -> first, 0.5; test pairs 0, 1 both right
    # fold 1 (train 0,1,4,5): 0.5 gets 4/4; test: pair 2 (1.0, same) rejected, pair 3 right -> 1/2
    # fold 2 (train 0..3): 1.5 gets 4/4; test: pair 4 (1.0, diff) accepted (wrong), pair 5 right
    assert r["fold_accuracy"] == pytest.approx([1.0, 0.5, 0.5])
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["accuracy_std"] == pytest.approx(math.sqrt(1 / 18))
    assert r["threshold"] == pytest.approx((0.5 + 0.5 + 1.5) / 3)
    # far_target 1: every pair accepted -> VAL 1 and FAR 1 on every fold
    assert r["val"] == 1.0 and r["far"] == 1.0 and r["val_threshold"] == math.inf


@pytest.mark.parametrize("seed,thresholds", [(0, None), (1, [2.5, 0.3, 1.1, 0.7, 1.9, 1.0])])
def test_verification_vs_brute_force(seed, thresholds):
    g = gen(seed)
    p, d = 300, 16
    same = torch.rand(p, generator=g) < 0.5
    e1 = torch.randn(p, d, generator=g)
    e2 = torch.where(same[:, None], e1 + 0.9 * torch.randn(p, d, generator=g), torch.randn(p, d, generator=g))
    grid = np.arange(400) * 0.01 if thresholds is None else np.asarray(thresholds)
    got = M.verification_accuracy(e1, e2, same, nfolds=10, thresholds=thresholds, far_target=0.01)
    want = brute_verification(e1, e2, same.numpy(), 10, grid, 0.01)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0.6 < got["accuracy"] < 1.0   # the data has signal but is not separable
    assert got["far"] <= 0.02


def test_verification_perfect_embeddings():
    g = gen(2)
    p, d = 6000, 64
    same = torch.arange(p) % 2 == 0
    ids1 = torch.randperm(d, generator=g).repeat(p // d + 1)[:p]
    ids2 = torch.where(same, ids1, (ids1 + 1) % d)
    eye = torch.eye(d)
    e1 = eye[ids1] + 0.01 * torch.randn(p, d, generator=g)
    e2 = eye[ids2] + 0.01 * torch.randn(p, d, generator=g)
    r = M.verification_accuracy(e1, e2, same)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    assert r["val"] == 1.0 and r["far"] <= 1e-3
    assert 0 < r["threshold"] < 2   # genuine distances ~0, impostor ~2


def test_verification_random_embeddings_near_chance():
    g = gen(3)
    p = 6000
    r = M.verification_accuracy(torch.randn(p, 64, generator=g), torch.randn(p, 64, generator=g),
                                torch.rand(p, generator=g) < 0.5)
    assert 0.46 < r["accuracy"] < 0.54
    assert r["val"] < 0.02   # at FAR 1e-3, random pairs are accepted about that often


def test_verification_val_nan_without_enough_impostors():
    g = gen(4)
    e1, e2 = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    r = M.verification_accuracy(e1, e2, torch.arange(40) % 2 == 0)   # 18 train impostors < 1000
    assert math.isnan(r["val"]) and math.isnan(r["val_threshold"])
    assert 0 <= r["accuracy"] <= 1


def test_verification_bad_input():
    e = torch.randn(10, 4)
    with pytest.raises(ValueError, match="emb2"):
        M.verification_accuracy(e, torch.randn(10, 5), [True] * 10)
    with pytest.raises(ValueError, match="issame"):
        M.verification_accuracy(e, e, [True] * 9)
    with pytest.raises(ValueError, match="nfolds"):
        M.verification_accuracy(e, e, [True] * 10, nfolds=11)
    with pytest.raises(ValueError, match="far"):
        M.verification_accuracy(e, e, [True] * 10, nfolds=2, far_target=0)


# ------------------------------------------------------------------------------------------------
# TAR at FAR


def test_tar_at_far_hand_case():
    imp = [float(v) for v in range(1, 11)]       # 10 impostor scores 1..10
    gen_s = [8.5, 9.0, 9.5, 11.0]
    scores = torch.tensor(gen_s + imp)
    genuine = torch.tensor([True] * 4 + [False] * 10)
    with pytest.warns(RuntimeWarning, match="fewer than 1/far"):
        r = M.tar_at_far(scores, genuine, fars=(0.1, 0.2, 0.05, 1.0))
    # far 0.1: one false accept allowed -> threshold 9 (only 10 above); genuine 9.0 is not above it
    assert r[0.1] == (0.5, 9.0)
    # far 0.2: two allowed -> threshold 8; all four genuine above
    assert r[0.2] == (1.0, 8.0)
    # far 0.05: 10 impostors < 1/0.05 -> not measurable
    assert all(math.isnan(v) for v in r[0.05])
    assert r[1.0] == (1.0, -math.inf)


def test_tar_at_far_decimal_budget():
    # far * n is an integer in decimal but not in float: 0.29 * 100 = 28.999999999999996 and
    # 0.07 * 100 = 7.000000000000001; the budget is 29 and 7 false accepts all the same
    assert 0.29 * 100 < 29 and 0.07 * 100 > 7
    scores = torch.arange(1, 101, dtype=torch.float64)   # 100 impostors 1..100
    r = M.tar_at_far(torch.cat([scores, torch.tensor([71.5])]), torch.arange(101) == 100, (0.29, 0.07))
    assert r[0.29] == (1.0, 71.0)    # 30th largest: exactly 29 impostors above
    assert r[0.07] == (0.0, 93.0)    # 8th largest: exactly 7 above


def test_tar_at_far_ties_rejected():
    # impostors 3, 3, 3, 1 at far 0.25: one false accept allowed; any threshold below 3 accepts 3
    # impostors, so the threshold is 3 and the realised FAR is 0; genuine 3 is not above it
    scores = torch.tensor([2.0, 3.0, 4.0, 3.0, 3.0, 3.0, 1.0])
    genuine = torch.tensor([True, True, True, False, False, False, False])
    assert M.tar_at_far(scores, genuine, fars=0.25) == {0.25: (1 / 3, 3.0)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_vs_brute_force(seed):
    g = gen(seed)
    p = 4000
    genuine = torch.rand(p, generator=g) < 0.3
    scores = torch.randn(p, generator=g, dtype=torch.float64) + 1.5 * genuine
    if seed == 2:
        scores = (scores * 4).round() / 4   # many ties
    n_imp = int((~genuine).sum())
    fars = (1e-3, 5e-3, 0.01, 0.1, 0.5)
    got = M.tar_at_far(scores, genuine, fars)
    for far in fars:
        tar, t = brute_tar_at_far(scores.tolist(), genuine.tolist(), far)
        assert got[far] == (tar, t), far
        assert ((scores[~genuine] > t).sum().item()) <= far * n_imp + 1e-9
    assert n_imp < 10**4
    with pytest.warns(RuntimeWarning, match="fewer than 1/far"):
        tar, t = M.tar_at_far(scores, genuine, 1e-4)[1e-4]
    assert math.isnan(tar) and math.isnan(t)


def test_tar_at_far_bad_input():
    with pytest.raises(ValueError, match="genuine"):
        M.tar_at_far(torch.rand(5), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="far"):
        M.tar_at_far(torch.rand(5), torch.ones(5, dtype=torch.bool), fars=(0.0,))
    with pytest.raises(ValueError, match="scores"):
        M.tar_at_far(torch.rand(5, 2), torch.ones(5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# pair scores


def test_pair_scores_hand_case():
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    scores, genuine, pairs = M.pair_scores(emb, torch.tensor([5, 5, 9]), return_pairs=True)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert genuine.tolist() == [True, False, False]
    torch.testing.assert_close(scores, torch.tensor([0.0, -1.0, 0.0]))


@pytest.mark.parametrize("block_size", [1, 7, 32, 1000])
def test_pair_scores_all_vs_brute_force(block_size):
    emb, labels = clustered(5, n_classes=7, per_class=5, dim=6, noise=0.5)
    emb, labels = emb[:33], labels[:33]   # uneven class sizes
    want_s, want_g, want_p = brute_pairs(emb, labels.tolist())
    s, g, p = M.pair_scores(emb, labels, block_size=block_size, return_pairs=True)
    assert p.tolist() == want_p.tolist()
    assert g.tolist() == want_g.tolist()
    torch.testing.assert_close(s.double(), want_s, atol=1e-6, rtol=0)
    s2, g2 = M.pair_scores(emb, labels, block_size=block_size)
    assert torch.equal(s2, s) and torch.equal(g2, g)


def test_pair_scores_sampled_impostors():
    emb, labels = clustered(6, n_classes=9, per_class=6, dim=5, noise=0.3)
    _, all_g, all_p = brute_pairs(emb, labels.tolist())
    impostor_set = {tuple(x) for x in all_p[~all_g].tolist()}
    e = emb.double() / emb.double().norm(dim=1, keepdim=True)
    s, g, p = M.pair_scores(emb, labels, max_impostor_pairs=100, generator=gen(0), return_pairs=True)
    assert int(g.sum()) == int(all_g.sum()) and (~g).sum() == 100
    assert p[g].tolist() == all_p[all_g].tolist()        # every genuine pair, in order
    sampled = [tuple(x) for x in p[~g].tolist()]
    assert len(set(sampled)) == 100 and set(sampled) <= impostor_set
    assert sampled == sorted(sampled)
    torch.testing.assert_close(s.double(), (e[p[:, 0]] * e[p[:, 1]]).sum(1), atol=1e-6, rtol=0)
    # reproducible with the same seed, different with another; block size is irrelevant
    s_again, _, p_again = M.pair_scores(emb, labels, max_impostor_pairs=100, generator=gen(0),
                                        block_size=3, return_pairs=True)
    assert torch.equal(p_again, p) and torch.allclose(s_again, s, atol=1e-6)
    _, _, p_other = M.pair_scores(emb, labels, max_impostor_pairs=100, generator=gen(1), return_pairs=True)
    assert not torch.equal(p_other, p)
    # more than there are: all of them; none: only genuine
    s_all, g_all = M.pair_scores(emb, labels, max_impostor_pairs=10**9)
    assert (~g_all).sum() == len(impostor_set)
    _, g_none = M.pair_scores(emb, labels, max_impostor_pairs=0)
    assert g_none.all() and g_none.numel() == int(all_g.sum())


@pytest.mark.parametrize("m", [10, 40])   # 10: rejection sampling; 40 > half of 48: permutation
def test_pair_scores_sampling_is_uniform(m):
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)    # 66 pairs, 18 genuine, 48 impostor
    emb = torch.randn(12, 3, generator=gen(9))
    g = gen(10)
    counts = {}
    draws = 800
    for _ in range(draws):
        _, genuine, pairs = M.pair_scores(emb, labels, max_impostor_pairs=m, generator=g, return_pairs=True)
        for pair in pairs[~genuine].tolist():
            counts[tuple(pair)] = counts.get(tuple(pair), 0) + 1
    assert len(counts) == 48
    expected = draws * m / 48
    sd = math.sqrt(expected * (1 - m / 48)) + 1
    assert all(abs(c - expected) < 6 * sd for c in counts.values()), (expected, sorted(counts.values()))


def test_pair_scores_perfect_embeddings_give_tar_one():
    emb, labels = clustered(7, n_classes=50, per_class=10, dim=64, noise=0.01)
    scores, genuine = M.pair_scores(emb, labels, block_size=128)
    assert (~genuine).sum() >= 10**4                      # enough impostors for FAR 1e-4
    r = M.tar_at_far(scores, genuine, fars=(1e-3, 1e-4))
    assert r[1e-3][0] == 1.0 and r[1e-4][0] == 1.0


def test_pair_scores_bad_input():
    with pytest.raises(ValueError, match="labels"):
        M.pair_scores(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        M.pair_scores(torch.randn(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="max_impostor_pairs"):
        M.pair_scores(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), max_impostor_pairs=-1)


# ------------------------------------------------------------------------------------------------
# identification


def test_rank1_hand_case():
    gallery = torch.tensor([unit2d(0), unit2d(90, 2.0), unit2d(180)])
    probes = torch.tensor([unit2d(10, 5.0), unit2d(80), unit2d(170), unit2d(100)])
    acc, correct = M.rank1_identification(gallery, [10, 20, 30], probes, [10, 20, 30, 10],
                                          return_correct=True)
    # the last probe (label 10) is nearest to the 90-degree gallery entry (label 20)
    assert correct.tolist() == [True, True, True, False]
    assert acc == 0.75


@pytest.mark.parametrize("blocks", [(1024, 8192), (1, 1), (7, 13), (64, 5)])
def test_rank1_vs_naive_argmax(blocks):
    g = gen(11)
    gallery = torch.randn(60, 8, generator=g)
    probes = torch.randn(250, 8, generator=g)
    gallery_labels = torch.randint(0, 20, (60,), generator=g)
    probe_labels = torch.randint(0, 20, (250,), generator=g)
    cos = torch.nn.functional.normalize(probes.double(), dim=1) @ torch.nn.functional.normalize(
        gallery.double(), dim=1).T
    naive = gallery_labels[cos.argmax(1)] == probe_labels
    acc, correct = M.rank1_identification(gallery, gallery_labels, probes, probe_labels,
                                          probe_block_size=blocks[0], gallery_block_size=blocks[1],
                                          return_correct=True)
    assert correct.tolist() == naive.tolist()
    assert acc == pytest.approx(naive.double().mean().item())
    assert 0 < acc < 1


@pytest.mark.parametrize("gallery_block_size", [1, 2, 100])
def test_rank1_ties_go_to_first_gallery_entry(gallery_block_size):
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])   # entries 1 and 2 tie for x-axis probes
    acc, correct = M.rank1_identification(gallery, [0, 1, 2], torch.tensor([[3.0, 0.0], [5.0, 0.1]]),
                                          [1, 1], gallery_block_size=gallery_block_size,
                                          return_correct=True)
    assert correct.tolist() == [True, True] and acc == 1.0


def test_rank1_perfect_embeddings():
    emb, labels = clustered(12, n_classes=30, per_class=4, dim=32, noise=0.01)
    gi, pi = M.identification_split(emb, labels)
    assert M.rank1_identification(emb[gi], labels[gi], emb[pi], labels[pi]) == 1.0


def test_identification_split_first_occurrence():
    labels = torch.tensor([3, 1, 3, 7, 1, 1, 9])
    gi, pi = M.identification_split(torch.zeros(7, 2), labels)
    assert gi.tolist() == [0, 1, 3, 6]       # first 3, first 1, the only 7, the only 9
    assert pi.tolist() == [2, 4, 5]


def test_identification_split_random():
    emb, labels = clustered(13, n_classes=20, per_class=5, dim=4, noise=1.0)
    splits = [M.identification_split(emb, labels, generator=gen(s)) for s in (0, 0, 1)]
    for gi, pi in splits:
        assert sorted(gi.tolist() + pi.tolist()) == list(range(100))
        assert sorted(labels[gi].tolist()) == list(range(20))   # one gallery sample per identity
        assert gi.tolist() == sorted(gi.tolist()) and pi.tolist() == sorted(pi.tolist())
    assert torch.equal(splits[0][0], splits[1][0])
    assert not torch.equal(splits[0][0], splits[2][0])
    first, _ = M.identification_split(emb, labels)
    assert not torch.equal(first, splits[2][0])


# ------------------------------------------------------------------------------------------------
# flip test


class LeftRightTopBottom(torch.nn.Module):
    """Embedding = [left-half sum, right-half sum, top-half sum, bottom-half sum] of channel 0, in
    float64, and records the state it was called in."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)
        self.bn = torch.nn.BatchNorm1d(4, affine=False)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, self.dropout.training, torch.is_grad_enabled(), x.shape[0]))
        c = x[:, 0].double()
        h, w = c.shape[1] // 2, c.shape[2] // 2
        return torch.stack([c[:, :, :w].sum((1, 2)), c[:, :, w:].sum((1, 2)),
                            c[:, :h].sum((1, 2)), c[:, h:].sum((1, 2))], dim=1)


def test_flip_embeddings_flips_width_and_restores_modes():
    model = LeftRightTopBottom()
    model.train()
    model.bn.eval()                       # mixed modes must come back exactly
    x = torch.rand(5, 3, 6, 8, generator=gen(14))
    c = x[:, 0].double()
    left, right = c[:, :, :4].sum((1, 2)), c[:, :, 4:].sum((1, 2))
    top, bottom = c[:, :3].sum((1, 2)), c[:, 3:].sum((1, 2))
    plain = M.flip_embeddings(model, x, batch_size=2, flip=False)
    flipped = M.flip_embeddings(model, x, batch_size=2, flip=True)
    assert plain.dtype == torch.float32 and plain.device.type == "cpu" and plain.shape == (5, 4)
    torch.testing.assert_close(plain, torch.stack([left, right, top, bottom], 1).float())
    # a width flip swaps left and right and keeps top and bottom
    torch.testing.assert_close(flipped, torch.stack([left + right, left + right, 2 * top, 2 * bottom], 1).float())
    assert model.training and model.dropout.training and not model.bn.training
    assert all(not t and not dt and not grad for t, dt, grad, _ in model.calls)
    assert [b for *_, b in model.calls] == [2, 2, 1] + [2, 2, 2, 2, 1, 1]


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_flip_embeddings_batch_size_irrelevant(batch_size):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(6))
    x = torch.randn(7, 3, 5, 5, generator=gen(15))
    model(x)                                # materialise the lazy layer
    with torch.no_grad():
        want = model(x) + model(x.flip(3))
    torch.testing.assert_close(M.flip_embeddings(model, x, batch_size=batch_size), want, atol=1e-5, rtol=1e-5)


def test_flip_embeddings_restores_modes_on_error():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x.sum()                   # not [B, E]

    model = Bad().train()
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        M.flip_embeddings(model, torch.rand(2, 3, 4, 4))
    assert model.training
    with pytest.raises(ValueError, match="images"):
        M.flip_embeddings(model, torch.rand(3, 4, 4))
    with pytest.raises(TypeError, match="model"):
        M.flip_embeddings(lambda x: x, torch.rand(2, 3, 4, 4))
