"""The IJB crops as aligned images, and their embeddings (batched, flip test, progress bar)."""
import os
import sys
import time

import torch

from ...data._image import decode_image, to_float
from ..embedding import flip_embeddings
from .align import align_face
from .meta import IJBFormatError

__all__ = ["AlignedCrops", "check_images", "embed_crops"]


class AlignedCrops(torch.utils.data.Dataset):
    """Crop ``i`` of an ``IJBMeta``, decoded (RGB) and aligned: uint8 [3, 112, 112]."""

    def __init__(self, meta):
        self.meta = meta

    def __len__(self):
        return len(self.meta.names)

    def __getitem__(self, i):
        path = self.meta.image_path(i)
        try:
            with open(path, "rb") as f:
                image = decode_image(f.read())
        except (OSError, ValueError) as err:
            raise IJBFormatError(f"{path}: cannot read the image listed at {self.meta.where(i)}: "
                                 f"{err}") from None
        return align_face(image, self.meta.landmarks[i])


def check_images(meta):
    """Raises ``IJBFormatError`` naming the first crop whose image file is missing (and how many are),
    before any time goes into embedding."""
    missing = [i for i in range(len(meta.names)) if not os.path.isfile(meta.image_path(i))]
    if missing:
        i = missing[0]
        raise IJBFormatError(f"{meta.image_path(i)}: missing, listed at {meta.where(i)} "
                             f"({len(missing)} of {len(meta.names)} crop images missing)")


class _Progress:
    """tqdm over images when installed, else a line every ~10 s; reports images/s at the end."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.perf_counter()
        self.bar, self.last = None, self.start
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="img", desc="embedding", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last > 10:
            self.last = time.perf_counter()
            print(f"embedding: {self.done}/{self.total} images", file=sys.stderr, flush=True)

    def close(self):
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        rate = self.done / seconds if seconds > 0 else float("inf")
        if self.enabled:
            print(f"embedded {self.done} images in {seconds:.1f} s ({rate:.1f} images/s)",
                  file=sys.stderr, flush=True)
        return rate


def embed_crops(model, meta, batch_size=128, device=None, flip=True, workers=0, progress=True):
    """Embeddings of every crop of an IJB release, aligned and scaled to [-1, 1] as insightface's
    ``(x / 255 - 0.5) / 0.5``, with the flip test.

    Args:
        model: ``nn.Module`` mapping [B, 3, 112, 112] RGB images in [-1, 1] to [B, E].
        meta: ``IJBMeta`` (its images are checked to exist first).
        batch_size: crops per forward pass.
        device: where the model runs; default its device.
        flip: embedding = model(x) + model(x flipped left-right).
        workers: ``DataLoader`` worker processes decoding and aligning crops (0: in this process).
        progress: show a progress bar and print the throughput (to stderr).

    Returns:
        (float32 [N, E] on the CPU, not normalised; images per second, float).
    """
    check_images(meta)
    loader = torch.utils.data.DataLoader(AlignedCrops(meta), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    bar = _Progress(len(meta.names), progress)
    out = []
    for images in loader:
        out.append(flip_embeddings(model, to_float(images), batch_size, device, flip))
        bar.update(images.shape[0])
    return torch.cat(out), bar.close()
