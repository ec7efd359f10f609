"""IJB-B / IJB-C 1:1 verification of an encoder: crops -> embeddings -> templates -> pair scores ->
TAR at FAR 1e-6 ... 1e-1 and the ROC."""
import warnings

import torch

from ..metrics import tar_at_far
from ..report import far_key
from .crops import embed_crops
from .meta import read_ijb_meta
from .roc import insightface_tars, roc_points
from .templates import crop_features, template_features, template_pair_scores

__all__ = ["IJB_FARS", "evaluate_ijb", "ijb_pair_scores", "ijb_tars"]

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def ijb_pair_scores(embeddings, meta, detector_score=True, norm=True, block_rows=1024, device=None):
    """The score of every template pair of the protocol from the crops' embeddings.

    Args:
        embeddings: [N, E] float crop embeddings in the order of ``meta`` (``embed_crops``).
        meta: ``IJBMeta``.
        detector_score: weight each crop by its detector score.
        norm: keep the embedding norms as quality weights (False: normalise each crop).
        block_rows: first templates of pairs scored at a time (``template_pair_scores``).
        device: where to pool and score; default the embeddings' device.

    Returns:
        float32 [P] cosine scores, in the order of ``meta.pairs``, on the CPU.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] != len(meta.names):
        raise ValueError(f"embeddings must be [{len(meta.names)}, E] (one per crop), got "
                         f"{tuple(embeddings.shape)}")
    device = embeddings.device if device is None else torch.device(device)
    feats = crop_features(embeddings.to(device), meta.scores if detector_score else None, norm)
    ids, tfeats = template_features(feats, meta.templates, meta.medias)
    return template_pair_scores(ids, tfeats, meta.pairs, block_rows).cpu()


def ijb_tars(scores, labels, fars=IJB_FARS, far_rule="exact"):
    """dict ``"tar@far=<far>"`` -> TAR (float).

    ``far_rule="exact"``: ``tar_at_far``'s exact thresholds (NaN where fewer than 1/far impostor
    pairs); ``"insightface"``: the nearest point of the ROC, as insightface's script reads it
    (``roc.insightface_tars``; a number even where the FAR is not measurable).
    """
    if far_rule == "insightface":
        tars = insightface_tars(scores, labels, fars)
    elif far_rule == "exact":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # unmeasurable FARs are NaN, as documented
            tars = {far: tar for far, (tar, _) in tar_at_far(scores, labels, fars).items()}
    else:
        raise ValueError(f"far_rule must be 'exact' or 'insightface', got {far_rule!r}")
    return {f"tar@far={far_key(far)}": tars[far] for far in fars}


def evaluate_ijb(model, root, target="IJBC", batch_size=128, device=None, flip=True, norm=True,
                 detector_score=True, fars=IJB_FARS, workers=0, progress=True, roc_num=200,
                 far_rule="exact"):
    """IJB-B / IJB-C 1:1 verification (insightface's ``eval_ijbc.py`` protocol).

    Each crop of ``root/loose_crop`` is aligned by its 5 landmarks to the 112 x 112 ArcFace template
    and embedded (``embed_crops``); crops are pooled into templates (mean within a media, then over
    medias, normalised; ``template_features``); every pair of ``<target>_template_pair_label.txt``
    is scored by the cosine of its templates; TAR at each FAR uses the exact threshold (the
    (k+1)-th largest impostor score, k = floor(far * impostors)), or with
    ``far_rule="insightface"`` the nearest point of sklearn's ROC as insightface's script reads it
    (the numbers papers report; the two can differ in the last digits).

    Args:
        model: ``nn.Module`` mapping [B, 3, 112, 112] RGB in [-1, 1] to [B, E] (eval mode is set
            during the forward passes).
        root: the release folder (``loose_crop/``, ``meta/``).
        target: "IJBB" or "IJBC".
        batch_size: crops per forward pass.
        device: where the model runs (it is not moved); default its device.
        flip: the flip test (insightface "F1").
        norm: keep embedding norms as quality weights (insightface "N1"; False normalises crops).
        detector_score: weight crops by their detector score (insightface "D1").
        fars: the FARs of the table.
        workers: DataLoader processes decoding and aligning crops.
        progress: progress bar and throughput on stderr.
        roc_num: points of the returned ROC.
        far_rule: "exact" or "insightface" (``ijb_tars``).

    Returns:
        dict: ``name`` (target), ints ``images``, ``templates``, ``pairs``, ``genuine``, float
        ``images_per_s``, floats ``tar@far=<far>`` for each far, and ``roc``, a (far, tar) pair of
        float64 tensors (``roc_points``).
    """
    meta = read_ijb_meta(root, target)
    embeddings, rate = embed_crops(model, meta, batch_size, device, flip, workers, progress)
    scores = ijb_pair_scores(embeddings, meta, detector_score, norm)
    return {"name": meta.target, "images": len(meta.names), "templates": int(meta.templates.unique().numel()),
            "pairs": int(meta.labels.numel()), "genuine": int(meta.labels.sum()), "images_per_s": rate,
            **ijb_tars(scores, meta.labels, fars, far_rule), "roc": roc_points(scores, meta.labels, roc_num)}
