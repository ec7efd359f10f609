"""insightface's ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: 2N encoded images, pairs being consecutive
images, and N booleans (same identity or not). Files written by Python 2 hold ``str`` images,
read back with ``encoding="bytes"``.
"""
import pickle

import numpy as np
import torch

from ._image import decode_image, encode_image, to_float

# The only globals a verification pickle may name (numpy arrays, as some converters store
# images or flags): anything else is refused, so loading a .bin cannot run arbitrary code.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "bool_"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"), ("builtins", "bytearray"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"a verification .bin may not reference {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path):
    for encoding in ("ASCII", "bytes"):  # "bytes": Python 2 pickles whose str are binary
        with open(path, "rb") as f:
            try:
                return _SafeUnpickler(f, encoding=encoding).load()
            except UnicodeDecodeError:
                continue
    raise ValueError(f"{path}: cannot unpickle as a verification .bin")


def load_verification_bin(path, image_size=(112, 112), flip=False):
    """Loads a verification set.

    Args:
        path: the ``.bin`` file.
        image_size: (H, W); images of another size are resized (bilinear).
        flip: also return the horizontally flipped images (test-time flip augmentation).
    Returns:
        (images float32 [2N, 3, H, W] in [-1, 1], issame bool [N]), and with ``flip`` a third
        element: the flipped images, float32 [2N, 3, H, W]. Pair i is images 2i and 2i+1.
    """
    obj = _load_pickle(path)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame = obj
    issame = torch.tensor([bool(s) for s in issame], dtype=torch.bool)
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected twice as many)")
    images = torch.empty((len(bins), 3) + tuple(image_size), dtype=torch.float32)
    for i, data in enumerate(bins):
        data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        images[i] = to_float(decode_image(data, image_size))
    if flip:
        return images, issame, images.flip(-1)
    return images, issame


def write_verification_bin(path, images, issame, format="jpg", quality=95):
    """Writes a verification set as insightface does (pickle protocol 4).

    Args:
        path: the ``.bin`` to create.
        images: 2N encoded images (bytes), or uint8 [2N, H, W, 3] (encoded with ``format``).
        issame: N booleans.
        format, quality: encoding of array images ("jpg" or "png").
    """
    issame = [bool(s) for s in issame]
    if isinstance(images, (list, tuple)) and all(isinstance(b, (bytes, bytearray)) for b in images):
        bins = [bytes(b) for b in images]
    else:
        bins = [encode_image(img, format, quality) for img in images]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{len(bins)} images for {len(issame)} pairs (expected twice as many)")
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
