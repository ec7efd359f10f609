"""A small IJB-format release written by the tests: synthetic faces placed into larger crops by known
similarity transforms, with their 5 landmarks, templates, medias and pairs."""
import math
import os

import numpy as np
import torch

from protomem.data import SyntheticIdentities
from protomem.data._image import encode_image
from protomem.evaluation.ijb import ARCFACE_TEMPLATE, warp_affine


def random_similarity(gen, scale=(1.1, 1.6), angle=25.0, shift=(10.0, 30.0)):
    """A float64 [2, 3] similarity: aligned pixels -> crop pixels."""
    s = float(torch.empty(1, dtype=torch.float64).uniform_(*scale, generator=gen))
    a = math.radians(float(torch.empty(1, dtype=torch.float64).uniform_(-angle, angle, generator=gen)))
    t = torch.empty(2, dtype=torch.float64).uniform_(*shift, generator=gen)
    return torch.tensor([[s * math.cos(a), -s * math.sin(a), t[0]],
                         [s * math.sin(a), s * math.cos(a), t[1]]], dtype=torch.float64)


def apply(matrix, points):
    """[K, 2] points through a [2, 3] affine matrix."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def crop_of(face, to_crop, size):
    """The aligned face [3, 112, 112] (uint8) seen in a larger crop through ``to_crop``, and the
    crop's landmarks [5, 2]."""
    return warp_affine(face, to_crop, size), apply(to_crop, ARCFACE_TEMPLATE)


def make_protocol(identities, templates_per_identity, seed, max_medias=3):
    """Rows (identity, template, media) of crops and the template list: each template holds 1 to
    ``max_medias`` medias of 1-2 crops each (a media can hold several crops, like video frames)."""
    gen = torch.Generator().manual_seed(seed)
    rows, template_identity = [], []
    for ident in range(identities):
        for _ in range(templates_per_identity):
            tid = 100 + 7 * len(template_identity)         # ids need not be dense
            template_identity.append((tid, ident))
            n_medias = int(torch.randint(1, max_medias + 1, (1,), generator=gen))
            for m in range(n_medias):
                mid = 5000 + 11 * tid + m
                for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
                    rows.append((ident, tid, mid))
    return rows, template_identity


def write_ijb_set(root, target="IJBC", identities=4, templates_per_identity=2, seed=0, max_medias=3):
    """Writes ``root/loose_crop`` and ``root/meta/<target>_*.txt``; every pair of templates is a
    verification pair. Returns dict: rows (identity, template, media per crop), names, landmarks
    [N, 5, 2], scores [N], pairs [P, 3] (t1, t2, label)."""
    rows, template_identity = make_protocol(identities, templates_per_identity, seed, max_medias)
    ds = SyntheticIdentities(identities, mode="image", samples_per_class=16, noise=0.3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    names, landmarks = [], []
    for i, (ident, _, _) in enumerate(rows):
        face = ds.sample(torch.tensor([ident]), torch.tensor([i % 16]))[0]
        face = ((face + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        size = (150 + int(torch.randint(0, 30, (1,), generator=gen)), 160)
        crop, points = crop_of(face, random_similarity(gen), size)
        names.append(f"{i + 1}.png")
        landmarks.append(points)
        with open(os.path.join(root, "loose_crop", names[-1]), "wb") as f:
            f.write(encode_image(crop.permute(1, 2, 0), "png"))
    landmarks = torch.stack(landmarks)
    scores = torch.empty(len(rows), dtype=torch.float64).uniform_(0.5, 1.0, generator=gen)
    pairs = [(t1, t2, int(i1 == i2)) for a, (t1, i1) in enumerate(template_identity)
             for (t2, i2) in template_identity[a + 1:]]
    prefix = os.path.join(root, "meta", target.lower())
    with open(f"{prefix}_face_tid_mid.txt", "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, (_, t, m) in zip(names, rows))
    with open(f"{prefix}_name_5pts_score.txt", "w") as f:
        for n, lm, s in zip(names, landmarks, scores):
            f.write(" ".join([n, *(f"{v:.6f}" for v in lm.flatten().tolist()), f"{s:.6f}"]) + "\n")
    with open(f"{prefix}_template_pair_label.txt", "w") as f:
        f.writelines(f"{a} {b} {y}\n" for a, b, y in pairs)
    return {"rows": rows, "names": names, "landmarks": landmarks, "scores": scores,
            "pairs": np.array(pairs, dtype=np.int64)}
