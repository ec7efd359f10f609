"""SyntheticIdentities: determinism, indexing, long-tail counts, held-out and fresh samples,
learnability, image mode; and the counter-based RNG under it."""
import time

import pytest
import torch
import torch.nn.functional as F

from protomem.data import SyntheticIdentities, long_tail_counts
from protomem.data import _hashrng


def nearest_centre_accuracy(ds, n_fresh=10):
    """Accuracy of classifying fresh samples by the nearest (cosine) mean of the training samples."""
    x, y = ds.get_batch(torch.arange(len(ds)))
    centres = torch.zeros(ds.num_classes, x.shape[1]).index_add_(0, y, F.normalize(x, dim=1))
    xf, yf = ds.fresh_samples(torch.arange(ds.num_classes), n_fresh)
    pred = (F.normalize(xf, dim=1) @ F.normalize(centres, dim=1).T).argmax(1)
    return (pred == yf).float().mean().item()


# ----------------------------------------------------------------------------- the RNG
def test_mix32_tensor_path_is_exact():
    """int64 tensor arithmetic gives the same hashes as unbounded Python ints (no overflow)."""
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xCED7230A, 123456789]
    got = _hashrng.mix32(torch.tensor(values)).tolist()
    assert got == [_hashrng.mix32(v) for v in values]
    assert all(0 <= g < 2**32 for g in got)
    assert len(set(got)) == len(values)  # a bijection


def test_key_python_int_equals_tensor_word():
    ids = torch.tensor([0, 7, 2**32 + 5, 2**62])
    k = _hashrng.key(3, 1, ids, torch.tensor(11))
    assert k.tolist() == [_hashrng.key(3, 1, int(i), 11) for i in ids]
    with pytest.raises(ValueError):
        _hashrng.key(-1)


def test_values_do_not_depend_on_width():
    keys = _hashrng.key(1, 2, torch.arange(5))
    for gen in (_hashrng.normal, _hashrng.uniform, _hashrng.uniform8):
        wide, narrow = gen(keys, 13), gen(keys, 6)
        assert torch.equal(wide[:, :6], narrow)
        assert wide.shape == (5, 13)


def test_normal_moments():
    z = _hashrng.normal(_hashrng.key(0, 9, torch.arange(4000)), 64)
    assert z.dtype == torch.float32 and z.shape == (4000, 64)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 0.03
    assert abs((z**4).mean().item() - 3) < 0.15  # Gaussian kurtosis
    corr = torch.corrcoef(z.T) - torch.eye(64)
    assert corr.abs().max().item() < 0.1  # dims are independent


# ----------------------------------------------------------------------------- determinism, indexing
def test_deterministic_from_seed():
    a, b = SyntheticIdentities(300, seed=5), SyntheticIdentities(300, seed=5)
    c = SyntheticIdentities(300, seed=6)
    idx = torch.arange(0, len(a), 7)
    assert torch.equal(a.class_counts, b.class_counts)
    assert torch.equal(a.get_batch(idx)[0], b.get_batch(idx)[0])
    assert not torch.equal(a.class_counts, c.class_counts)
    m = min(len(a), len(c))
    assert not torch.allclose(a.get_batch(torch.arange(m))[0], c.get_batch(torch.arange(m))[0])


