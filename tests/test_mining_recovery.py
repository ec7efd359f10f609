"""On planted look-alikes, the loop head pairs -> lists -> sampler recovers the planted partners.

The embeddings are the synthetic features themselves (an encoder that already separates the
classes as well as the raw features do: their class means find the planted twin 97% of the
time), so the test measures the mining machinery, not the training; the demo reports the
recovery after real training."""
import torch

from protomem.data import DoppelgangerBatchSampler, SyntheticIdentities
from protomem.losses import FullSoftmaxLoss, PrototypeMemoryLoss
from protomem.mining import DoppelgangerLists, pack_pairs, planted_recovery

C = 600


def mine(head, ds, epochs, fraction):
    lists = DoppelgangerLists(C, k=4)
    sampler = DoppelgangerBatchSampler(ds.labels, 32, 2, lists, fraction, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            x, y = ds.get_batch(torch.as_tensor(batch))
            head(x, y)
            lists.update_packed(pack_pairs(*head.mining_pairs()))
    return planted_recovery(lists, ds.planted_partners(torch.arange(C)))


def test_prototype_memory_mining_finds_more_twins_than_random_batches():
    """Measured (3 epochs, memory 120 of 600 classes): precision 0.33 with mining, 0.22 without;
    the issue's target (>= 0.9) is not reached by the prototype memory on this set."""
    ds = SyntheticIdentities(C, feature_dim=32, samples_per_class=8, lookalikes=0.5, seed=0)
    mined = mine(PrototypeMemoryLoss(32, 120), ds, epochs=3, fraction=0.5)
    plain = mine(PrototypeMemoryLoss(32, 120), ds, epochs=3, fraction=0.0)
    assert mined["found"] > 250 and plain["found"] > 250
    assert mined["precision"] > plain["precision"] + 0.03 and mined["recall"] > plain["recall"]


def test_full_softmax_lists_recover_the_planted_twins():
    ds = SyntheticIdentities(C, feature_dim=32, samples_per_class=8, lookalikes=0.5, seed=0)
    head = FullSoftmaxLoss(32, C)
    with torch.no_grad():  # class weights at the class means (a trained classifier)
        x, y = ds.get_batch(torch.arange(len(ds)))
        head.weight.copy_(torch.zeros(C, 32).index_add_(0, y, torch.nn.functional.normalize(x, dim=1)))
    got = mine(head, ds, epochs=1, fraction=0.5)
    # measured: precision 0.62, recall 0.76 after one epoch (the target 0.9 is not reached)
    assert got["precision"] >= 0.55 and got["recall"] >= 0.7
