"""PartialFCLoss / FullSoftmaxLoss against materialised logits; the sampling's properties."""
import pytest
import torch
from heads_reference import full_softmax_reference

from protomem.losses import FullSoftmaxLoss, PartialFCLoss
from protomem.losses.partial_fc import class_uniform, init_rows
from protomem.margins import ArcFace, CombinedMargin, CosFace

MARGINS = [CosFace(64, 0.4), ArcFace(64, 0.5), CombinedMargin(32, 1.0, 0.3, 0.2)]


def batch(B, D, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g).to(dtype), torch.randint(C, (B,), generator=g)


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
@pytest.mark.parametrize("B,D,C", [(1, 3, 2), (37, 129, 1001), (64, 16, 5000)])
def test_full_softmax_matches_reference(margin, B, D, C):
    head = FullSoftmaxLoss(D, C, margin=margin, seed=3)
    W = head.weight.detach().clone().requires_grad_()
    x, y = batch(B, D, C)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = head(xa, y), full_softmax_reference(xb, W, y, margin)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad, W.grad, atol=1e-5 * float(W.grad.abs().max()), rtol=1e-4)
    assert head.last_stats["sampled"] == C and (head.last_sampled == 0).all()


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_partial_fc_is_the_softmax_over_its_sample(rate):
    C, D = 3000, 24
    head = PartialFCLoss(D, C, sample_rate=rate, margin=CosFace(32, 0.3), seed=1)
    W = head.weight.detach().clone().requires_grad_()
    for step in range(3):
        x, y = batch(50, D, C, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = head(xa, y)
        cols = torch.nonzero(head.last_sampled == step).squeeze(1)
        assert torch.isin(y, cols).all()  # every positive class is in the sample
        remap = torch.full((C,), -1, dtype=torch.long)
        remap[cols] = torch.arange(len(cols))
        want = full_softmax_reference(xb, W[cols], remap[y], head.margin)
        loss.backward()
        want.backward()
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
        if step == 0:  # only sampled rows get a gradient
            assert head.weight.grad[~torch.isin(torch.arange(C), cols)].abs().max() == 0
        torch.testing.assert_close(head.weight.grad, W.grad, atol=1e-5 * float(W.grad.abs().max()), rtol=1e-4)
        # the sample holds rate * C classes on average: within 5 sigma of the binomial
        n, expected = len(cols), rate * C
        assert abs(n - expected) < 5 * (expected * (1 - rate)) ** 0.5 + 1, (n, expected)


def test_sample_is_deterministic_and_changes_every_step():
    a, b = PartialFCLoss(8, 2000, 0.1, seed=5), PartialFCLoss(8, 2000, 0.1, seed=5)
    x, y = batch(16, 8, 2000)
    samples = []
    for _ in range(3):
        a(x, y), b(x, y)
        assert torch.equal(a.last_sampled, b.last_sampled)
        samples.append(torch.nonzero(a.last_sampled == a.step - 1).squeeze(1))
    assert not torch.equal(samples[0], samples[1]) and not torch.equal(samples[1], samples[2])


def test_class_uniform_is_uniform_and_device_independent():
    u = class_uniform(torch.arange(200_000), seed=7, step=3)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts - 20_000).abs().max() < 5 * 20_000**0.5  # chi-by-eye: within 5 sigma per bin
    assert not torch.equal(u, class_uniform(torch.arange(200_000), seed=7, step=4))
    assert torch.equal(u[1000:2000], class_uniform(torch.arange(1000, 2000), seed=7, step=3))


def test_initialisation_does_not_depend_on_the_shards():
    whole = init_rows(0, 70_000, 4, seed=2, dtype=torch.float32, device=None)
    parts = torch.cat([init_rows(0, 65_535, 4, 2, torch.float32, None),
                       init_rows(65_535, 70_000, 4, 2, torch.float32, None)])
    assert torch.equal(whole, parts)
    assert 0.009 < float(whole.std()) < 0.011
    assert not torch.equal(whole, init_rows(0, 70_000, 4, seed=3, dtype=torch.float32, device=None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_embeddings(dtype):
    head = FullSoftmaxLoss(32, 300, margin=CosFace(64, 0.4))
    x, y = batch(20, 32, 300, dtype)
    x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    exact = full_softmax_reference(x.detach().float(), head.weight.detach(), y, head.margin)
    torch.testing.assert_close(loss, exact, atol=1e-4, rtol=1e-4)


def test_stats_and_repr():
    head = PartialFCLoss(8, 100, 0.5, margin=CosFace(16, 0.2))
    x, y = batch(10, 8, 100)
    head(x, y)
    head(x, y)
    s = head.last_stats
    assert s["rows"] == 10 and s["positive_age"] == 1.0 and 0 < s["sampled"] <= 100
    assert "num_classes=100" in repr(head) and "sample_rate=0.5" in repr(head)
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFCLoss(8, 100, 0.0)
    with pytest.raises(ValueError, match="num_classes"):
        PartialFCLoss(8, 0)
