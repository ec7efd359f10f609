"""Datasets and samplers for identity training: synthetic identities generated on the fly."""
from .longtail import long_tail_counts
from .synthetic import SyntheticIdentities

__all__ = ["SyntheticIdentities", "long_tail_counts"]
