"""Datasets and samplers for identity training: synthetic identities generated on the fly and a
G identities x k samples batch sampler."""
from .longtail import long_tail_counts
from .sampler import IdentityBatchSampler
from .synthetic import SyntheticIdentities

__all__ = ["IdentityBatchSampler", "SyntheticIdentities", "long_tail_counts"]
