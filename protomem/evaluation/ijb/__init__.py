"""IJB-B / IJB-C 1:1 verification in the layout of insightface's users (``loose_crop/``, ``meta/``).

- ``meta``: ``read_ijb_meta`` reads and checks the protocol files (``IJBFormatError`` names the
  file and line of any problem).
- ``align``: ``similarity_transform`` (least squares, 5 landmarks -> ArcFace template),
  ``warp_affine`` (bilinear, OpenCV conventions), ``align_face``.
- ``crops``: ``embed_crops``, every crop aligned and embedded with the flip test and a progress bar.
- ``templates``: ``crop_features`` (norm / detector-score modes), ``template_features`` (media
  pooling), ``template_pair_scores`` (blocks).
- ``roc``: ``roc_points``, ``plot_roc``, ``insightface_tars`` (TAR read off the ROC as insightface).
- ``protocol``: ``evaluate_ijb`` (all of it), ``ijb_pair_scores``, ``ijb_tars``.
"""
from .align import ARCFACE_TEMPLATE, align_face, degenerate_landmarks, similarity_transform, warp_affine
from .crops import AlignedCrops, check_images, embed_crops
from .meta import TARGETS, IJBFormatError, IJBMeta, meta_paths, read_ijb_meta
from .protocol import IJB_FARS, evaluate_ijb, ijb_pair_scores, ijb_tars
from .roc import insightface_tars, plot_roc, roc_points
from .templates import crop_features, template_features, template_pair_scores

__all__ = [
    "ARCFACE_TEMPLATE", "AlignedCrops", "IJBFormatError", "IJBMeta", "IJB_FARS", "TARGETS",
    "align_face", "check_images", "crop_features", "degenerate_landmarks", "embed_crops",
    "evaluate_ijb", "ijb_pair_scores", "ijb_tars", "insightface_tars", "meta_paths", "plot_roc",
    "read_ijb_meta", "roc_points", "similarity_transform", "template_features", "template_pair_scores", "warp_affine",
]
