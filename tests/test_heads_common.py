"""What every head promises: checkpoints that continue exactly, clear errors before any state
changes, non-finite steps that leave the memory alone, [B, 1] / int32 labels, autocast."""
import io

import pytest
import torch

from protomem.losses import DCQLoss, FullSoftmaxLoss, PartialFCLoss, PrototypeMemoryLoss

D, C = 12, 60
HEADS = {
    "pm": lambda: PrototypeMemoryLoss(D, 20, momentum=0.3),
    "pm_loo_cross": lambda: PrototypeMemoryLoss(D, 20, exemplars="leave_one_out", detach_prototypes=False),
    "pm_bf16_fifo": lambda: PrototypeMemoryLoss(D, 20, policy="fifo", memory_dtype=torch.bfloat16),
    "dcq": lambda: DCQLoss(D, 15),
    "pfc": lambda: PartialFCLoss(D, C, sample_rate=0.3),
    "full": lambda: FullSoftmaxLoss(D, C),
}


def step_data(t, B=10):
    g = torch.Generator().manual_seed(1000 + t)
    y = torch.randint(C, (B // 2,), generator=g).repeat(2)
    return torch.randn(B, D, generator=g), y


def call(head, x, y):
    if isinstance(head, DCQLoss):
        return head(x, x.detach().flip(0) * 0.5 + 0.1, y)
    return head(x, y)


def train(head, opt, steps):
    losses = []
    for t in steps:
        x, y = step_data(t)
        loss = call(head, x.requires_grad_(), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


def optimiser(head):
    params = list(head.parameters())
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4) if params else None


def snapshot(head):
    return {k: v.clone() for k, v in head.state_dict().items()}


def assert_same_state(a, b, exact_index=True):
    """Equal state dicts. exact_index=False: the label->slot index may differ in layout (a load
    rebuilds it without tombstones; tombstone and rebuild counters then differ too)."""
    assert a.keys() == b.keys()
    for k in a:
        if not exact_index and k.endswith(("index_keys", "index_vals")):
            continue
        if not exact_index and k.endswith("memory.counters"):
            assert torch.equal(a[k][:6], b[k][:6]), k
            continue
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", HEADS)
def test_checkpoint_round_trip_continues_exactly(name):
    N = 6
    straight = HEADS[name]()
    opt = optimiser(straight)
    want = train(straight, opt, range(2 * N))

    first = HEADS[name]()
    opt1 = optimiser(first)
    got = train(first, opt1, range(N))
    buf = io.BytesIO()
    torch.save({"head": first.state_dict(), "opt": opt1.state_dict() if opt1 else None}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = HEADS[name]()
    resumed.load_state_dict(ckpt["head"])
    opt2 = optimiser(resumed)
    if opt2:
        opt2.load_state_dict(ckpt["opt"])
    got += train(resumed, opt2, range(N, 2 * N))
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6, (got, want)
    assert_same_state(snapshot(resumed), snapshot(straight), exact_index=False)
    if isinstance(resumed, PrototypeMemoryLoss):
        ids = torch.arange(C)
        assert torch.equal(resumed.memory.lookup(ids), straight.memory.lookup(ids))


BAD = [
    ("wide", lambda x, y: (torch.randn(10, D + 1), y), ValueError, r"shape \[B, 12\]"),
    ("flat", lambda x, y: (x.reshape(-1), y), ValueError, r"shape \[B, 12\]"),
    ("empty", lambda x, y: (x[:0], y[:0]), ValueError, "B >= 1"),
    ("int embeddings", lambda x, y: (x.long(), y), TypeError, "float32"),
    ("float labels", lambda x, y: (x, y.float()), TypeError, "int64 or int32"),
    ("label count", lambda x, y: (x, y[:-1]), ValueError, "labels has 9 rows"),
    ("label shape", lambda x, y: (x, y[:, None].repeat(1, 2)), ValueError, r"\[N\] or \[N, 1\]"),
    ("negative label", lambda x, y: (x, torch.where(y == y[0], -3, y)), ValueError, "non-negative|num_classes"),
]


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("case, change, error, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_before_any_state_changes(name, case, change, error, match):
    head = HEADS[name]()
    train(head, None, range(2))
    before = snapshot(head)
    x, y = change(*step_data(5))
    with pytest.raises(error, match=match):
        call(head, x, y)
    assert_same_state(snapshot(head), before)


@pytest.mark.parametrize("name", ["pfc", "full"])
def test_labels_beyond_num_classes(name):
    head = HEADS[name]()
    before = snapshot(head)
    x, y = step_data(0)
    with pytest.raises(ValueError, match=r"\[0, num_classes=60\)"):
        head(x, torch.where(y == y[0], C, y))
    assert_same_state(snapshot(head), before)


def test_more_classes_than_the_memory_holds():
    head = PrototypeMemoryLoss(D, 4)
    before = snapshot(head)
    with pytest.raises(ValueError, match="5 distinct classes but the memory has only 4"):
        head(torch.randn(5, D), torch.arange(5))
    assert_same_state(snapshot(head), before)


def test_dcq_keys_must_match_queries():
    head = DCQLoss(D, 8)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        head(torch.randn(4, D), torch.randn(5, D), torch.arange(4))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_step_gives_non_finite_loss_and_leaves_memory(name, bad):
    head = HEADS[name]()
    train(head, None, range(3))
    before = snapshot(head)
    x, y = step_data(7)
    x[3, 2] = bad
    x.requires_grad_()
    loss = call(head, x, y)
    assert not torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(x.grad).all()
    assert head.last_stats["committed"] is False
    assert_same_state(snapshot(head), before)  # Partial FC / full: the sampling step too
    train(head, None, range(8, 10))  # and the head goes on normally
    assert head.last_stats["committed"] is True


@pytest.mark.parametrize("name", ["pfc", "full"])
def test_non_finite_step_then_the_same_steps_as_without_it(name):
    """A skipped step draws nothing: the sample and losses that follow are those of a run
    without it."""
    a, b = HEADS[name](), HEADS[name]()
    train(a, None, range(3))
    train(b, None, range(3))
    x, y = step_data(7)
    x[0, 0] = float("nan")
    call(b, x, y)
    assert train(a, None, range(3, 6)) == train(b, None, range(3, 6))
    assert_same_state(snapshot(a), snapshot(b))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dcq_non_finite_keys_alone_are_not_committed(bad):
    """Finite queries with a non-finite key: the step is not committed, the queue keeps no key."""
    head = HEADS["dcq"]()
    train(head, None, range(3))
    before = snapshot(head)
    x, y = step_data(7)
    k = x.flip(0) * 0.5 + 0.1
    k[4, 1] = bad
    head(x.requires_grad_(), k, y)
    assert head.last_stats["committed"] is False
    assert_same_state(snapshot(head), before)  # state_dict flushes the pending enqueue


def test_grad_scaler_skips_a_non_finite_step():
    head = FullSoftmaxLoss(D, C)
    opt = optimiser(head)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = head.weight.detach().clone()
    x, y = step_data(0)
    x[0, 0] = float("nan")
    scaler.scale(head(x.requires_grad_(), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(head.weight.detach(), before) and scaler.get_scale() < 2.0**8


@pytest.mark.parametrize("name", HEADS)
def test_labels_b_by_1_and_int32_give_the_same_loss(name):
    a, b = HEADS[name](), HEADS[name]()
    for t in range(3):
        x, y = step_data(t)
        la, lb = call(a, x, y), call(b, x, y[:, None].int())
        assert la.item() == lb.item()


@pytest.mark.parametrize("name", HEADS)
def test_autocast_bfloat16(name):
    """An encoder under autocast hands the head bfloat16 embeddings: the loss is float32, close to
    the float32 run, and the gradient reaches the encoder."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(8, D)
    heads = HEADS[name](), HEADS[name]()
    inputs = [torch.randn(10, 8) for _ in range(3)]
    for t, inp in enumerate(inputs):
        _, y = step_data(t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = enc(inp)
            low = call(heads[0], emb, y)
        assert emb.dtype == torch.bfloat16 and low.dtype == torch.float32
        high = call(heads[1], enc(inp), y)
        low.backward()
        assert torch.isfinite(enc.weight.grad).all()
        assert enc.weight.grad.abs().sum() > 0 or t == 0  # DCQ's first step: an empty queue
        enc.zero_grad()
        assert abs(low.item() - high.item()) <= 0.05 * abs(high.item()) + 0.05


@pytest.mark.parametrize("name", HEADS)
def test_last_stats_loss_parts_add_up(name):
    head = HEADS[name]()
    train(head, None, range(3))
    s = head.last_stats
    assert s["loss"] == pytest.approx(s["lse"] - s["target_logit"], rel=1e-5, abs=1e-5)
    assert 0.0 <= s["accuracy"] <= 1.0 and s["rows"] == 10
