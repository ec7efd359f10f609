"""ImageFolderIdentities: one sub-folder of images per identity."""
import os

import torch

from ._image import decode_image, to_float

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderIdentities(torch.utils.data.Dataset):
    """Images under ``root/<identity>/<image>``; identity folders in sorted order get labels 0..C-1.

    Args:
        root: the folder of identity folders.
        transform: optional callable applied to each float image tensor [3, H, W].
        image_size: optional (H, W) to resize images to when they differ.
        extensions: file name endings (case-insensitive) counted as images.

    Items are (float32 [3, H, W] in [-1, 1], int label), as in ``RecordIODataset``. An identity
    folder without images keeps its label (``num_classes`` counts it) and has no samples.
    """

    def __init__(self, root, transform=None, image_size=None, extensions=IMAGE_EXTENSIONS):
        self.root = os.fspath(root)
        self.transform, self.image_size = transform, image_size
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no identity sub-folders")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        ends = tuple(e.lower() for e in extensions)
        self.paths, labels = [], []
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(ends)
                           and os.path.isfile(os.path.join(folder, f)))
            self.paths += [os.path.join(folder, f) for f in files]
            labels += [label] * len(files)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(image float32 [3, H, W] in [-1, 1] (then ``transform``), label int)."""
        with open(self.paths[i], "rb") as f:
            img = to_float(decode_image(f.read(), self.image_size))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    def encoded_samples(self):
        """Yields (file bytes, label) in dataset order, e.g. for ``write_recordio`` (no re-encoding)."""
        for path, label in zip(self.paths, self.labels.tolist()):
            with open(path, "rb") as f:
                yield f.read(), label
