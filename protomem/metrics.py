"""Moved to ``protomem.evaluation`` (``evaluation.metrics``, ``evaluation.labelled_sets``,
``evaluation.embedding``); this module keeps ``protomem.metrics.<name>`` working."""
from .evaluation.embedding import flip_embeddings
from .evaluation.labelled_sets import identification_split, pair_scores, rank1_identification
from .evaluation.metrics import kfold_split, tar_at_far, verification_accuracy

__all__ = sorted(name for name in dir() if not name.startswith("_") and callable(globals()[name]))
