"""Datasets and samplers for identity training: synthetic identities, insightface RecordIO
(``.rec`` / ``.idx``) and ``.bin`` verification sets read without mxnet, image folders, and a
G identities x k samples batch sampler (and one that mines look-alikes)."""
from .doppelganger_sampler import DoppelgangerBatchSampler
from .image_folder import ImageFolderIdentities
from .longtail import long_tail_counts
from .recordio import (
    CorruptRecordError,
    IRHeader,
    RecordIODataset,
    RecordIOReader,
    RecordIOWriter,
    pack,
    unpack,
    write_recordio,
)
from .sampler import IdentityBatchSampler
from .synthetic import SyntheticIdentities
from .verification import load_verification_bin, write_verification_bin

__all__ = [
    "CorruptRecordError",
    "DoppelgangerBatchSampler",
    "IdentityBatchSampler",
    "ImageFolderIdentities",
    "IRHeader",
    "RecordIODataset",
    "RecordIOReader",
    "RecordIOWriter",
    "SyntheticIdentities",
    "load_verification_bin",
    "long_tail_counts",
    "pack",
    "unpack",
    "write_recordio",
    "write_verification_bin",
]
