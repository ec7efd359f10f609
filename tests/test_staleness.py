"""protomem.staleness: classifier rows per head, ages from the trainer's last_seen, binning."""
import torch
import torch.nn.functional as F

from protomem.data import SyntheticIdentities
from protomem.losses import DCQLoss, FullSoftmaxLoss, PrototypeMemoryLoss
from protomem.staleness import by_age, classifier_rows, staleness
from protomem.training import Trainer, resolve


def test_classifier_rows_of_each_head():
    pm = PrototypeMemoryLoss(4, 3)
    x = torch.randn(4, 4)
    pm(x, torch.tensor([7, 7, 9, 9]))
    rows, held = classifier_rows(pm, torch.tensor([9, 7, 5]))
    assert held.tolist() == [True, True, False] and rows[2].abs().sum() == 0
    torch.testing.assert_close(rows[1], F.normalize(F.normalize(x[:2]).sum(0), dim=0))

    dcq = DCQLoss(4, 5)
    k = torch.randn(4, 4)
    dcq(torch.randn(4, 4), k, torch.tensor([1, 2, 1, 3]))  # pending: classifier_rows flushes
    rows, held = classifier_rows(dcq, torch.tensor([1, 4]))
    assert held.tolist() == [True, False]
    torch.testing.assert_close(rows[0], k[0] + k[2])

    full = FullSoftmaxLoss(4, 10)
    rows, held = classifier_rows(full, torch.tensor([3, 0]))
    assert held.all() and torch.equal(rows, full.weight.detach()[[3, 0]])


def test_staleness_and_bins(tmp_path):
    cfg = resolve([], num_classes=120, samples_per_class=6, feature_dim=16, embedding_size=16,
                  hidden="32", identities_per_batch=8, head="pfc", sample_rate=0.5, max_steps=30,
                  track_staleness=True, eval_classes=30, progress=False, tensorboard=False,
                  out=str(tmp_path))
    trainer = Trainer(cfg)
    trainer.fit()
    seen = trainer.last_seen
    assert seen.max() == 29 and (seen >= -1).all() and (seen >= 0).sum() > 60
    classes = torch.arange(120)
    res = staleness(trainer.encoder, trainer.head, trainer.dataset, classes, seen, trainer.step)
    assert torch.equal(res["age"], torch.where(seen >= 0, 29 - seen, -1))
    assert res["held"].all() and (res["cos"].abs() <= 1 + 1e-6).all()
    bins = by_age(res, bins=(0, 5, 20))
    assert [b["lo"] for b in bins] == [0, 5, 20] and bins[-1]["hi"] is None
    assert sum(b["classes"] for b in bins) == int((res["age"] >= 0).sum())
    recent = (res["age"] >= 0) & (res["age"] < 5)
    torch.testing.assert_close(torch.tensor(bins[0]["cos"]), res["cos"][recent].mean())
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert torch.equal(ckpt["last_seen"], seen)


def test_synthetic_dataset_is_what_staleness_embeds():
    ds = SyntheticIdentities(20, feature_dim=8, samples_per_class=3)
    enc = torch.nn.Linear(8, 4)
    head = FullSoftmaxLoss(4, 20)
    res = staleness(enc, head, ds, torch.tensor([0, 5]), torch.full((20,), -1), 0, n_per_class=2)
    x, _ = ds.fresh_samples(torch.tensor([0, 5]), 2)
    mean = F.normalize(enc(x), dim=1).reshape(2, 2, 4).mean(1)
    want = F.cosine_similarity(head.weight.detach()[[0, 5]], mean, dim=1)
    torch.testing.assert_close(res["cos"], want.detach())
    assert res["age"].tolist() == [-1, -1]
