"""The Triton margin cross-entropy kernels (CPU: under TRITON_INTERPRET=1, set by conftest) against
the C++ ops, which tests/test_margin_ce.py checks against protomem.reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import protomem  # noqa: F401  (registers the ops)
from protomem.margins import ArcFace, CombinedMargin, CosFace

triton_mc = pytest.importorskip("protomem.triton.margin_ce")
pytestmark = pytest.mark.triton

MARGINS = [CosFace(64, 0.4), ArcFace(64, 0.5), ArcFace(16, 2.0), CombinedMargin(32, 1.0, 0.2, 0.1)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def data(B, M, D, dtype, dup, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype)
    W = torch.randn(M, D, generator=g).to(dtype)
    col = torch.randperm(3 * M, generator=g)[:M]
    col[torch.rand(M, generator=g) < 0.1] = -1  # empty columns
    row = col.clamp_min(0)[torch.randint(M, (B,), generator=g)]
    if dup:
        col[: M // 4] = row[0]
    pos = torch.rand(B, generator=g) * 1.8 - 0.9
    return [t.to(DEVICE) for t in (x, W, row, col, pos)]


def cpu(*ts):
    return [t.cpu() if t is not None else None for t in ts]


def incoming_grads(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, generator=g).to(DEVICE), torch.randn(B, generator=g).to(DEVICE)


def cpp_fwd_bwd(x, W, row, col, pos, args, ga, gb, need_grad_w=True):
    """The C++ op's statistics and gradients, computed on float32 copies of the inputs on the CPU."""
    f32 = [t.float() if t is not None else None for t in cpu(x, W)]
    ints = cpu(row, col, pos)
    stats = torch.ops.protomem.margin_ce_fwd(*f32, *ints, *args)
    grads = torch.ops.protomem.margin_ce_bwd(ga.cpu(), gb.cpu(), *f32, *ints, stats[0], stats[1], *args,
                                             need_grad_w)
    return stats, grads


def assert_stats_close(got, want, atol=1e-4):
    keep = torch.isfinite(want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(got[1].cpu()[keep], want[1][keep], atol=atol, rtol=1e-5)
    assert torch.equal(torch.isinf(got[1].cpu()), ~keep)
    for k in (2, 3):  # best target and best other cosine
        torch.testing.assert_close(got[k].cpu(), want[k], atol=1e-5, rtol=1e-5)


def assert_grads_close(got, want):
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.cpu(), b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("B,M,D", [(1, 1, 1), (37, 1001, 129)])
def test_matches_cpp(margin, with_pos, B, M, D):
    x, W, row, col, pos = data(B, M, D, torch.float32, with_pos)
    pos = pos if with_pos else None
    args = (margin.scale, margin.m1, margin.m2, margin.m3, True, True)
    ga, gb = incoming_grads(B)
    want, want_grads = cpp_fwd_bwd(x, W, row, col, pos, args, ga, gb)
    assert_stats_close(triton_mc.margin_ce_fwd_triton(x, W, row, col, pos, *args), want)
    out = triton_mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, pos, want[0].to(DEVICE),
                                         want[1].to(DEVICE), *args, True)
    assert_grads_close(out, want_grads)


# ---------------------------------------------------------------------------------------------
# low precision: bfloat16 / float16 tensor-core dots


def plain_pytorch_stats(x, W, row, col, margin):
    """lse and target LSE of a plain PyTorch head run in x's dtype (normalise, matmul and margin in
    that dtype; the softmax in float32, as F.cross_entropy on upcast logits)."""
    cos = F.normalize(x, dim=1) @ F.normalize(W, dim=1).T
    same = (row[:, None] == col[None, :]) & (col >= 0)[None, :]
    logits = (margin.scale * torch.where(same, margin.target_cos(cos), cos)).float()
    logits = logits.masked_fill((col < 0)[None, :], -math.inf)
    return torch.logsumexp(logits, 1), torch.logsumexp(logits.masked_fill(~same, -math.inf), 1)


def max_errors(stats, grads, want, want_grads):
    keep = torch.isfinite(want[1])
    errs = [(stats[0].cpu().float() - want[0]).abs().max(),
            (stats[1].cpu().float() - want[1])[keep].abs().max()]
    return errs + [(g.cpu().float() - w).abs().max() for g, w in zip(grads, want_grads)]


