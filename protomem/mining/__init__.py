"""Hard-example mining from the classifier itself (Doppelganger Mining, Smirnov et al., ICCVW
2017): each step's closest other class per row (``pairs``), a short list of look-alikes per class
(``lists``), and the batch sampler that puts look-alikes together (``protomem.data``)."""
from .lists import DoppelgangerLists, planted_recovery
from .pairs import closest_other_class, combine_best_other, gather_pairs, pack_pairs, unpack_pairs

__all__ = ["DoppelgangerLists", "planted_recovery", "closest_other_class", "combine_best_other", "gather_pairs",
           "pack_pairs", "unpack_pairs"]
