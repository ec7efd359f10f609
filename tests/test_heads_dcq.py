"""DCQLoss and MomentumEncoder against the plain-PyTorch model in heads_reference.py."""
import pytest
import torch
from heads_reference import DCQReference

from protomem.losses import DCQLoss, MomentumEncoder
from protomem.margins import ArcFace, CosFace


def views(n_steps, B, D, dtype, n_classes=9, seed=0):
    """(q, k, labels) per step: k is a noisy second view of q's identity."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, D, generator=g)
    for _ in range(n_steps):
        y = torch.randint(n_classes, (B,), generator=g)
        q = centres[y] + 0.5 * torch.randn(B, D, generator=g)
        k = centres[y] + 0.5 * torch.randn(B, D, generator=g)
        yield q.to(dtype), k.to(dtype), y


@pytest.mark.parametrize("margin", [CosFace(50, 0.3), ArcFace(16, 0.4)], ids=repr)
@pytest.mark.parametrize("B,D,K", [(7, 5, 3), (13, 33, 20), (31, 16, 100)])
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_gradients_and_queue_match_reference(margin, B, D, K, queue_dtype):
    head = DCQLoss(D, K, margin=margin, queue_dtype=queue_dtype)
    ref = DCQReference(D, K, margin, queue_dtype)
    for q, k, y in views(6, B, D, torch.float32):
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        la, lb = head(qa, k, y), ref.step(qb, k, y)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(qa.grad, qb.grad, atol=1e-5, rtol=1e-4)
    head.flush()
    assert torch.equal(head.queue.labels, ref.labels)
    assert torch.equal(head.queue.keys, ref.keys)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_embedding_dtypes(dtype):
    head, ref = DCQLoss(12, 17), DCQReference(12, 17, CosFace(50, 0.3))
    for q, k, y in views(4, 11, 12, dtype):
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        la, lb = head(qa, k, y), ref.step(qb, k, y)
        la.backward()
        lb.backward()
        assert qa.grad.dtype == dtype
        torch.testing.assert_close(la.float(), lb.float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(qa.grad.float(), qb.grad.float(), atol=1e-3, rtol=1e-2)


def test_deferred_enqueue_keeps_the_forward_queue_for_backward():
    """The keys join the queue after the step: backward must not see them (nor fail)."""
    head = DCQLoss(4, 6)
    (q, k, y), (q2, k2, y2) = list(views(2, 5, 4, torch.float32))
    head(q, k, y)
    assert int(head.queue.stats()["filled"]) == 0  # not yet
    q2 = q2.requires_grad_()
    loss = head(q2, k2, y2)  # the first step's keys are in the queue now
    assert head.queue.stats()["filled"] == 5
    head.flush()
    assert head.queue.stats()["filled"] == 6
    loss.backward()  # computed against the 5-entry queue, unaffected by the flush
    assert torch.isfinite(q2.grad).all()


def test_stats_and_repr():
    head = DCQLoss(8, 10)
    assert head.last_stats == {}
    for q, k, y in views(3, 6, 8, torch.float32):
        head(q, k, y)
    s = head.last_stats
    assert s["rows"] == 6 and 0 <= s["accuracy"] <= 1 and -1 <= s["positive_cos"] <= 1
    assert s["queue_filled"] == 10 and s["committed"] is True
    assert "ClassQueue(queue_size=10" in repr(head) and "CosFace(scale=50.0" in repr(head)


def test_momentum_encoder_is_an_ema_without_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = MomentumEncoder(net, momentum=0.9)
    start = [p.detach().clone() for p in ema.encoder.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net(torch.randn(8, 3))  # moves the BatchNorm running statistics
    ema.update()
    for s, p, e in zip(start, net.parameters(), ema.encoder.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p.detach())
    assert torch.equal(ema.encoder[1].running_mean, net[1].running_mean)
    out = ema(torch.randn(5, 3))
    assert not out.requires_grad and all(not p.requires_grad for p in ema.encoder.parameters())
    assert set(ema.state_dict()) == {"encoder." + k for k in net.state_dict()}
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(net, momentum=1.0)



def test_batch_larger_than_the_queue_keeps_its_last_keys():
    """As documented: the keys wrap around the ring, the last queue_size of them stay."""
    head = DCQLoss(8, 5)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    head(q, k, torch.arange(10, 17))
    head.flush()
    order = torch.argsort(head.queue.labels)
    assert head.queue.labels[order].tolist() == list(range(12, 17))
    torch.testing.assert_close(head.queue.keys[order], k[2:], atol=0, rtol=0)


def test_unchecked_negative_labels_leave_their_rows_out(monkeypatch):
    """Where the label check is skipped (CUDA without PROTOMEM_DEBUG): rows labelled < 0 give the
    loss and gradients of the batch without them, and their keys join the queue as empty entries."""
    from protomem.losses import dcq

    monkeypatch.setattr(dcq, "check_batch_labels", lambda labels: None)
    g = torch.Generator().manual_seed(5)
    a, b = DCQLoss(8, 40), DCQLoss(8, 40)
    for step in range(3):
        q, k = torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)
        y = torch.randint(6, (9,), generator=g)
        y[[2, 5]] = -1
        keep = y >= 0
        qa, qb = q.clone().requires_grad_(), q[keep].clone().requires_grad_()
        la, lb = a(qa, k, y), b(qb, k[keep], y[keep])
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(qa.grad[keep], qb.grad, atol=1e-6, rtol=1e-5)
        assert (qa.grad[~keep] == 0).all() and a.last_stats["rows"] == 7
        a.flush()
        b.flush()
        held = a.queue.labels[a.queue.labels >= 0]
        assert sorted(held.tolist()) == sorted(b.queue.labels[b.queue.labels >= 0].tolist())