@pytest.mark.parametrize("margin", [CosFace(64, 0.4), ArcFace(64, 0.5)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_at_most_twice_plain_pytorch(dtype, margin):
    """Flash-attention's rule: against the exact result on the same (rounded) inputs, the kernel's
    error in lse, target LSE, grad x and grad W is at most twice a plain PyTorch run's in dtype."""
    B, M, D = 37, 1001, 129
    x, W, row, col, _ = data(B, M, D, dtype, False)
    args = (margin.scale, 1.0, margin.m2, margin.m3, True, True)
    ga, gb = incoming_grads(B)
    want, want_grads = cpp_fwd_bwd(x, W, row, col, None, args, ga, gb)
    gb = gb.masked_fill(torch.isinf(want[1]).to(DEVICE), 0)

    stats = triton_mc.margin_ce_fwd_triton(x, W, row, col, None, *args)
    grads = triton_mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, None, stats[0], stats[1], *args, True)[:2]
    assert grads[0].dtype == grads[1].dtype == dtype

    xp, Wp = (t.detach().clone().requires_grad_() for t in (x, W))
    lse, tgt = plain_pytorch_stats(xp, Wp, row, col, margin)
    ((ga * lse).sum() + (gb * torch.where(torch.isfinite(tgt), tgt, 0)).sum()).backward()

    err = max_errors(stats, grads, want, want_grads)
    err_plain = max_errors((lse.detach(), tgt.detach()), (xp.grad, Wp.grad), want, want_grads)
    for name, e, p in zip(("lse", "target", "grad x", "grad W"), err, err_plain):
        assert p > 0, name  # the plain run must show rounding, or the rule says nothing
        assert e <= 2 * p, (name, float(e), float(p))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_dtypes_compute_in_float32(low):
    x, W, row, col, _ = data(21, 150, 40, torch.float32, False)
    args = (30.0, 1.0, 0.3, 0.0, True, True)
    for xx, WW in ((x, W.to(low)), (x.to(low), W)):
        assert triton_mc.operand_dtype(xx, WW) == torch.float32
        got = triton_mc.margin_ce_fwd_triton(xx, WW, row, col, None, *args)
        want = triton_mc.margin_ce_fwd_triton(xx.float(), WW.float(), row, col, None, *args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# split over M, configs, autotuning switch


@pytest.mark.parametrize("with_pos", [False, True])
def test_split_over_m_equals_unsplit(with_pos):
    B, M, D = 37, 1001, 40  # 16 column tiles of 64: 3 slices, 7 (one empty), 40 (24 empty)
    x, W, row, col, pos = data(B, M, D, torch.float32, with_pos)
    pos = pos if with_pos else None
    args = (64.0, 1.0, 0.5, 0.0, True, True)
    ga, gb = incoming_grads(B)
    one = triton_mc.margin_ce_fwd_triton(x, W, row, col, pos, *args, splits=1)
    one_grads = triton_mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, pos, one[0], one[1], *args, False, splits=1)
    for S in (3, 7, 40):
        got = triton_mc.margin_ce_fwd_triton(x, W, row, col, pos, *args, splits=S)
        torch.testing.assert_close(got[0], one[0], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(got[1], one[1], atol=1e-5, rtol=1e-6)
        assert torch.equal(got[2], one[2]) and torch.equal(got[3], one[3])  # maxima: exact
        grads = triton_mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, pos, one[0], one[1], *args, False, splits=S)
        torch.testing.assert_close(grads[0], one_grads[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="splits"):
        triton_mc.margin_ce_fwd_triton(x, W, row, col, pos, *args, splits=0)


def config_id(c):
    return "-".join(str(v) for v in c.kwargs.values()) + f"-w{c.num_warps}-s{c.num_stages}"


@pytest.fixture(scope="module")
def small_case():
    B, M, D = 19, 300, 70
    x, W, row, col, _ = data(B, M, D, torch.float32, False, seed=3)
    args = (32.0, 1.0, 0.3, 0.1, True, True)
    ga, gb = incoming_grads(B, seed=4)
    want, want_grads = cpp_fwd_bwd(x, W, row, col, None, args, ga, gb)
    return (x, W, row, col, args, ga, gb), want, want_grads


@pytest.mark.parametrize("config", triton_mc.FWD_CONFIGS, ids=config_id)
def test_every_forward_config(config, small_case):
    (x, W, row, col, args, *_), want, _ = small_case
    assert_stats_close(triton_mc.margin_ce_fwd_triton(x, W, row, col, None, *args, config=config, splits=2), want)


@pytest.mark.parametrize("config", triton_mc.BWD_X_CONFIGS, ids=config_id)
def test_every_grad_x_config(config, small_case):
    (x, W, row, col, args, ga, gb), want, want_grads = small_case
    out = triton_mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, None, want[0].to(DEVICE), want[1].to(DEVICE),
                                         *args, False, config_x=config, splits=2)
    assert out[1] is None
    assert_grads_close(out[:1], want_grads[:1])


@pytest.mark.parametrize("config", triton_mc.BWD_W_CONFIGS, ids=config_id)
def test_every_grad_w_config(config, small_case):
    (x, W, row, col, args, ga, gb), want, want_grads = small_case
    out = triton_mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, None, want[0].to(DEVICE), want[1].to(DEVICE),
                                         *args, True, config_w=config)
    assert_grads_close(out, want_grads)


