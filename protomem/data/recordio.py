"""insightface's RecordIO datasets (``train.rec`` + ``train.idx``), read and written without mxnet.

Framing (dmlc RecordIO): each record part is ``uint32 magic 0xced7230a``, ``uint32 lrecord``
(top 3 bits: continuation flag, low 29 bits: length), then the payload padded to 4 bytes. A
writer splits a payload wherever the magic occurs at a 4-byte aligned position and drops that
magic; flags 1 (first), 2 (middle), 3 (last) mark the parts and a reader joins them with the
magic put back. Flag 0 is a whole record.

An image record is ``struct IfQQ`` (flag, label, id, id2) then the payload; flag > 0 means
``flag`` float32 labels follow the struct and replace ``label``. The ``.idx`` file holds
``key\\toffset`` lines. insightface's face datasets keep in record 0 a header whose label is
(first, last): records 1 .. first-1 are images, and records [first, last) are one header per
identity whose label is the (start, end) key range of that identity's images.
"""
import os
import struct
from collections import namedtuple

import numpy as np
import torch

from ._image import decode_image, encode_image, to_float

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """An image record header: label is a float, or a float32 array when flag > 0."""


def pack(header, payload):
    """Image record bytes: the ``IfQQ`` header (+ float32 labels when label is a sequence) + payload.

    Args:
        header: IRHeader or a (flag, label, id, id2) tuple; flag is derived from label.
        payload: bytes (usually an encoded image).
    Returns:
        bytes.
    """
    header = IRHeader(*header)
    if np.ndim(header.label) == 0:
        return struct.pack(_IR_FORMAT, 0, float(header.label), header.id, header.id2) + payload
    labels = np.asarray(header.label, dtype="<f4").reshape(-1)
    return struct.pack(_IR_FORMAT, labels.size, 0.0, header.id, header.id2) + labels.tobytes() + payload


def unpack(record):
    """Splits image record bytes into (IRHeader, payload bytes).

    Returns:
        (IRHeader with label a float, or a float32 array [flag] when flag > 0, payload).
    """
    if len(record) < _IR_SIZE:
        raise ValueError(f"an image record needs at least {_IR_SIZE} header bytes, got {len(record)}")
    header = IRHeader(*struct.unpack_from(_IR_FORMAT, record))
    payload = record[_IR_SIZE:]
    if header.flag > 0:
        size = 4 * header.flag
        if len(payload) < size:
            raise ValueError(f"header flag {header.flag} asks for {header.flag} labels, the record "
                             f"has {len(payload)} bytes after the header")
        header = header._replace(label=np.frombuffer(payload, "<f4", header.flag).copy())
        payload = payload[size:]
    return header, payload


def _default_idx(path_rec):
    stem, ext = os.path.splitext(path_rec)
    return stem + ".idx" if ext == ".rec" else path_rec + ".idx"