def test_getitem_equals_batch_path_and_labels():
    ds = SyntheticIdentities(50, feature_dim=96, samples_per_class="zipf", seed=1)
    assert len(ds) == int(ds.class_counts.sum())
    ends = torch.cumsum(ds.class_counts, 0)
    # both ends of every class's range and a spread of others
    idx = torch.unique(torch.cat([ends - 1, ends[:-1], torch.arange(0, len(ds), 5)]))
    xb, yb = ds.get_batch(idx)
    assert xb.shape == (len(idx), 96) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    for j, i in enumerate(idx.tolist()):
        x, y = ds[i]
        assert y == int(yb[j]) == int(ds.labels[i])
        torch.testing.assert_close(x, xb[j], rtol=1e-5, atol=1e-5)
    assert torch.equal(ds.labels, torch.repeat_interleave(torch.arange(50), ds.class_counts))
    torch.testing.assert_close(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds.get_batch(torch.tensor([len(ds)]))


def test_sample_is_per_element():
    """A sample does not depend on the rest of the batch: any subset regenerates identically."""
    ds = SyntheticIdentities(1000, seed=2)
    classes, sample_ids = torch.tensor([3, 999, 3, 17]), torch.tensor([0, 2, 1, 10**6])
    full = ds.sample(classes, sample_ids)
    part = ds.sample(classes[1:3], sample_ids[1:3])
    torch.testing.assert_close(part, full[1:3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[0], full[2])  # two samples of one class differ


def test_dataloader_batched_fetch():
    ds = SyntheticIdentities(40, samples_per_class=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
    x, y = next(iter(loader))
    xb, yb = ds.get_batch(torch.arange(16))
    assert torch.equal(y, yb)
    torch.testing.assert_close(x, xb)


def test_sample_speed():
    """The hot path: 512 feature samples in well under 10 ms on one CPU thread."""
    ds = SyntheticIdentities(100_000)
    idx = torch.randint(0, len(ds), (512,), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds.get_batch(idx)
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            ds.get_batch(idx)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.010, f"512 samples took {best * 1e3:.1f} ms"


def test_device_matches_cpu(device):
    ds = SyntheticIdentities(200, seed=3)
    idx = torch.arange(0, len(ds), 3)
    x_cpu, y_cpu = ds.get_batch(idx)
    x_dev, y_dev = ds.get_batch(idx, device=device)
    assert x_dev.device.type == device
    assert torch.equal(y_dev.cpu(), y_cpu)
    torch.testing.assert_close(x_dev.cpu(), x_cpu, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- long tail
def test_megaface2_preset_statistics():
    ds = SyntheticIdentities(20_000, samples_per_class="megaface2", seed=0)
    counts = ds.class_counts
    assert counts.dtype == torch.int64 and counts.shape == (20_000,)
    assert abs((counts < 10).float().mean().item() - 0.88) < 0.02
    assert int(counts.min()) >= 3
    assert int((counts >= 100).sum()) >= 5  # a few heads with hundreds of samples
    assert 5 < counts.float().mean().item() < 9  # MegaFace2: about 7 images per identity


def test_count_specs():
    ids = torch.arange(5000)
    assert torch.equal(long_tail_counts(ids, 4), torch.full((5000,), 4))
    zipf = long_tail_counts(ids, "zipf", seed=1, zipf_a=1.8, max_samples=50)
    assert int(zipf.min()) >= 1 and int(zipf.max()) == 50
    assert (zipf == 1).float().mean().item() > 0.4  # P(n = 1) = 1 - 2**-0.8 = 0.43
    explicit = torch.arange(1, 6)
    assert torch.equal(long_tail_counts(torch.arange(5), explicit), explicit)
    for bad in ("uniform", 0, [1, 2]):
        with pytest.raises(ValueError):
            long_tail_counts(torch.arange(5), bad)
    with pytest.raises(ValueError):
        long_tail_counts(ids, 3, zipf_a=2.0)


def test_head_tail_split():
    ds = SyntheticIdentities(3000, seed=4)
    head, tail = ds.head_tail_split(10)
    assert torch.equal(torch.sort(torch.cat([head, tail]))[0], torch.arange(3000))
    assert bool((ds.class_counts[head] >= 10).all()) and bool((ds.class_counts[tail] < 10).all())
    assert len(head) > 0 and len(tail) > 0


# ----------------------------------------------------------------------------- evaluation views
def test_heldout_is_disjoint_and_consistent():
    ds = SyntheticIdentities(500, seed=7)
    held = ds.heldout(100, samples_per_class="megaface2")
    assert held.first_class >= ds.first_class + ds.num_classes
    assert held.num_classes == 100 and torch.equal(held.labels.unique(), torch.arange(100))
    # A held-out identity is the identity with that global id of a larger dataset of this seed.
    big = SyntheticIdentities(600, seed=7)
    assert torch.equal(held.class_counts, big.class_counts[500:])
    ids, s = torch.arange(100), torch.zeros(100, dtype=torch.int64)
    torch.testing.assert_close(held.sample(ids, s), big.sample(ids + 500, s), rtol=1e-5, atol=1e-5)
    # and not a training identity: held-out class j is far from training class j
    a = F.normalize(held.sample(ids, s), dim=1)
    b = F.normalize(ds.sample(ids, s + 1), dim=1)
    same = F.normalize(ds.sample(ids, s), dim=1)
    assert (a * b).sum(1).mean() < (same * b).sum(1).mean() - 0.2
    with pytest.raises(ValueError):
        ds.heldout(10, first_class=495)
    shifted = SyntheticIdentities(50, first_class=100, seed=7)
    assert shifted.heldout(100, first_class=0).first_class == 0  # below the training ids is fine


def test_fresh_samples_are_new():
    ds = SyntheticIdentities(30, samples_per_class=4, seed=8)
    xf, yf = ds.fresh_samples(torch.tensor([2, 5]), 3)
    assert xf.shape == (6, 128) and yf.tolist() == [2, 2, 2, 5, 5, 5]
    xt, yt = ds.get_batch(torch.arange(len(ds)))
    for x, y in zip(xf, yf):
        train = xt[yt == y]
        assert (train - x).abs().amax(1).min() > 1e-3  # no training sample regenerated
    torch.testing.assert_close(xf[0], ds.sample(torch.tensor([2]), torch.tensor([4]))[0])


def test_learnable_but_not_trivial():
    easy = SyntheticIdentities(100, samples_per_class=20, seed=0)  # default noise
    hard = SyntheticIdentities(100, samples_per_class=20, noise=2.0, seed=0)
    acc_easy, acc_hard = nearest_centre_accuracy(easy), nearest_centre_accuracy(hard)
    assert acc_easy > 0.6  # chance is 0.01
    assert 0.05 < acc_hard < 0.95 and acc_hard < acc_easy


def test_trained_encoder_beats_raw_features():
    """The shared nuisance directions hide identity in the raw features; a trained encoder learns
    to ignore them."""
    ds = SyntheticIdentities(100, samples_per_class=20, noise=1.0, nuisance=3.0, seed=0)
    torch.manual_seed(0)
    x, y = ds.get_batch(torch.arange(len(ds)))
    enc = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    w = torch.nn.Parameter(0.01 * torch.randn(100, 64))
    opt = torch.optim.Adam([*enc.parameters(), w], lr=3e-3)
    for _ in range(300):
        i = torch.randint(0, len(x), (256,))
        cos = F.normalize(enc(x[i]), dim=1) @ F.normalize(w, dim=1).T
        loss = F.cross_entropy(30 * (cos - 0.3 * F.one_hot(y[i], 100)), y[i])  # CosFace
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xf, yf = ds.fresh_samples(torch.arange(100), 10)
        centres = torch.zeros(100, 64).index_add_(0, y, F.normalize(enc(x), dim=1))
        pred = (F.normalize(enc(xf), dim=1) @ F.normalize(centres, dim=1).T).argmax(1)
        trained = (pred == yf).float().mean().item()
    assert trained > nearest_centre_accuracy(ds) + 0.1


# ----------------------------------------------------------------------------- image mode
def test_image_mode():
    ds = SyntheticIdentities(20, samples_per_class=3, mode="image", seed=9)
    assert ds.sample_shape == (3, 112, 112)
    x, y = ds.get_batch(torch.arange(len(ds)))
    assert x.shape == (60, 3, 112, 112) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and x.std() > 0.1
    torch.testing.assert_close(ds[4][0], x[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds.get_batch(torch.arange(60))[0], x)
    # samples of one class are closer to each other than to other classes' samples
    flat = x.flatten(1)
    dist = torch.cdist(flat, flat)
    same = (y[:, None] == y[None]) & ~torch.eye(60, dtype=torch.bool)
    assert dist[same].mean() < dist[y[:, None] != y[None]].mean()
    assert dist[same].min() > 0  # pixel noise and latent noise differ per sample


@pytest.mark.parametrize("kwargs", [dict(mode="video"), dict(noise=-1.0), dict(feature_dim=0),
                                    dict(first_class=-1), dict(nuisance_rank=-2)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticIdentities(10, **kwargs)
    with pytest.raises(ValueError):
        SyntheticIdentities(0)
