"""Device side of mining: from the margin CE's ``best_other_index`` to (row class, closest other
class, its cosine) pairs, combined over column shards and ranks, with no host sync."""
import torch

from .. import distributed


def closest_other_class(best_index, col_labels):
    """The class of each row's best non-target column.

    Args:
        best_index: [B] int64, a column of W or -1 (``margin_ce_stats(..., with_index=True)``).
        col_labels: [M] int64, the class of every column (slot labels, queue labels, class ids).
    Returns:
        [B] int64 class ids, -1 where ``best_index`` is -1. A gather of B values, no sync.
    """
    if col_labels.shape[0] == 0:
        return torch.full_like(best_index, -1)
    return torch.where(best_index >= 0, col_labels[best_index.clamp(0, col_labels.shape[0] - 1)], -1)


def combine_best_other(best, classes):
    """The best other class over column groups (shards, ranks) of one softmax.

    Args:
        best: [R, B] float, each group's best non-target cosine (-inf where none).
        classes: [R, B] int64, the class reaching it (-1 where none).
    Returns:
        (best [B], classes [B]): the max over the groups and, among the groups reaching it, the
        smallest class id (so the result does not depend on how the columns were split when
        every column is its own class); -1 where no group has one.
    """
    top = best.amax(dim=0)
    big = torch.iinfo(torch.int64).max
    reach = (best == top[None]) & (classes >= 0)
    cls = torch.where(reach, classes, big).amin(dim=0)
    return top, torch.where(cls == big, -1, cls)


def pack_pairs(rows, others, cos):
    """(row class [n] int64, other class [n] int64, cos [n] float) -> int64 [n, 3] (the cosine's
    float32 bits in the third column): one tensor, one transfer, exact."""
    bits = cos.detach().float().contiguous().view(torch.int32).long()
    return torch.stack([rows.long(), others.long(), bits], dim=1)


def unpack_pairs(packed):
    """Inverse of ``pack_pairs``: int64 [n, 3] -> (rows [n] int64, others [n] int64, cos [n] float32)."""
    cos = packed[:, 2].to(torch.int32).view(torch.float32)
    return packed[:, 0], packed[:, 1], cos


def global_pairs(local, packed=False):
    """A head's ``mining_pairs``: the packed pairs of this rank's rows (``local``, int64 [n, 3],
    or None before a step) gathered over the ranks, as (rows, others, cos) or, with ``packed``,
    as one int64 [N, 3] tensor; None when ``local`` is None."""
    if local is None:
        return None
    pairs = gather_pairs(local)
    return pairs if packed else unpack_pairs(pairs)


def gather_pairs(packed):
    """The packed pairs [n_r, 3] of every rank, concatenated in rank order (a collective and one
    tiny host sync for the batch sizes under torch.distributed; the input itself without)."""
    out, _, _ = distributed.gather_batch(packed, packed[:, 0], with_grad=False)
    return out
