"""Reading an IJB-B / IJB-C release in the layout insightface's users have it::

    <root>/loose_crop/<name>                          the face crops (JPEG / PNG)
    <root>/meta/<target>_face_tid_mid.txt             "<name> <template id> <media id>" per crop
    <root>/meta/<target>_name_5pts_score.txt          "<name> x1 y1 ... x5 y5 <detector score>"
    <root>/meta/<target>_template_pair_label.txt      "<template 1> <template 2> <0|1>" per pair

``<target>`` is ``ijbb`` or ``ijbc``. Both per-crop files list the same crops in the same order (as
insightface assumes). Every problem is an ``IJBFormatError`` naming the file and its 1-based line;
nothing is skipped silently.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

from .align import degenerate_landmarks

__all__ = ["IJBFormatError", "IJBMeta", "TARGETS", "meta_paths", "read_ijb_meta"]

TARGETS = ("IJBB", "IJBC")


class IJBFormatError(ValueError):
    """A missing or malformed file of an IJB release (the message names the file and line)."""


@dataclass
class IJBMeta:
    """The protocol of one IJB release, in the order of its per-crop files.

    Attributes:
        root: the release folder.
        target: "IJBB" or "IJBC".
        names: list of N crop file names (relative to ``root/loose_crop``).
        templates: int64 [N], the template id of each crop.
        medias: int64 [N], the media (photo or video) id of each crop.
        landmarks: float64 [N, 5, 2], (x, y) of eyes, nose, mouth corners in crop pixels.
        scores: float32 [N], the detector (faceness) score of each crop.
        pairs: int64 [P, 2], template ids of each verification pair.
        labels: bool [P], True for a genuine (same-identity) pair.
        lines: where each crop is listed, ``"<face_tid_mid file>:<line>"`` (None: unknown).
    """

    root: str
    target: str
    names: list
    templates: torch.Tensor
    medias: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor
    pairs: torch.Tensor
    labels: torch.Tensor
    lines: list = None

    def where(self, i):
        """Where crop ``i`` is listed (str): its file and line, or its position."""
        return self.lines[i] if self.lines is not None else f"crop {i + 1}"

    def image_path(self, i):
        """The file of crop ``i`` (str)."""
        return os.path.join(self.root, "loose_crop", self.names[i])


def meta_paths(root, target):
    """dict ``face_tid_mid`` / ``name_5pts_score`` / ``template_pair_label`` -> path (str)."""
    prefix = os.path.join(root, "meta", target.lower())
    return {kind: f"{prefix}_{kind}.txt"
            for kind in ("face_tid_mid", "name_5pts_score", "template_pair_label")}


def _check_file(path):
    if not os.path.isfile(path):
        raise IJBFormatError(f"{path}: missing (an IJB release has meta/<target>_face_tid_mid.txt, "
                             f"meta/<target>_name_5pts_score.txt, meta/<target>_template_pair_label.txt "
                             f"and loose_crop/)")


def _lines(path):
    """(line number, fields) of each non-blank line."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if fields:
                yield number, fields


def _parse(path, number, fields, count, convert, skip=1):
    """``convert`` of every field after the first ``skip`` (names), or an error naming the line."""
    if len(fields) != count:
        raise IJBFormatError(f"{path}:{number}: expected {count} fields, got {len(fields)}: "
                             f"{' '.join(fields)!r}")
    try:
        return [convert(v) for v in fields[skip:]]
    except ValueError as err:
        raise IJBFormatError(f"{path}:{number}: {err}: {' '.join(fields)!r}") from None


def _read_face_tid_mid(path):
    names, ids, lines = [], [], []
    for number, fields in _lines(path):
        ids.append(_parse(path, number, fields, 3, int))
        names.append(fields[0])
        lines.append(f"{path}:{number}")
    if not names:
        raise IJBFormatError(f"{path}: no crops listed")
    ids = torch.tensor(ids, dtype=torch.int64)
    return names, ids[:, 0], ids[:, 1], lines


