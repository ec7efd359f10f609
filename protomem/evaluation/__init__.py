"""Evaluation of an embedding model: the library behind ``python -m protomem.eval``.

It takes an ``nn.Module`` (images or features -> [B, E] embeddings) and returns numbers; it never
imports the trainer (``protomem.training.checkpoint`` turns a trainer checkpoint into that module).

- ``metrics``: ``tar_at_far`` (exact order-statistic thresholds), insightface's k-fold
  ``verification_accuracy``, ``kfold_split``.
- ``labelled_sets``: ``pair_scores`` (every genuine and impostor pair of a labelled set, block-wise),
  ``rank1_identification``, ``identification_split``.
- ``embedding``: ``embed`` / ``flip_embeddings`` (batched, no gradient, eval mode, flip test).
- ``identities``: ``evaluate_identities`` on synthetic head / tail / unseen identities.
- ``bin_sets``: ``evaluate_bin`` on insightface ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30).
- ``report``: ``format_results`` (console tables).
- ``ijb``: IJB-B / IJB-C 1:1 verification (``evaluate_ijb``): the release layout, alignment by
  5 landmarks, media pooling, pair scores in blocks, TAR at FAR 1e-6 ... 1e-1, the ROC.
"""
from .bin_sets import evaluate_bin
from . import ijb
from .embedding import embed, flip_embeddings
from .ijb import evaluate_ijb
from .identities import choose_eval_classes, evaluate_identities
from .labelled_sets import identification_split, pair_scores, rank1_identification
from .metrics import kfold_split, tar_at_far, verification_accuracy
from .report import far_key, format_results

__all__ = [
    "choose_eval_classes",
    "embed",
    "evaluate_bin",
    "evaluate_identities",
    "evaluate_ijb",
    "far_key",
    "flip_embeddings",
    "format_results",
    "identification_split",
    "ijb",
    "kfold_split",
    "pair_scores",
    "rank1_identification",
    "tar_at_far",
    "verification_accuracy",
]
