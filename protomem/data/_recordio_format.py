"""The RecordIO file format (``.rec`` + ``.idx``) of mxnet / dmlc, read and written without them.

Framing (dmlc RecordIO): each record part is ``uint32 magic 0xced7230a``, ``uint32 lrecord``
(top 3 bits: continuation flag, low 29 bits: length), then the payload padded to 4 bytes. A
writer splits a payload wherever the magic occurs at a 4-byte aligned position and drops that
magic; flags 1 (first), 2 (middle), 3 (last) mark the parts and a reader joins them with the
magic put back. Flag 0 is a whole record.

An image record is ``struct IfQQ`` (flag, label, id, id2) then the payload; flag > 0 means
``flag`` float32 labels follow the struct and replace ``label``. The ``.idx`` file holds
``key\toffset`` lines.
"""
import os
import struct
from collections import namedtuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """An image record header: label is a float, or a float32 array when flag > 0."""
_WINDOW = 8 + _IR_SIZE + 4  # a record's first bytes: framing, header, one extra label
_CHUNK = 1 << 16  # records whose headers are gathered at once


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

    unpack = staticmethod(unpack)

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
        out, done = np.empty(len(offsets), np.float32), np.zeros(len(offsets), bool)
        if os.path.getsize(self.path_rec):
            mm = np.memmap(self.path_rec, np.uint8, mode="r")
            for lo in range(0, len(offsets), _CHUNK):
                out[lo:lo + _CHUNK], done[lo:lo + _CHUNK] = _labels_in_place(mm, offsets[lo:lo + _CHUNK])
        # The rare rest (split inside the header, short or broken records) takes the full path,
        # which also reports errors.
        for i in np.nonzero(~done)[0]:
            label = self.read_header(keys[i]).label
            out[i] = label if np.ndim(label) == 0 else label[0]
        return out


def _labels_in_place(mm, offsets):
    """(first label float32 [n], ok bool [n]) of records whose first part holds the whole header
    (and the first extra label when flag > 0), read from the memory-mapped file ``mm``."""
    ok = offsets + _WINDOW <= len(mm)
    window = np.zeros((len(offsets), _WINDOW), np.uint8)
    window[ok] = mm[offsets[ok, None] + np.arange(_WINDOW)]
    words, floats = window.view("<u4"), window.view("<f4")  # [n, 9]: magic lrec flag label ...
    magic, cflag, length, flag = words[:, 0], words[:, 1] >> 29, words[:, 1] & _LEN_MASK, words[:, 2]
    ok &= (magic == MAGIC) & (cflag <= 1) & (length >= _IR_SIZE + 4 * (flag > 0))
    return np.where(flag > 0, floats[:, -1], floats[:, 3]), ok


class RecordIOWriter:
    """Writes a ``.rec`` file and its ``.idx``, splitting records as dmlc's writer does.

    Args:
        path_rec: the ``.rec`` file to create.
        path_idx: the ``.idx`` file; default: next to it.
    """

    def __init__(self, path_rec, path_idx=None):
        self.path_rec = os.fspath(path_rec)
        self.path_idx = _default_idx(self.path_rec) if path_idx is None else os.fspath(path_idx)
        for path in (self.path_rec, self.path_idx):  # write_recordio("out/train", ...) creates out/
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