def test_autotune_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(triton_mc.AUTOTUNE_ENV, raising=False)
    assert triton_mc.autotune_enabled()
    monkeypatch.setenv(triton_mc.AUTOTUNE_ENV, "0")
    assert not triton_mc.autotune_enabled()
    monkeypatch.setenv(triton_mc.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_mc.autotune_enabled()


def test_interpreter_runs_first_configs(monkeypatch, small_case):
    (x, W, row, col, args, ga, gb), want, _ = small_case
    monkeypatch.setattr(triton_mc, "_CHOSEN", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, None, want[0].to(DEVICE), want[1].to(DEVICE), *args, True)
    rows = {r["kernel"]: r for r in triton_mc.chosen_configs()}
    assert rows["bwd_x"]["config"] == str(triton_mc.BWD_X_CONFIGS[0])
    assert rows["bwd_w"]["config"] == str(triton_mc.BWD_W_CONFIGS[0])
    assert (rows["bwd_x"]["B"], rows["bwd_x"]["M"], rows["bwd_x"]["D"]) == (32, 512, 128)
    assert rows["bwd_x"]["dtype"] == "float32" and rows["bwd_x"]["splits"] == 1


class FakeTuner:
    """Stands in for triton.autotune's wrapper: runs `best` and records the launch's arguments."""

    def __init__(self, kernel, best):
        self.kernel, self.best_config, self.calls = kernel, best, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            self.kernel[grid](*args, **kwargs, **self.best_config.all_kwargs())
        return launch


def test_autotuned_launch_uses_the_tuned_config(monkeypatch, small_case, capsys):
    """The GPU path's wiring: the grid follows the tuned config's META, keys are power-of-two
    buckets plus WITH_POS, and chosen_configs reports the tuned config."""
    (x, W, row, col, args, *_), want, _ = small_case
    best = triton_mc.FWD_CONFIGS[3]
    fake = FakeTuner(triton_mc._fwd_kernel, best)
    monkeypatch.setattr(triton_mc._FWD, "tuner", fake)
    monkeypatch.setattr(triton_mc, "autotune_enabled", lambda: True)
    monkeypatch.setattr(triton_mc, "_CHOSEN", {})
    assert_stats_close(triton_mc.margin_ce_fwd_triton(x, W, row, col, None, *args, splits=3), want)
    (call,) = fake.calls
    assert (call["KEY_B"], call["KEY_M"], call["KEY_D"], call["WITH_POS"]) == (32, 512, 128, False)
    assert "BLOCK_B" not in call  # the tuner, not the launcher, picks the tile
    (row_,) = triton_mc.chosen_configs()
    assert row_["config"] == str(best) and row_["splits"] == 3
    triton_mc.print_chosen_configs()
    assert "fwd B<=32 M<=512 D<=128 float32" in capsys.readouterr().out


def test_auto_splits_rule():
    assert triton_mc.auto_splits(512, 10**6, 132) == 66  # H100 target: 4 row blocks x 66 slices
    assert triton_mc.auto_splits(512, 10**6, 0) == 1  # not a GPU
    assert triton_mc.auto_splits(512, 10_000, 132) == 2  # slices of >= MIN_SPLIT_COLS columns
    assert triton_mc.auto_splits(64 * 1024, 10**6, 132) == 1  # enough row blocks already
    assert triton_mc.auto_splits(5, 1000, 132) == 1
    x = torch.zeros(3, 4)
    assert triton_mc.resolve_splits(None, 512, 10**6, x.device) == 1  # CPU


def test_rejects_m1_other_than_one():
    x, W, row, col, _ = data(4, 10, 3, torch.float32, False)
    with pytest.raises(ValueError, match="m1 = 1"):
        triton_mc.margin_ce_fwd_triton(x, W, row, col, None, 10.0, 1.2, 0.0, 0.0, True, True)


def test_tune_cli_on_cpu(capsys):
    from protomem.triton import tune

    tune.main(["--device", DEVICE, "--B", "5", "--M", "70", "--D", "16", "--splits", "auto,2", "--grad-w"])
    out = capsys.readouterr().out
    assert out.count("backward:") == 2 and out.count("total:") == 2
    for k in ("splits=auto (auto: 1)", "fwd B<=8 M<=128 D<=16 bfloat16", "bwd_x", "bwd_w"):
        assert k in out, k
