"""SyntheticIdentities' planted look-alike families: off by default, the truth they expose, and
their geometry (members s times as far apart as unrelated identities)."""
import pytest
import torch

from protomem.data import SyntheticIdentities

C = 2000


def test_off_by_default():
    ds = SyntheticIdentities(50)
    assert bool((ds.planted_partners(torch.arange(50)) == -1).all())
    assert "lookalikes" not in repr(ds)


@pytest.mark.parametrize("size,spread", [(2, 0.3), (3, 0.5)])
def test_families_truth_and_geometry(size, spread):
    ds = SyntheticIdentities(C, lookalikes=0.4, family_size=size, lookalike_spread=spread, seed=2)
    plain = SyntheticIdentities(C, seed=2)
    classes = torch.arange(C)
    partners = ds.planted_partners(classes)
    assert partners.shape == (C, size - 1)
    planted = partners[:, 0] >= 0
    assert 0.3 < float(planted.float().mean()) < 0.5
    # a family: consecutive ids, every member lists the others, not itself
    for c in classes[planted][:20].tolist():
        fam = sorted([c] + partners[c].tolist())
        assert fam == list(range(fam[0], fam[0] + size)) and fam[0] % size == 0
        for m in partners[c].tolist():
            assert c in partners[m].tolist()
    # only family members' centres moved; members lie ~spread times as far apart
    z, z0 = ds._centres(classes), plain._centres(classes)
    assert torch.equal(z[~planted], z0[~planted]) and not torch.equal(z[planted], z0[planted])
    a = classes[planted]
    twin = (z[a] - z[partners[a, 0]]).norm(dim=1).mean()
    other = (z[a] - z[(a + 2 * size) % C]).norm(dim=1).mean()
    assert float(twin / other) == pytest.approx(spread, rel=0.15)
    # the features follow: a class's mean feature is nearer its twin's than an unrelated one's
    mean = ds.sample(classes.repeat_interleave(8), torch.arange(8).repeat(C)).view(C, 8, -1).mean(1)
    near = (mean[a] - mean[partners[a, 0]]).norm(dim=1).mean()
    far = (mean[a] - mean[(a + 2 * size) % C]).norm(dim=1).mean()
    assert float(near) < 0.8 * float(far)


def test_heldout_keeps_the_families():
    ds = SyntheticIdentities(100, lookalikes=0.5, family_size=2, seed=1)
    held = ds.heldout(40)
    assert (held.lookalikes, held.family_size, held.lookalike_spread) == (0.5, 2, 0.3)
    assert bool((held.planted_partners(torch.arange(40)) >= 0).any())


@pytest.mark.parametrize("kwargs", [dict(lookalikes=1.5), dict(lookalikes=0.5, lookalike_spread=0.0),
                                    dict(lookalikes=0.5, family_size=1)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticIdentities(10, **kwargs)
