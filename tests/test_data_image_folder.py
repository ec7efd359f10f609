"""ImageFolderIdentities: sorted identity folders -> labels, images as in RecordIODataset, and
conversion of a folder to RecordIO."""
import numpy as np
import pytest
import torch

from protomem.data import ImageFolderIdentities, RecordIODataset, write_recordio

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def make_folder(root, counts, seed=0):
    """root/<name>/<i>.png with random images; returns {(name, i): uint8 [H, W, 3]}."""
    rng = np.random.default_rng(seed)
    images = {}
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
            images[name, i] = img
    return images


def as_float(img):
    return (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5


def test_labels_follow_sorted_folder_names(tmp_path):
    images = make_folder(tmp_path, {"bob": 2, "alice": 3, "carol": 1})
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    ds = ImageFolderIdentities(tmp_path)
    assert ds.classes == ["alice", "bob", "carol", "empty"] and ds.num_classes == 4
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert len(ds) == 6
    names = ["alice"] * 3 + ["bob"] * 2 + ["carol"]
    index = [0, 1, 2, 0, 1, 0]
    for i, (name, j) in enumerate(zip(names, index)):
        img, label = ds[i]
        assert label == ds.class_to_idx[name]
        torch.testing.assert_close(img, as_float(images[name, j]), rtol=0, atol=0)


def test_transform_and_resize(tmp_path):
    make_folder(tmp_path, {"a": 1})
    assert ImageFolderIdentities(tmp_path, image_size=(5, 4))[0][0].shape == (3, 5, 4)
    plain = ImageFolderIdentities(tmp_path)[0][0]
    flipped = ImageFolderIdentities(tmp_path, transform=lambda x: x.flip(-1))[0][0]
    torch.testing.assert_close(flipped, plain.flip(-1))


def test_convert_to_recordio(tmp_path):
    make_folder(tmp_path / "faces", {"x": 2, "y": 3}, seed=1)
    folder = ImageFolderIdentities(tmp_path / "faces")
    assert write_recordio(tmp_path / "train", folder.encoded_samples()) == 5
    rec = RecordIODataset(tmp_path)
    assert rec.labels.tolist() == folder.labels.tolist() and rec.num_classes == 2
    for i in range(len(folder)):
        torch.testing.assert_close(rec[i][0], folder[i][0], rtol=0, atol=0)  # bytes copied as is


def test_no_identity_folders(tmp_path):
    with pytest.raises(ValueError, match="no identity"):
        ImageFolderIdentities(tmp_path)
