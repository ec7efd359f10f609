"""insightface's RecordIO face datasets (``train.rec`` + ``train.idx``) without mxnet.

insightface keeps in record 0 a header (flag 2) whose label is (first, last) and whose payload is
empty: records 1 .. first-1 are images (label: the identity, or several floats whose first is),
and records [first, last) are one header per identity whose label is the (start, end) key range
of that identity's images. The framing, headers and index are in ``_recordio_format``.
"""
import os

import numpy as np
import torch

from ._image import decode_image, encode_image, to_float
from ._recordio_format import MAGIC, IRHeader, RecordIOReader, RecordIOWriter, pack, unpack

__all__ = ["MAGIC", "CorruptRecordError", "IRHeader", "RecordIODataset", "RecordIOReader", "RecordIOWriter", "pack",
           "unpack", "write_recordio"]


class CorruptRecordError(ValueError):
    """A record of a ``.rec`` file that cannot be read or decoded; the message names the file,
    the record key, the sample index and its identity (also when raised in a DataLoader worker)."""


def write_recordio(path_prefix, samples, identity_ranges=True, format="jpg", quality=95):
    """Writes ``path_prefix.rec`` / ``.idx`` in insightface's layout.

    Args:
        samples: iterable of (image, label): image is encoded bytes (written as is) or a uint8
            [H, W, 3] array (encoded with ``format``); label is an int or a sequence of floats
            (a multi-label header; the first is the identity).
        identity_ranges: write record 0 and the per-identity headers (samples must then come
            grouped by identity); else images are records 0, 1, 2, ...
        format, quality: encoding of array images ("jpg" or "png").
    Returns:
        the number of images written.
    """
    key = first_key = 1 if identity_ranges else 0
    ranges = {}  # identity -> [start, end) keys, in order of appearance
    with RecordIOWriter(os.fspath(path_prefix) + ".rec") as writer:
        if identity_ranges:
            writer.write(0, pack((0, (0.0, 0.0), 0, 0), b""))  # (first, last) is patched in below
        for image, label in samples:
            if not isinstance(image, (bytes, bytearray, memoryview)):
                image = encode_image(image, format, quality)
            writer.write(key, pack((0, label, key, 0), bytes(image)))
            ident = int(label if np.ndim(label) == 0 else np.asarray(label).reshape(-1)[0])
            if identity_ranges:
                start, end = ranges.setdefault(ident, [key, key])
                if end != key:
                    raise ValueError(f"identity {ident} reappears at sample {key - first_key}: with "
                                     "identity_ranges=True samples must be grouped by identity")
                ranges[ident][1] = key + 1
            key += 1
        num_images = key - first_key
        if identity_ranges:
            for ident, (start, end) in ranges.items():
                writer.write(key, pack((0, (float(start), float(end)), ident, 0), b""))
                key += 1
            # the same size as the placeholder: positive floats never frame as the magic
            writer.overwrite(0, pack((0, (float(first_key + num_images), float(key)), 0, 0), b""))
    return num_images


class RecordIODataset(torch.utils.data.Dataset):
    """Images and labels of an insightface RecordIO dataset.

    Args:
        root: a folder holding ``train.rec`` / ``train.idx``, or the path of a ``.rec`` file.
        transform: optional callable applied to each float image tensor [3, H, W].
        image_size: optional (H, W) to resize images to when they differ.

    Items are (float32 [3, H, W] in [-1, 1], int label). ``labels`` (int64 [N]) is read from
    the headers without decoding images: with identity headers, one image header per identity
    (the images of a range share its identity), so millions of images cost one read per
    identity. ``num_classes`` is the number of identity headers when record 0 holds them, else
    max(label) + 1.
    """

    def __init__(self, root, transform=None, image_size=None):
        root = os.fspath(root)
        path_rec = os.path.join(root, "train.rec") if os.path.isdir(root) else root
        self.reader = RecordIOReader(path_rec)
        self.transform, self.image_size = transform, image_size
        self.identity_keys = None
        head, payload = unpack(self.reader.read(0)) if 0 in self.reader else (None, None)
        if head is not None and head.flag >= 2 and not payload:  # record 0 is not an image
            first, last = int(head.label[0]), int(head.label[1])
            self.image_keys = list(range(1, first))
            self.identity_keys = list(range(first, last))
            missing = [k for k in range(1, last) if k not in self.reader]
            if missing:
                raise ValueError(f"{path_rec}: record 0 names images 1..{first - 1} and identities "
                                 f"{first}..{last - 1}, but records {missing[:5]} (of "
                                 f"{len(missing)}) are missing")
        else:
            self.image_keys = list(self.reader.keys)
        self.labels = self._read_labels()
        if self.identity_keys is not None:
            self.num_classes = len(self.identity_keys)
        else:
            self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0

    def _read_labels(self):
        keys = np.asarray(self.image_keys, np.int64)
        labels, covered = np.empty(len(keys), np.float32), np.zeros(len(keys), bool)
        if self.identity_keys:
            start, end = self.identity_ranges().numpy().T
            if ((start < 1) | (end > len(keys) + 1) | (end < start)).any():
                raise ValueError(f"{self.reader.path_rec}: an identity range falls outside the "
                                 f"image records 1..{len(keys)}")
            start, size = start[end > start], (end - start)[end > start]
            # image key k is position k - 1; the positions of all ranges, concatenated
            pos = np.arange(size.sum()) + np.repeat(start - 1 - (np.cumsum(size) - size), size)
            labels[pos] = np.repeat(self.reader.first_labels(start.tolist()), size)
            covered[pos] = True
        rest = np.nonzero(~covered)[0]
        labels[rest] = self.reader.first_labels(keys[rest].tolist())
        return torch.from_numpy(labels.astype(np.int64))

    def identity_ranges(self):
        """The (start, end) image key range of every identity header, as int64 tensor [C, 2]."""
        if self.identity_keys is None:
            raise ValueError(f"{self.reader.path_rec} has no identity headers in record 0")
        ranges = [self.reader.read_header(k).label[:2] for k in self.identity_keys]
        return torch.tensor(np.asarray(ranges, dtype=np.float64).reshape(-1, 2), dtype=torch.int64)

    def __len__(self):
        return len(self.image_keys)

    def __getitem__(self, i):
        """(image float32 [3, H, W] in [-1, 1] (then ``transform``), label int)."""
        key = self.image_keys[i]
        try:
            _, payload = unpack(self.reader.read(key))
            img = to_float(decode_image(payload, self.image_size))
        except Exception as err:  # corrupt bytes: PIL's UnidentifiedImageError, a bad frame, ...
            raise CorruptRecordError(
                f"{self.reader.path_rec}: record {key} (sample {i}, identity {int(self.labels[i])}) cannot be "
                f"decoded: {type(err).__name__}: {err}") from err
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])
