"""insightface's ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30): 10-fold accuracy."""
import os

from ..data import load_verification_bin
from .embedding import flip_embeddings
from .metrics import verification_accuracy

__all__ = ["evaluate_bin"]



def evaluate_bin(model, path, batch_size=256, device=None, flip=True, nfolds=10):
    """insightface's verification protocol on a ``.bin`` set.

    The images (decoded to float32 [2P, 3, 112, 112] in [-1, 1]) are embedded with the flip test
    (``flip_embeddings``); pair i is images 2i and 2i+1; ``verification_accuracy``
    gives the k-fold accuracy and VAL at FAR 1e-3.

    Args:
        model: encoder ``nn.Module`` taking [B, 3, 112, 112] images.
        path: the ``.bin`` file.
        batch_size: images per forward pass.
        device: where the model runs; default its device.
        flip: add the embedding of each horizontally flipped image (insightface does).
        nfolds: verification folds (insightface: 10).

    Returns:
        dict: ``name`` (the file stem), ``pairs`` (int), and floats ``accuracy`` (mean over folds),
        ``accuracy_std``, ``threshold`` (mean best distance threshold) and ``val@far=1e-3``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification set {path!r} not found")
    images, issame = load_verification_bin(path)
    emb = flip_embeddings(model, images, batch_size, device, flip)
    ver = verification_accuracy(emb[0::2], emb[1::2], issame, nfolds=nfolds, far_target=1e-3)
    return {"name": os.path.splitext(os.path.basename(path))[0], "pairs": int(issame.numel()),
            "accuracy": ver["accuracy"], "accuracy_std": ver["accuracy_std"],
            "threshold": ver["threshold"], "val@far=1e-3": ver["val"]}
