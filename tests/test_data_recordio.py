"""RecordIO without mxnet: framing (incl. records split at the magic), image headers (incl.
multi-label), insightface's identity ranges in record 0, the dataset, corrupt files."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from protomem.data import (IRHeader, RecordIODataset, RecordIOReader, RecordIOWriter, pack, unpack,
                           write_recordio)
from protomem.data._image import encode_image
from protomem.data.recordio import MAGIC

pytest.importorskip("PIL")

MAGIC_BYTES = struct.pack("<I", MAGIC)


def random_images(n, h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def expected_float(images):
    """insightface's normalisation of uint8 [n, H, W, 3] images, as [n, 3, H, W]."""
    return (torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def parts_of(framed):
    """Parses framed bytes independently of the reader: [(cflag, payload)], checking the padding."""
    parts, pos = [], 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        parts.append((lrec >> 29, framed[pos + 8: pos + 8 + length]))
        pos += 8 + length + (-length % 4)
    assert pos == len(framed)
    return parts


def write_grouped(tmp_path, labels, images, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prefix = tmp_path / "train"
    n = write_recordio(prefix, zip(images, labels), format="png", **kw)
    assert n == len(images)
    return prefix


def test_round_trip_with_identity_ranges(tmp_path):
    labels = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    images = random_images(len(labels))
    write_grouped(tmp_path, labels, images)
    ds = RecordIODataset(tmp_path)  # a folder holding train.rec / train.idx
    assert len(ds) == 10 and ds.num_classes == 4
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dtype == torch.float32 and img.shape == (3, 12, 10)
        assert label == labels[i]
        torch.testing.assert_close(img, expected_float(images[i:i + 1])[0], rtol=0, atol=0)
    # record 0 holds (first, last) of the identity headers; images are records 1 .. first-1
    head = ds.reader.read_header(0)
    assert head.flag == 2 and head.label.tolist() == [11.0, 15.0]
    assert ds.image_keys == list(range(1, 11)) and ds.identity_keys == list(range(11, 15))
    assert ds.identity_ranges().tolist() == [[1, 4], [4, 5], [5, 7], [7, 11]]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 12, 10) and y.tolist() == labels[:4]


def test_images_outside_identity_ranges(tmp_path):
    """Labels come from one image header per identity range, and from their own header for
    images no range covers."""
    images = random_images(4, seed=7)
    with RecordIOWriter(tmp_path / "train.rec") as writer:
        writer.write(0, pack((0, [5.0, 7.0], 0, 0), b""))  # images 1..4, identities 5, 6
        for key, label in zip(range(1, 5), [2, 2, 0, 1]):
            writer.write(key, pack((0, label, key, 0), encode_image(images[key - 1])))
        writer.write(5, pack((0, [1.0, 3.0], 2, 0), b""))  # identity 2: images 1, 2
        writer.write(6, pack((0, [3.0, 3.0], 9, 0), b""))  # an empty range
    ds = RecordIODataset(tmp_path)
    assert ds.labels.tolist() == [2, 2, 0, 1] and ds.num_classes == 2
    torch.testing.assert_close(ds[3][0], expected_float(images[3:])[0])
    with RecordIOWriter(tmp_path / "bad.rec") as writer:
        writer.write(0, pack((0, [2.0, 3.0], 0, 0), b""))
        writer.write(1, pack((0, 0, 1, 0), encode_image(images[0])))
        writer.write(2, pack((0, [1.0, 4.0], 0, 0), b""))  # reaches past the images
    with pytest.raises(ValueError, match="outside"):
        RecordIODataset(tmp_path / "bad.rec")


def test_without_identity_ranges_and_index(tmp_path):
    labels = [3, 1, 3, 0]  # need not be grouped
    images = random_images(4, seed=1)
    prefix = write_grouped(tmp_path, labels, images, identity_ranges=False)
    os.remove(f"{prefix}.idx")  # the reader scans the file instead
    ds = RecordIODataset(f"{prefix}.rec")
    assert ds.image_keys == [0, 1, 2, 3] and ds.identity_keys is None
    assert ds.labels.tolist() == labels and ds.num_classes == 4
    torch.testing.assert_close(ds[2][0], expected_float(images[2:3])[0])
    with pytest.raises(ValueError):
        ds.identity_ranges()


def test_identity_ranges_need_grouped_samples(tmp_path):
    with pytest.raises(ValueError, match="grouped"):
        write_grouped(tmp_path, [0, 1, 0], random_images(3))


def test_multi_label_headers(tmp_path):
    labels = [[0, 0.5, 2.0], [0, 1.5, 3.0], [1, -2.0, 0.25]]
    images = random_images(3, seed=2)
    write_grouped(tmp_path, labels, images)
    ds = RecordIODataset(tmp_path / "train.rec")
    assert ds.labels.tolist() == [0, 0, 1] and ds.num_classes == 2
    head = ds.reader.read_header(ds.image_keys[2])
    assert head.flag == 3 and head.label.dtype == np.float32
    assert head.label.tolist() == [1.0, -2.0, 0.25]
    torch.testing.assert_close(ds[1][0], expected_float(images[1:2])[0])


def test_pack_unpack():
    payload = b"\x01\x02\x03"
    header, data = unpack(pack(IRHeader(0, 7.0, 42, 9), payload))
    assert header == IRHeader(0, 7.0, 42, 9) and data == payload
    header, data = RecordIOReader.unpack(pack((0, [1.0, 2.5], 1, 0), payload))
    assert header.flag == 2 and header.label.tolist() == [1.0, 2.5] and data == payload
    with pytest.raises(ValueError):
        unpack(b"short")
    with pytest.raises(ValueError):
        unpack(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)  # 4 labels announced, 2 present


def test_records_split_at_aligned_magic(tmp_path):
    """dmlc writers split a record where the magic stands at a 4-byte aligned position."""
    two = b"abcd" + MAGIC_BYTES + b"efghijkl" + MAGIC_BYTES + b"xyz"  # aligned at 4 and 16
    parts = parts_of(RecordIOWriter.frame(two))
    assert [c for c, _ in parts] == [1, 2, 3]
    assert [p for _, p in parts] == [b"abcd", b"efghijkl", b"xyz"]
    unaligned = b"ab" + MAGIC_BYTES + b"cd"
    assert [c for c, _ in parts_of(RecordIOWriter.frame(unaligned))] == [0]
    edges = MAGIC_BYTES + b"1234" + MAGIC_BYTES  # at the start and the very end
    assert parts_of(RecordIOWriter.frame(edges)) == [(1, b""), (2, b"1234"), (3, b"")]

    records = {0: two, 1: unaligned, 2: edges, 3: b"", 4: MAGIC_BYTES * 3, 5: b"plain"}
    with RecordIOWriter(tmp_path / "x.rec") as writer:
        for key, rec in records.items():
            writer.write(key, rec)
    with RecordIOReader(tmp_path / "x.rec") as reader:
        assert reader.keys == list(records)
        for key, rec in records.items():
            assert reader.read(key) == rec
    # scanning (no .idx) walks over multi-part records too
    os.remove(tmp_path / "x.idx")
    reader = RecordIOReader(tmp_path / "x.rec")
    assert [reader.read(k) for k in reader.keys] == list(records.values())


def test_split_image_record_in_dataset(tmp_path):
    """An image whose header holds the magic (id field at an aligned offset) and one whose
    payload does: both are split on disk, labels come through the header-only path."""
    images = random_images(2, seed=3)
    encoded = [encode_image(img) for img in images]
    with_magic = encoded[1] + b"\0" * (-len(encoded[1]) % 4) + MAGIC_BYTES + b"tail"
    prefix = tmp_path / "split"
    with RecordIOWriter(f"{prefix}.rec") as writer:
        writer.write(0, pack((0, 5.0, MAGIC, 0), encoded[0]))
        writer.write(1, pack((0, [6.0, 1.0], 0, 0), with_magic))  # PNG ignores trailing bytes
    with open(f"{prefix}.rec", "rb") as f:
        assert struct.unpack_from("<I", f.read(), 4)[0] >> 29 == 1  # record 0 starts a split
    ds = RecordIODataset(f"{prefix}.rec")
    assert ds.labels.tolist() == [5, 6]
    assert ds.reader.read_header(0).id == MAGIC
    assert unpack(ds.reader.read(1))[1] == with_magic
    for i in range(2):
        torch.testing.assert_close(ds[i][0], expected_float(images[i:i + 1])[0])


def corrupt_magic(prefix, key):
    """Overwrites the magic of record ``key``; returns its offset."""
    offset = RecordIOReader(f"{prefix}.rec").offset(key)
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef")
    return offset


def test_corrupt_magic_names_file_and_offset(tmp_path):
    prefix = write_grouped(tmp_path, [0, 1, 1], random_images(3, seed=4))
    offset = corrupt_magic(prefix, 3)  # the second image of identity 1
    reader = RecordIOReader(f"{prefix}.rec")
    with pytest.raises(ValueError, match=rf"train\.rec.*offset {offset}"):
        reader.read(3)
    assert reader.read(2)  # other records are intact
    ds = RecordIODataset(tmp_path)  # labels need only the first image of each identity
    with pytest.raises(ValueError, match=rf"offset {offset}"):
        ds[2]
    flat = write_grouped(tmp_path / "flat", [0, 1, 1], random_images(3), identity_ranges=False)
    offset = corrupt_magic(flat, 1)
    with pytest.raises(ValueError, match=rf"offset {offset}"):
        RecordIODataset(f"{flat}.rec")  # labels come from every image header


def test_truncated_file(tmp_path):
    prefix = write_grouped(tmp_path, [0, 0], random_images(2, seed=5), identity_ranges=False)
    reader = RecordIOReader(f"{prefix}.rec")
    size = reader.offset(1) + 20
    with open(f"{prefix}.rec", "r+b") as f:
        f.truncate(size)
    with pytest.raises(ValueError, match="train.rec"):
        RecordIOReader(f"{prefix}.rec").read(1)


def test_bad_index_line(tmp_path):
    prefix = write_grouped(tmp_path, [0], random_images(1), identity_ranges=False)
    with open(f"{prefix}.idx", "a") as f:
        f.write("not-a-key\n")
    with pytest.raises(ValueError, match=r"train\.idx:2"):
        RecordIOReader(f"{prefix}.rec")


def test_reader_pickles_for_workers(tmp_path):
    prefix = write_grouped(tmp_path, [0, 1], random_images(2, seed=6))
    ds = RecordIODataset(tmp_path)
    first = ds[0][0]  # opens the file
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[0][0], first)
    assert clone.labels.tolist() == [0, 1] and os.path.exists(f"{prefix}.idx")