def _read_name_5pts_score(path, names):
    rows, numbers = [], []
    for number, fields in _lines(path):
        i = len(rows)
        if i < len(names) and fields[0] != names[i]:
            raise IJBFormatError(f"{path}:{number}: crop {fields[0]!r}, but the face_tid_mid file's "
                                 f"crop {i + 1} is {names[i]!r} (both list the crops in one order)")
        rows.append(_parse(path, number, fields, 12, float))
        numbers.append(number)
    if len(rows) != len(names):
        raise IJBFormatError(f"{path}: {len(rows)} crops, but the face_tid_mid file lists {len(names)}")
    values = torch.tensor(rows, dtype=torch.float64)
    bad = (~torch.isfinite(values).all(1)).nonzero()[:, 0]
    if bad.numel():
        raise IJBFormatError(f"{path}:{numbers[bad[0]]}: non-finite landmark or score "
                             f"({bad.numel()} such lines)")
    return values[:, :10].reshape(-1, 5, 2), values[:, 10].float(), numbers


def _first_bad_pair_line(path):
    """The error for the first line of a pair file that is not three integers."""
    for number, fields in _lines(path):
        _parse(path, number, fields, 3, int, skip=0)
    return IJBFormatError(f"{path}: unreadable")


def _read_pairs(path):
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        # numpy's messages count rows differently from case to case: find the line again
        raise _first_bad_pair_line(path) from None
    if table.shape[0] == 0:
        raise IJBFormatError(f"{path}: no pairs listed")
    if table.shape[1] != 3:
        raise IJBFormatError(f"{path}: expected 3 fields per line, got {table.shape[1]}")
    table = torch.from_numpy(table)
    bad = ((table[:, 2] != 0) & (table[:, 2] != 1)).nonzero()[:, 0]
    if bad.numel():
        raise IJBFormatError(f"{path}:{_line_of_row(path, int(bad[0]))}: label {int(table[bad[0], 2])} "
                             f"(expected 0 or 1; {bad.numel()} such pairs)")
    return table[:, :2].contiguous(), table[:, 2] == 1


def _line_of_row(path, row):
    """The 1-based line of the ``row``-th (0-based) non-blank line of a file."""
    for k, (number, _) in enumerate(_lines(path)):
        if k == row:
            return number
    return row + 1


def _check_pair_templates(path, pairs, templates):
    known = templates.unique()
    pos = torch.searchsorted(known, pairs).clamp(max=known.numel() - 1)
    unknown = (known[pos] != pairs).any(1).nonzero()[:, 0]
    if unknown.numel():
        i = int(unknown[0])
        a, b = int(pairs[i, 0]), int(pairs[i, 1])
        raise IJBFormatError(f"{path}:{_line_of_row(path, i)}: pair ({a}, {b}) names a "
                             f"template no crop belongs to ({unknown.numel()} such pairs)")


def read_ijb_meta(root, target):
    """Reads and checks the protocol files of an IJB release (not the images).

    Args:
        root: the release folder (holding ``meta/`` and ``loose_crop/``).
        target: "IJBB" or "IJBC" (any case).

    Returns:
        ``IJBMeta``. Raises ``IJBFormatError`` for a missing file, a malformed line (naming the file
        and line), crops listed differently by the two per-crop files, non-finite landmarks, labels
        other than 0/1, and pairs naming unknown templates.
    """
    target = str(target).upper()
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not os.path.isdir(root):
        raise IJBFormatError(f"{root}: no such IJB folder")
    paths = meta_paths(root, target)
    for path in paths.values():
        _check_file(path)
    names, templates, medias, lines = _read_face_tid_mid(paths["face_tid_mid"])
    landmarks, scores, numbers = _read_name_5pts_score(paths["name_5pts_score"], names)
    bad = degenerate_landmarks(landmarks).nonzero()[:, 0]
    if bad.numel():
        raise IJBFormatError(f"{paths['name_5pts_score']}:{numbers[bad[0]]}: the 5 landmarks "
                             f"{landmarks[bad[0]].flatten().tolist()} give a degenerate alignment "
                             f"(they nearly coincide; {bad.numel()} such lines)")
    pairs, labels = _read_pairs(paths["template_pair_label"])
    _check_pair_templates(paths["template_pair_label"], pairs, templates)
    return IJBMeta(root, target, names, templates, medias, landmarks, scores, pairs, labels, lines)
