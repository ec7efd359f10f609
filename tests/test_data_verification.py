"""insightface .bin verification sets: round trip, flip, Python 2 pickles, refused pickles."""
import pickle
import struct

import numpy as np
import pytest
import torch

from protomem.data import load_verification_bin, write_verification_bin
from protomem.data._image import encode_image

pytest.importorskip("PIL")


def random_pairs(n, h=8, w=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2 * n, h, w, 3), dtype=np.uint8)
    return images, rng.integers(0, 2, size=n).astype(bool)


def as_float(images):
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def python2_pickle(bins, issame):
    """A protocol-2 pickle as Python 2 writes one: images as str (BINSTRING), bools as opcodes."""
    out = [b"\x80\x02]("]  # PROTO 2, EMPTY_LIST, MARK
    out += [b"T" + struct.pack("<I", len(b)) + b for b in bins]  # BINSTRING
    out.append(b"e](")  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if s else b"\x89" for s in issame]  # NEWTRUE / NEWFALSE
    out.append(b"e\x86.")  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def test_round_trip_and_flip(tmp_path):
    images, issame = random_pairs(5)
    path = tmp_path / "lfw.bin"
    write_verification_bin(path, images, issame, format="png")
    data, same = load_verification_bin(path, image_size=(8, 6))
    assert data.dtype == torch.float32 and data.shape == (10, 3, 8, 6)
    assert same.dtype == torch.bool and same.tolist() == issame.tolist()
    torch.testing.assert_close(data, as_float(images), rtol=0, atol=0)
    data2, same2, flipped = load_verification_bin(path, image_size=(8, 6), flip=True)
    assert torch.equal(data2, data) and torch.equal(same2, same)
    torch.testing.assert_close(flipped, as_float(images[:, :, ::-1].copy()), rtol=0, atol=0)


def test_resize_and_jpeg(tmp_path):
    images, issame = random_pairs(2, seed=1)
    path = tmp_path / "cfp.bin"
    write_verification_bin(path, images, issame)  # jpg by default, as insightface
    data, _ = load_verification_bin(path, image_size=(16, 12))
    assert data.shape == (4, 3, 16, 12) and float(data.min()) >= -1 and float(data.max()) <= 1


def test_python2_pickle(tmp_path):
    images, issame = random_pairs(3, seed=2)
    bins = [encode_image(img) for img in images]
    assert any(max(b) > 127 for b in bins)  # not ASCII: needs the encoding="bytes" retry
    path = tmp_path / "py2.bin"
    path.write_bytes(python2_pickle(bins, issame))
    data, same = load_verification_bin(path, image_size=(8, 6))
    assert same.tolist() == issame.tolist()
    torch.testing.assert_close(data, as_float(images), rtol=0, atol=0)


def test_encoded_bytes_written_as_is(tmp_path):
    images, issame = random_pairs(1, seed=3)
    bins = [encode_image(img) for img in images]
    path = tmp_path / "b.bin"
    write_verification_bin(path, bins, issame)
    with open(path, "rb") as f:
        assert pickle.load(f) == (bins, issame.tolist())


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_array_bins(tmp_path, protocol):
    """Some converters store each image as a uint8 numpy array of the encoded bytes."""
    images, issame = random_pairs(2, seed=5)
    bins = [np.frombuffer(encode_image(img), dtype=np.uint8) for img in images]
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((bins, np.asarray(issame)), protocol=protocol))
    data, same = load_verification_bin(path, image_size=(8, 6))
    assert same.tolist() == issame.tolist()
    torch.testing.assert_close(data, as_float(images), rtol=0, atol=0)


def test_refuses_other_pickles(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((print, [True])))  # names a global outside the allow-list
    with pytest.raises(pickle.UnpicklingError, match="may not reference"):
        load_verification_bin(path)
    images, _ = random_pairs(2, seed=4)
    with pytest.raises(ValueError, match="twice"):
        write_verification_bin(tmp_path / "x.bin", images, [True])
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ValueError, match="twice"):
        load_verification_bin(path)