def test_jpeg_and_resize(tmp_path):
    smooth = np.broadcast_to(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 16, 3))
    prefix = tmp_path / "j"
    write_recordio(prefix, [(np.ascontiguousarray(smooth), 0)], format="jpg")
    ds = RecordIODataset(f"{prefix}.rec")
    img = ds[0][0]
    assert (img - expected_float(smooth[None])[0]).abs().mean() < 0.05  # lossy but close
    assert RecordIODataset(f"{prefix}.rec", image_size=(8, 6))[0][0].shape == (3, 8, 6)
    flipped = RecordIODataset(f"{prefix}.rec", transform=lambda x: x.flip(-1))[0][0]
    torch.testing.assert_close(flipped, img.flip(-1))


def test_corrupt_record_names_file_record_and_identity(tmp_path):
    """Garbage in one image's bytes: the error names the .rec, the record key, the sample and its
    identity, in the main process and from a DataLoader worker."""
    from protomem.data import CorruptRecordError

    labels = [3, 3, 7, 7, 7]
    prefix = write_grouped(tmp_path, labels, random_images(5))
    ds = RecordIODataset(f"{prefix}.rec")
    key = ds.image_keys[3]
    offset = dict(map(int, line.split()) for line in open(f"{prefix}.idx"))[key]
    with open(f"{prefix}.rec", "r+b") as f:  # past the 8-byte frame and the 24-byte header
        f.seek(offset + 8 + 24)
        f.write(b"\x00garbage\xff" * 2)
    ds = RecordIODataset(f"{prefix}.rec")
    assert torch.is_tensor(ds[2][0])  # its neighbours still read
    expected = f"{ds.reader.path_rec}: record {key} (sample 3, identity 7) cannot be decoded"
    with pytest.raises(CorruptRecordError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ds[3]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)
    with pytest.raises(CorruptRecordError, match=f"record {key} \\(sample 3, identity 7\\)"):
        next(iter(loader))
