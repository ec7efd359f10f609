"""The heads' last_stats against the same statistics computed here from their state by brute
force: accuracy (top-1 without margin over the columns the step used), DCQ's positive cosine."""
import pytest
import torch
import torch.nn.functional as F

from protomem.losses import DCQLoss, FullSoftmaxLoss, PartialFCLoss, PrototypeMemoryLoss

D, C = 24, 90


CENTRES = torch.randn(C, D, generator=torch.Generator().manual_seed(1))


def data(step, B=16, noise=1.2):
    g = torch.Generator().manual_seed(100 + step)
    y = torch.randint(C, (B // 2,), generator=g).repeat(2)
    return CENTRES[y] + noise * torch.randn(B, D, generator=g), y


def assert_informative(values):
    """The statistic moves between 0 and 1 over the steps: a check that can fail."""
    assert any(0 < v < 1 for v in values), values


def top1(x, W, col_labels, y, target_cos=None):
    """Mean over rows of: the target cosine (the row's class column, or ``target_cos``) is at
    least every other-label column's cosine (columns labelled < 0 never count)."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(W.double(), dim=1).T
    same = col_labels[None, :] == y[:, None]
    if target_cos is None:
        target_cos = torch.where(same, cos, -torch.inf).max(1).values
    other = torch.where(same | (col_labels[None, :] < 0), -torch.inf, cos).max(1).values
    return float((target_cos >= other).double().mean())


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_softmax_heads_accuracy(rate):
    head = FullSoftmaxLoss(D, C, seed=2) if rate == 1.0 else PartialFCLoss(D, C, sample_rate=rate, seed=2)
    with torch.no_grad():  # weights near the class centres: accuracies between 0 and 1
        head.weight.copy_(CENTRES + torch.randn(C, D, generator=torch.Generator().manual_seed(3)))
    seen = []
    for step in range(4):
        x, y = data(step)
        head(x, y)
        used = head.last_sampled == step  # the columns this step sampled
        want = top1(x, head.weight.detach()[used], torch.nonzero(used).squeeze(1), y)
        assert head.last_stats["accuracy"] == pytest.approx(want, abs=1e-9)
        assert head.last_stats["sampled"] == int(used.sum())
        seen.append(want)
    assert_informative(seen)


def test_prototype_memory_accuracy_is_against_the_updated_memory():
    head = PrototypeMemoryLoss(D, 40, momentum=0.9)  # mostly old prototypes: top-1 below 1
    seen = []
    for step in range(8):
        x, y = data(step % 4, noise=2.0)  # classes come back, their prototypes refreshed
        head(x, y)
        mem = head.memory
        want = top1(x, mem.protos.float(), mem.slot_labels, y)
        assert head.last_stats["accuracy"] == pytest.approx(want, abs=1e-9)
        seen.append(want)
    assert_informative(seen)


def test_dcq_accuracy_and_positive_cosine():
    head = DCQLoss(D, 50)
    seen = []
    for step in range(5):
        x, y = data(step)
        k = x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        queue, queue_labels = head.queue.keys.clone(), head.queue.labels.clone()
        if head._pending is not None:  # the previous step's keys join before this step
            head.flush()
            queue, queue_labels = head.queue.keys.clone(), head.queue.labels.clone()
        head(x, k, y)
        pos = F.cosine_similarity(x.double(), k.double(), dim=1)
        assert head.last_stats["positive_cos"] == pytest.approx(float(pos.mean()), abs=1e-6)
        want = top1(x, queue.float(), queue_labels, y, target_cos=pos)
        assert head.last_stats["accuracy"] == pytest.approx(want, abs=1e-9)
        seen.append(want)
    assert_informative(seen)
