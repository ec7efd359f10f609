"""lookalike_update_: the doppelganger lists' update (protomem.mining.DoppelgangerLists), a host op."""
import torch


def lookalike_update_(others, scores, rows, other_classes, cos, decay, symmetric):
    """Updates the look-alike lists in place from one step's pairs (CPU tensors; the rule is
    ``protomem.reference.lookalike_update_ref``): per updated class its listed scores decay, each
    pair adds ``(1 + cos) / 2`` to its look-alike's score, the k best stay (ties: smaller id).

    Args:
        others: [C, k] int32 look-alike ids, best first, -1 empty (written).
        scores: [C, k] float16 their scores (written).
        rows, other_classes: [n] int64 (row class, closest other class); a pair with a class
            outside [0, C), a == b or a non-finite cosine is ignored.
        cos: [n] float32.
        decay: in (0, 1].
        symmetric: a pair (a, b) also offers a to b's list.
    """
    torch.ops.protomem.lookalike_update_(others, scores, rows, other_classes, cos, float(decay),
                                         bool(symmetric))


@torch.library.register_fake("protomem::lookalike_update_")
def _fake(others, scores, rows, other_classes, cos, decay, symmetric):
    return None