class RecordIOReader:
    """Random access to the records of a ``.rec`` file.

    Args:
        path_rec: the ``.rec`` file.
        path_idx: its ``.idx`` ("key\\toffset" lines); default: next to it, and when there is
            none the file is scanned once and records get keys 0, 1, 2, ... in file order.

    The file is opened lazily in each process, so a reader can be sent to DataLoader workers.
    """

    def __init__(self, path_rec, path_idx=None):
        self.path_rec = os.fspath(path_rec)
        if path_idx is None and os.path.exists(_default_idx(self.path_rec)):
            path_idx = _default_idx(self.path_rec)
        self.path_idx = None if path_idx is None else os.fspath(path_idx)
        self._file, self._pid = None, None
        self._offsets = self._read_idx() if self.path_idx else self._scan()
        self.keys = list(self._offsets)

    def _read_idx(self):
        offsets = {}
        with open(self.path_idx) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.split()
                try:
                    key, offset = int(fields[0]), int(fields[1])
                except (IndexError, ValueError):
                    raise ValueError(f"{self.path_idx}:{line_no}: expected 'key<TAB>offset', "
                                     f"got {line.rstrip()!r}") from None
                offsets[key] = offset
        return offsets

    def _scan(self):
        offsets, pos, size = {}, 0, os.path.getsize(self.path_rec)
        while pos < size:
            offsets[len(offsets)] = pos
            _, pos = self.read_at(pos)
        return offsets

    @property
    def file(self):
        """The open ``.rec`` file of this process."""
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path_rec, "rb"), os.getpid()
        return self._file

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def close(self):
        """Closes this process's file handle (reads reopen it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return len(self._offsets)

    def __contains__(self, key):
        return key in self._offsets

    def offset(self, key):
        """The file offset of record ``key`` (KeyError naming the file when absent)."""
        try:
            return self._offsets[key]
        except KeyError:
            raise KeyError(f"record {key!r} is not in {self.path_idx or self.path_rec}") from None

    def read(self, key):
        """The bytes of record ``key``, multi-part records joined."""
        return self.read_at(self.offset(key))[0]

    def read_at(self, offset):
        """Reads the record starting at ``offset``.

        Returns:
            (record bytes, offset of the next record).
        Raises:
            ValueError naming the file and offset on a bad magic, a truncated record or broken
            continuation flags.
        """
        f, parts, pos = self.file, [], offset
        f.seek(pos)
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path_rec}: truncated record header at offset {pos}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(f"{self.path_rec}: bad RecordIO magic 0x{magic:08x} at offset {pos} "
                                 f"(expected 0x{MAGIC:08x}): corrupt file or wrong offset")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            padded = (length + 3) & ~3
            data = f.read(padded)
            if len(data) < length:
                raise ValueError(f"{self.path_rec}: record at offset {pos} needs {length} bytes, "
                                 f"the file ends after {len(data)}")
            if (cflag in (0, 1)) != (not parts) or cflag > 3:
                raise ValueError(f"{self.path_rec}: unexpected continuation flag {cflag} at offset "
                                 f"{pos} (record started at {offset})")
            parts.append(data[:length])
            pos += 8 + padded
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts), pos

    def read_header(self, key):
        """The IRHeader of image record ``key``."""
        return unpack(self.read(key))[0]

    def first_labels(self, keys):
        """The (first) label of each image record, from the headers only: no payload is read.

        Args:
            keys: sequence of record keys.
        Returns:
            float32 array [len(keys)].
        """
        offsets = np.fromiter((self.offset(k) for k in keys), np.int64, len(keys))
        mm = np.memmap(self.path_rec, np.uint8, mode="r") if os.path.getsize(self.path_rec) else None
        out = np.empty(len(offsets), np.float32)
        # A single-part record (or a first part) long enough to hold the header and one extra
        # label is read in place; the rare rest (split inside the header, short or broken
        # records) take the full path, which also reports errors.
        fast = offsets + 8 + _IR_SIZE + 4 <= (0 if mm is None else len(mm))
        if fast.any():
            pos = offsets[fast]

            def word(at, dtype):
                return mm[(at[:, None] + np.arange(4))].copy().view(dtype)[:, 0]

            magic, lrec = word(pos, "<u4"), word(pos + 4, "<u4")
            flag, label = word(pos + 8, "<u4"), word(pos + 12, "<f4")
            extra = word(pos + 8 + _IR_SIZE, "<f4")
            whole = (lrec >> 29 == 0) & ((lrec & _LEN_MASK) >= _IR_SIZE + 4 * (flag > 0))
            first = (lrec >> 29 == 1) & ((lrec & _LEN_MASK) >= _IR_SIZE + 4)
            ok = (magic == MAGIC) & (whole | first)
            out_fast = np.where(flag > 0, extra, label)
            idx = np.nonzero(fast)[0]
            out[idx[ok]] = out_fast[ok]
            fast[idx[~ok]] = False
        for i in np.nonzero(~fast)[0]:
            label = self.read_header(keys[i]).label
            out[i] = label if np.ndim(label) == 0 else label[0]
        return out


class RecordIOWriter:
    """Writes a ``.rec`` file and its ``.idx``, splitting records as dmlc's writer does.

    Args:
        path_rec: the ``.rec`` file to create.
        path_idx: the ``.idx`` file; default: next to it.
    """

    def __init__(self, path_rec, path_idx=None):
        self.path_rec = os.fspath(path_rec)
        self.path_idx = _default_idx(self.path_rec) if path_idx is None else os.fspath(path_idx)
        self._file = open(self.path_rec, "wb")
        self.offsets, self._sizes = {}, {}

    @staticmethod
    def frame(record):
        """The framed bytes of one record: split at every 4-byte aligned magic, padded to 4 bytes."""
        if len(record) > _LEN_MASK:
            raise ValueError(f"a RecordIO record holds at most {_LEN_MASK} bytes, got {len(record)}")
        aligned = np.frombuffer(record, "<u4", len(record) // 4)
        cuts = (np.nonzero(aligned == MAGIC)[0] * 4).tolist()
        starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(record)]
        out = []
        for i, (a, b) in enumerate(zip(starts, ends)):
            cflag = 0 if not cuts else 1 if i == 0 else 3 if i == len(cuts) else 2
            out.append(struct.pack("<II", MAGIC, (cflag << 29) | (b - a)))
            out.append(record[a:b])
        out.append(b"\0" * (-len(record) % 4))  # only the last part can be unaligned
        return b"".join(out)

    def write(self, key, record):
        """Appends record ``key`` (int); returns its offset."""
        if key in self.offsets:
            raise ValueError(f"record key {key} written twice")
        framed, offset = self.frame(record), self._file.tell()
        self._file.write(framed)
        self.offsets[key], self._sizes[key] = offset, len(framed)
        return offset

    def overwrite(self, key, record):
        """Replaces a written record in place; its framed size must not change."""
        framed = self.frame(record)
        if len(framed) != self._sizes[key]:
            raise ValueError(f"record {key}: the new record's framed size {len(framed)} differs "
                             f"from the old one's {self._sizes[key]}")
        end = self._file.tell()
        self._file.seek(self.offsets[key])
        self._file.write(framed)
        self._file.seek(end)

    def close(self):
        """Flushes the ``.rec`` and writes the ``.idx``."""
        if self._file.closed:
            return
        self._file.close()
        with open(self.path_idx, "w") as f:
            f.writelines(f"{k}\t{o}\n" for k, o in self.offsets.items())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
    the headers without decoding images; ``num_classes`` is the number of identity headers when
    record 0 holds them, else max(label) + 1.
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
        self.labels = torch.from_numpy(self.reader.first_labels(self.image_keys).astype(np.int64))
        if self.identity_keys is not None:
            self.num_classes = len(self.identity_keys)
        else:
            self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0

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
        _, payload = unpack(self.reader.read(self.image_keys[i]))
        img = to_float(decode_image(payload, self.image_size))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])
