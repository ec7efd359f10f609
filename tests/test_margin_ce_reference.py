"""The margin cross-entropy reference against torch's cross_entropy on explicit logits."""
import pytest
import torch
import torch.nn.functional as F

from protomem.margins import ArcFace, CosFace
from protomem.reference import margin_cross_entropy_ref


def data(B=37, M=101, D=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(M, D, generator=g, dtype=torch.float64)
    col = torch.randperm(5 * M, generator=g)[:M]
    row = col[torch.randint(M, (B,), generator=g)]
    return x, W, row, col


def plain_cos(x, W):
    return F.normalize(x, dim=1) @ F.normalize(W, dim=1).T


@pytest.mark.parametrize("margin", [CosFace(30, 0.35), ArcFace(64, 0.5), ArcFace(8, 2.5)], ids=repr)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_target_equals_cross_entropy(margin, reduction):
    x, W, row, col = data()
    cos = plain_cos(x, W)
    target = (row[:, None] == col[None, :]).float().argmax(dim=1)
    logits = cos.clone()
    logits[torch.arange(len(row)), target] = margin.target_cos(cos[torch.arange(len(row)), target])
    want = F.cross_entropy(margin.scale * logits, target, reduction=reduction)
    got, lse, correct = margin_cross_entropy_ref(x, W, row, col, reduction=reduction, **margin.params())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, torch.logsumexp(margin.scale * logits, dim=1))
    assert torch.equal(correct, cos.argmax(dim=1) == target)


def test_pos_cos_masks_every_same_label_column():
    x, W, row, col = data()
    col = col.clone()
    col[:10] = row[0]  # many columns carry row 0's label
    pos = torch.rand(len(row), dtype=torch.float64)
    m = CosFace(50, 0.3)
    cos = plain_cos(x, W)
    keep = row[:, None] != col[None, :]
    logits = torch.cat([m.scale * (pos - 0.3)[:, None],
                        torch.where(keep, m.scale * cos, torch.tensor(float("-inf"), dtype=cos.dtype))], 1)
    want = F.cross_entropy(logits, torch.zeros(len(row), dtype=torch.long), reduction="none")
    got, _, _ = margin_cross_entropy_ref(x, W, row, col, pos, reduction="none", **m.params())
    torch.testing.assert_close(got, want)


def test_empty_columns_and_ignored_rows():
    x, W, row, col = data()
    col = col.clone()
    row = row.clone()
    empty = ~torch.isin(col, row)
    col[empty] = -1  # empty slots take no part
    row[:5] = -1      # ignored rows
    m = CosFace(20, 0.2)
    got, _, _ = margin_cross_entropy_ref(x, W, row, col, reduction="none", **m.params())
    sub, _, _ = margin_cross_entropy_ref(x[5:], W[~empty], row[5:], col[~empty], reduction="none", **m.params())
    assert (got[:5] == 0).all()
    torch.testing.assert_close(got[5:], sub)
    mean, _, _ = margin_cross_entropy_ref(x, W, row, col, **m.params())
    torch.testing.assert_close(mean, sub.mean())


def test_row_without_target_is_an_error():
    x, W, row, col = data()
    row = row.clone()
    row[3] = 10**9
    with pytest.raises(ValueError, match="no target"):
        margin_cross_entropy_ref(x, W, row, col, scale=10.0)
