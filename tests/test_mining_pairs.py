"""Mining pairs: each head's (row class, closest other class, cosine) against brute force from
its state, the combination over column shards, and the packing for one transfer."""
import pytest
import torch
import torch.nn.functional as F

from protomem.functional import margin_ce_stats
from protomem.losses import DCQLoss, FullSoftmaxLoss, PartialFCLoss, PrototypeMemoryLoss
from protomem.mining import closest_other_class, combine_best_other, pack_pairs, unpack_pairs
from test_heads_stats import CENTRES, C, D, data  # the same clustered batches


def brute_closest(x, W, col_labels, y):
    """(best other cosine [B], cosines of every column [B, M], other-label mask [B, M])."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(W.double(), dim=1).T
    other = (col_labels[None, :] != y[:, None]) & (col_labels[None, :] >= 0)
    return torch.where(other, cos, -torch.inf).max(1).values, cos, other


def check_pairs(pairs, x, W, col_labels, y):
    """The head's pairs name a class whose best column reaches the brute-force best other cosine."""
    rows, others, cos = pairs
    best, all_cos, other = brute_closest(x, W, col_labels, y)
    assert torch.equal(rows, y)
    assert cos.dtype == torch.float32 and others.dtype == torch.int64
    torch.testing.assert_close(cos.double(), best, atol=1e-5, rtol=0)
    # the named class's best column (its cosine) is the best other cosine
    named = torch.where(other & (col_labels[None, :] == others[:, None]), all_cos, -torch.inf).max(1).values
    torch.testing.assert_close(named, best, atol=1e-5, rtol=0)
    assert bool((others != y).all())


def test_prototype_memory_pairs_are_against_the_updated_memory():
    head = PrototypeMemoryLoss(D, 40, momentum=0.5)
    assert head.mining_pairs() is None
    for step in range(6):
        x, y = data(step % 3, noise=2.0)
        head(x, y)
        check_pairs(head.mining_pairs(), x, head.memory.protos.float(), head.memory.slot_labels, y)


def test_prototype_memory_pairs_leave_one_out():
    head = PrototypeMemoryLoss(D, 40, exemplars="leave_one_out", detach_prototypes=False)
    for step in range(4):
        x, y = data(step)
        head(x, y)
        check_pairs(head.mining_pairs(), x, head.memory.protos.float(), head.memory.slot_labels, y)


def test_dcq_pairs_are_against_the_queue_the_step_used():
    head = DCQLoss(D, 50)
    for step in range(5):
        x, y = data(step)
        k = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        head.flush()
        queue, labels = head.queue.keys.clone(), head.queue.labels.clone()
        head(x, k, y)
        rows, others, cos = head.mining_pairs()
        if step == 0:  # an empty queue: no other class
            assert bool((others == -1).all()) and bool(torch.isinf(cos).all())
            continue
        check_pairs((rows, others, cos), x, queue.float(), labels, y)


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_softmax_heads_pairs_over_the_sampled_classes(rate):
    head = FullSoftmaxLoss(D, C, seed=2) if rate == 1.0 else PartialFCLoss(D, C, sample_rate=rate, seed=2)
    with torch.no_grad():
        head.weight.copy_(CENTRES + torch.randn(C, D, generator=torch.Generator().manual_seed(3)))
    for step in range(3):
        x, y = data(step)
        head(x, y)
        used = head.last_sampled == step
        check_pairs(head.mining_pairs(), x, head.weight.detach()[used], torch.nonzero(used).squeeze(1), y)


def test_ties_name_the_smallest_class_also_over_shards():
    """Equal columns: the smallest class id, whether one group holds every column or the columns
    are split into shards combined by combine_best_other."""
    W = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    W[4], W[1] = W[0], W[0]  # classes 0, 1 and 4 tie; 2, 3 and 5 differ
    x = W[0:1].repeat(3, 1) + 0.01 * torch.randn(3, D, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([2, 3, 5])
    labels = torch.arange(6)
    kw = dict(scale=30.0, m3=0.2, target_index=y)
    *_, best, idx = margin_ce_stats(x, W, y, labels, with_index=True, **kw)
    assert closest_other_class(idx, labels).tolist() == [0, 0, 0]
    # two shards [0, 3) and [3, 6), as ranks hold them: the same class
    shards = []
    for lo, hi in ((3, 6), (0, 3)):  # the later shard first: order must not matter
        t = torch.where((y >= lo) & (y < hi), y - lo, -1)
        *_, b, i = margin_ce_stats(x, W[lo:hi], y, labels[lo:hi], with_index=True, **{**kw, "target_index": t})
        shards.append((b, closest_other_class(i, labels[lo:hi])))
    b, c = combine_best_other(torch.stack([s[0] for s in shards]), torch.stack([s[1] for s in shards]))
    assert c.tolist() == [0, 0, 0]
    torch.testing.assert_close(b, best)


def test_combine_best_other_matches_a_loop():
    g = torch.Generator().manual_seed(7)
    best = torch.randint(0, 4, (3, 40), generator=g).float() / 4  # many ties
    cls = torch.randint(0, 50, (3, 40), generator=g)
    best[0, :5], cls[0, :5] = -torch.inf, -1  # groups without an other column
    best[:, 5], cls[:, 5] = -torch.inf, -1  # a row with none at all
    top, out = combine_best_other(best, cls)
    for b in range(40):
        m = max(best[:, b].tolist())
        want = min([int(cls[r, b]) for r in range(3) if best[r, b] == m and cls[r, b] >= 0], default=-1)
        assert out[b] == want and top[b] == m


def test_pack_pairs_round_trip_is_exact():
    g = torch.Generator().manual_seed(8)
    rows = torch.randint(-1, 2**40, (33,), generator=g)
    others = torch.randint(-1, 2**40, (33,), generator=g)
    cos = torch.rand(33, generator=g) * 2 - 1
    cos[3], cos[4] = -torch.inf, torch.nan
    r, o, c = unpack_pairs(pack_pairs(rows, others, cos))
    assert torch.equal(r, rows) and torch.equal(o, others)
    assert torch.equal(c[~torch.isnan(c)], cos[~torch.isnan(cos)]) and bool(torch.isnan(c[4]))


@pytest.mark.parametrize("name", ["pm", "dcq", "pfc", "full"])
def test_packed_pairs_are_the_pairs_packed(name):
    """mining_pairs(packed=True) (the trainer's one transfer) unpacks to mining_pairs(), bit for bit."""
    head = {"pm": lambda: PrototypeMemoryLoss(D, 64), "dcq": lambda: DCQLoss(D, 64),
            "pfc": lambda: PartialFCLoss(D, C, sample_rate=0.5, seed=1),
            "full": lambda: FullSoftmaxLoss(D, C, seed=1)}[name]()
    assert head.mining_pairs(packed=True) is None
    for step in range(3):
        x, y = data(step)
        head(x, F.normalize(x + 0.1, dim=1), y) if name == "dcq" else head(x, y)
        packed = head.mining_pairs(packed=True)
        assert packed.dtype == torch.int64 and packed.shape == (len(y), 3)
        for got, want in zip(unpack_pairs(packed), head.mining_pairs()):
            assert torch.equal(got.view(torch.int32) if got.dtype == torch.float32 else got,
                               want.view(torch.int32) if want.dtype == torch.float32 else want)
    assert bool((unpack_pairs(packed)[1] >= 0).any())
