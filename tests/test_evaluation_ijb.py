"""IJB-B / IJB-C 1:1 verification: template pooling, pair scores and TAR@FAR against a brute-force
implementation of the protocol; reading the release layout and its errors; end to end."""
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from ijb_helpers import write_ijb_set
from protomem.evaluation.ijb import (
    IJB_FARS,
    IJBFormatError,
    IJBMeta,
    evaluate_ijb,
    ijb_pair_scores,
    ijb_tars,
    meta_paths,
    read_ijb_meta,
    roc_points,
    template_pair_scores,
)

# --------------------------------------------------------------------------------------------------
# the protocol written out plainly (insightface's eval_ijbc.py, loop by loop)


def brute_force_scores(emb, rows_template, rows_media, det, pairs, flipless=True, norm=True,
                       detector_score=True):
    """Scores of each pair: per crop (normalise unless norm, times the detector score), mean within
    each media of a template, sum over its medias, normalise, dot product of the two templates."""
    emb = emb.double().numpy()
    feats = {}
    for i in range(emb.shape[0]):
        f = emb[i] if norm else emb[i] / np.linalg.norm(emb[i])
        if detector_score:
            f = f * float(det[i])
        feats.setdefault(int(rows_template[i]), {}).setdefault(int(rows_media[i]), []).append(f)
    template = {}
    for t, medias in feats.items():
        total = sum(np.mean(np.stack(v), axis=0) for v in medias.values())
        template[t] = total / np.linalg.norm(total)
    return np.array([float(template[int(a)] @ template[int(b)]) for a, b in pairs])


def brute_force_tar(scores, genuine, far):
    """TAR at the smallest threshold t (among the impostor scores and -inf) accepting at most
    far * impostors impostors (score > t); NaN when far * impostors < 1."""
    allowed = Fraction(repr(far)) * int((~genuine).sum())
    return float("nan") if allowed < 1 else brute_force_tar_allowing(scores, genuine, allowed)


def brute_force_tar_allowing(scores, genuine, allowed):
    """TAR at the smallest threshold accepting at most ``allowed`` impostors."""
    imp, gen = scores[~genuine], scores[genuine]
    for t in [-np.inf] + sorted(imp):
        if (imp > t).sum() <= allowed:
            return float((gen > t).mean())


def random_protocol(n_templates=160, seed=0, E=24):
    """An in-memory IJBMeta with random crops: identity clusters so genuine pairs score higher."""
    g = torch.Generator().manual_seed(seed)
    identity = torch.randint(0, 40, (n_templates,), generator=g)
    crops_per = torch.randint(1, 6, (n_templates,), generator=g)
    templates = torch.repeat_interleave(torch.arange(n_templates) * 3 + 11, crops_per)
    medias = templates * 10 + torch.randint(0, 3, (templates.numel(),), generator=g)
    centres = torch.randn(40, E, generator=g)
    ident = torch.repeat_interleave(identity, crops_per)
    emb = centres[ident] * 0.8 + torch.randn(templates.numel(), E, generator=g)
    emb = emb * torch.empty(templates.numel(), 1).uniform_(0.5, 3, generator=g)   # varied norms
    ids = torch.arange(n_templates) * 3 + 11
    a, b = torch.triu_indices(n_templates, n_templates, 1)
    pairs = torch.stack([ids[a], ids[b]], 1)
    labels = identity[a] == identity[b]
    n = templates.numel()
    meta = IJBMeta("-", "IJBC", [f"{i}.jpg" for i in range(n)], templates, medias,
                   torch.zeros(n, 5, 2, dtype=torch.float64), torch.empty(n).uniform_(0.2, 1.0, generator=g), pairs, labels)
    return meta, emb


@pytest.mark.parametrize("norm, detector_score", [(True, True), (False, True), (True, False),
                                                  (False, False)])
def test_scores_and_tars_equal_brute_force(norm, detector_score):
    meta, emb = random_protocol()
    scores = ijb_pair_scores(emb, meta, detector_score=detector_score, norm=norm, block_rows=16)
    expected = brute_force_scores(emb, meta.templates, meta.medias, meta.scores, meta.pairs.numpy(),
                                  norm=norm, detector_score=detector_score)
    assert scores.dtype == torch.float32 and scores.shape == (meta.pairs.shape[0],)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-6)
    # 12,720 pairs, ~12k impostors: FAR 1e-4 ... 1e-1 measurable, 1e-5 and 1e-6 not
    tars = ijb_tars(scores, meta.labels)
    labels = meta.labels.numpy()
    for far in IJB_FARS:
        want = brute_force_tar(expected, labels, far)
        got = tars[f"tar@far={far:.0e}".replace("e-0", "e-")]
        assert (np.isnan(got) and np.isnan(want)) or abs(got - want) <= 1e-6, (far, got, want)
    assert not np.isnan(tars["tar@far=1e-4"]) and np.isnan(tars["tar@far=1e-5"])
    assert tars["tar@far=1e-1"] > tars["tar@far=1e-3"] > 0.05   # the clusters are found


def test_block_size_and_order_do_not_matter():
    meta, emb = random_protocol(n_templates=50, seed=1)
    a = ijb_pair_scores(emb, meta, block_rows=3)
    b = ijb_pair_scores(emb, meta, block_rows=1 << 20)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    perm = torch.randperm(len(meta.names), generator=torch.Generator().manual_seed(0))
    shuffled = IJBMeta("-", "IJBC", [meta.names[i] for i in perm], meta.templates[perm],
                       meta.medias[perm], meta.landmarks[perm], meta.scores[perm], meta.pairs,
                       meta.labels)
    torch.testing.assert_close(ijb_pair_scores(emb[perm], shuffled), a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pattern", ["chain", "all"])
def test_pair_scores_dense_and_sparse(pattern):
    """A chain of pairs (t, t+1) is scored row-wise, all pairs by matrix products: both the dot."""
    g = torch.Generator().manual_seed(3)
    ids = torch.arange(300) * 2 + 1
    feats = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    if pattern == "chain":
        rows = torch.stack([torch.arange(299), torch.arange(1, 300)], 1)
    else:
        rows = torch.cartesian_prod(torch.arange(300), torch.arange(300))
    rows = rows[torch.randperm(rows.shape[0], generator=g)]
    # chain: 299 pairs in a 299 x 299 rectangle, sparse; all: 37 x 300 rectangles, dense
    got = template_pair_scores(ids, feats, ids[rows], block_rows=1024 if pattern == "chain" else 37)
    torch.testing.assert_close(got, (feats[rows[:, 0]] * feats[rows[:, 1]]).sum(1), rtol=0, atol=1e-6)


def test_pair_scores_reject_unknown_templates():
    ids = torch.tensor([2, 5, 9])
    feats = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="no features"):
        template_pair_scores(ids, feats, torch.tensor([[2, 5], [5, 6]]))
    with pytest.raises(ValueError, match="no features"):
        template_pair_scores(ids, feats, torch.tensor([[2, 10]]))


@pytest.mark.parametrize("ties", [False, True])
def test_insightface_far_rule_equals_its_script(ties):
    """TAR read as insightface's eval_ijbc.py does: sklearn's roc_curve, flipped, argmin |fpr - x|."""
    roc_curve = pytest.importorskip("sklearn.metrics").roc_curve
    meta, emb = random_protocol(seed=5)
    scores = ijb_pair_scores(emb, meta)
    if ties:
        scores = (scores * 50).round() / 50
    fpr, tpr, _ = roc_curve(meta.labels.numpy(), scores.numpy())
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    got = ijb_tars(scores, meta.labels, far_rule="insightface")
    for far in IJB_FARS:
        want = tpr[np.argmin(list(abs(fpr - far)))]
        assert abs(got[f"tar@far={far:.0e}".replace("e-0", "e-")] - want) <= 1e-12, far
    with pytest.raises(ValueError, match="far_rule"):
        ijb_tars(scores, meta.labels, far_rule="nearest")


def test_roc_points_match_the_definition():
    meta, emb = random_protocol(n_templates=60, seed=2)
    scores = ijb_pair_scores(emb, meta)
    far, tar = roc_points(scores, meta.labels, num=50)
    s, y = scores.double().numpy(), meta.labels.numpy()
    assert far[-1] == 1.0 and tar[-1] == 1.0 and far[0] == 1.0 / (~y).sum()
    assert bool((far.diff() > 0).all()) and bool((tar.diff() >= 0).all())
    for f, t in zip(far.tolist(), tar.tolist()):   # no ties: the realised FAR is the allowed one
        assert abs(brute_force_tar_allowing(s, y, round(f * (~y).sum())) - t) <= 1e-12


# --------------------------------------------------------------------------------------------------
# the release layout and its errors


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ijbc"))
    return root, write_ijb_set(root, "IJBC", identities=4, templates_per_identity=2, seed=0)


def test_read_meta(release):
    root, truth = release
    meta = read_ijb_meta(root, "ijbc")
    assert meta.target == "IJBC" and meta.names == truth["names"]
    assert meta.templates.tolist() == [t for _, t, _ in truth["rows"]]
    assert meta.medias.tolist() == [m for _, _, m in truth["rows"]]
    torch.testing.assert_close(meta.landmarks, truth["landmarks"], rtol=0, atol=1e-6)
    torch.testing.assert_close(meta.scores, truth["scores"].float(), rtol=0, atol=1e-6)
    assert meta.pairs.tolist() == truth["pairs"][:, :2].tolist()
    assert meta.labels.tolist() == [bool(v) for v in truth["pairs"][:, 2]]


def copy_release(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return {k: v.replace(src, dst) for k, v in meta_paths(src, "IJBC").items()}


def edit_line(path, number, new):
    with open(path) as f:
        lines = f.readlines()
    lines[number - 1] = new + "\n"
    with open(path, "w") as f:
        f.writelines(lines)


@pytest.mark.parametrize("kind, number, new, message", [
    ("face_tid_mid", 3, "3.png 107", r"face_tid_mid.txt:3: expected 3 fields"),
    ("face_tid_mid", 2, "2.png x 5", r"face_tid_mid.txt:2: invalid literal"),
    ("name_5pts_score", 4, "4.png 1 2 3", r"name_5pts_score.txt:4: expected 12 fields"),
    ("name_5pts_score", 2, "other.png 1 2 3 4 5 6 7 8 9 10 0.9", r"name_5pts_score.txt:2: crop 'other.png'"),
    ("name_5pts_score", 5, "5.png 1 2 3 4 5 6 7 8 9 nan 0.9", r"name_5pts_score.txt:5: non-finite"),
    ("name_5pts_score", 3, "3.png 50 50 50 50 50.1 50 50 50 50 50 0.9", r"name_5pts_score.txt:3: .*degenerate"),
    ("template_pair_label", 6, "100 107 2", r"template_pair_label.txt:6: label 2"),
    ("template_pair_label", 9, "100 1o7 1", r"template_pair_label.txt:9: invalid literal"),
    ("template_pair_label", 4, "100 99999 0", r"template_pair_label.txt:4: pair \(100, 99999\)"),
    ("template_pair_label", 7, "100 107", r"template_pair_label.txt:7: expected 3 fields"),
])
def test_malformed_lines_name_file_and_line(release, tmp_path, kind, number, new, message):
    root, _ = release
    paths = copy_release(root, str(tmp_path / "r"))
    edit_line(paths[kind], number, new)
    with pytest.raises(IJBFormatError, match=message):
        read_ijb_meta(str(tmp_path / "r"), "IJBC")


def test_missing_files(release, tmp_path):
    root, truth = release
    paths = copy_release(root, str(tmp_path / "r"))
    os.remove(paths["template_pair_label"])
    with pytest.raises(IJBFormatError, match="ijbc_template_pair_label.txt: missing"):
        read_ijb_meta(str(tmp_path / "r"), "IJBC")
    with pytest.raises(IJBFormatError, match="ijbb_face_tid_mid.txt: missing"):
        read_ijb_meta(root, "IJBB")
    with pytest.raises(IJBFormatError, match="no such IJB folder"):
        read_ijb_meta(str(tmp_path / "nothing"), "IJBC")
    with pytest.raises(ValueError, match="target"):
        read_ijb_meta(root, "IJBA")
    paths = copy_release(root, str(tmp_path / "s"))
    edit_line(paths["name_5pts_score"], len(truth["names"]), "")   # one crop fewer
    with pytest.raises(IJBFormatError, match="crops, but the face_tid_mid file lists"):
        read_ijb_meta(str(tmp_path / "s"), "IJBC")


class PixelNet(nn.Module):
    """Embeds a 112 x 112 crop as its 8 x 8-pooled pixels around the face centre; counts images."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.pool(x[:, :, 16:96, 16:96]).flatten(1)


def test_missing_and_unreadable_images(release, tmp_path):
    root, truth = release
    copy_release(root, str(tmp_path / "r"))
    os.remove(str(tmp_path / "r" / "loose_crop" / truth["names"][2]))
    os.remove(str(tmp_path / "r" / "loose_crop" / truth["names"][5]))
    with pytest.raises(IJBFormatError, match=r"3.png: missing, listed at .*ijbc_face_tid_mid.txt:3 \(2 of"):
        evaluate_ijb(PixelNet(), str(tmp_path / "r"), progress=False)
    with open(str(tmp_path / "r" / "loose_crop" / truth["names"][2]), "wb") as f:
        f.write(b"not an image")
    with open(str(tmp_path / "r" / "loose_crop" / truth["names"][5]), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(IJBFormatError, match=r"3.png: cannot read the image listed at .*face_tid_mid.txt:3"):
        evaluate_ijb(PixelNet(), str(tmp_path / "r"), progress=False)


# --------------------------------------------------------------------------------------------------
# end to end


def test_evaluate_ijb_end_to_end(release, capsys):
    root, truth = release
    model = PixelNet()
    res = evaluate_ijb(model, root, "IJBC", batch_size=5, progress=True)
    n = len(truth["names"])
    assert model.images == 2 * n                           # flip test: every crop twice
    assert res["name"] == "IJBC" and res["images"] == n and res["templates"] == 8
    assert res["pairs"] == 28 and res["genuine"] == 4
    assert res["images_per_s"] > 0
    assert "images/s" in capsys.readouterr().err
    # 24 impostors: only FAR 1e-1 is measurable; the aligned synthetic faces are told apart
    assert res["tar@far=1e-1"] > 0.5
    assert all(np.isnan(res[f"tar@far=1e-{k}"]) for k in range(2, 7))
    far, tar = res["roc"]
    assert far[-1] == 1.0 and tar[-1] == 1.0
    model.images = 0
    no_flip = evaluate_ijb(model, root, "IJBC", flip=False, progress=False)
    assert model.images == n
    assert 0.0 <= no_flip["tar@far=1e-1"] <= 1.0


# --------------------------------------------------------------------------------------------------
# the command line, on a tiny trained checkpoint


def tiny_trained_iresnet(root, target, steps=1):
    """iresnet18 (16-d) after a few SGD steps of a cosine classifier on the release's aligned crops,
    identities as classes."""
    from protomem.data._image import to_float
    from protomem.evaluation.ijb import AlignedCrops
    from protomem.models import build_backbone
    meta = read_ijb_meta(root, target)
    x = to_float(torch.stack([AlignedCrops(meta)[i] for i in range(len(meta.names))]))
    _, y = meta.templates.unique(return_inverse=True)
    y = y // 2                                            # 2 templates per identity
    torch.manual_seed(0)
    model = build_backbone("iresnet18", 16)
    weights = nn.Parameter(torch.randn(int(y.max()) + 1, 16) * 0.1)
    opt = torch.optim.SGD(list(model.parameters()) + [weights], lr=0.05, momentum=0.9)
    for _ in range(steps):
        logits = 16 * nn.functional.normalize(model(x)) @ nn.functional.normalize(weights).T
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_cli_ijb_dcq_checkpoint(tmp_path, capsys):
    import json

    from protomem import MomentumEncoder
    from protomem import eval as eval_cli
    from protomem.models import build_backbone
    from protomem.training.checkpoint import CHECKPOINT_FORMAT
    root = str(tmp_path / "IJBB")
    write_ijb_set(root, "IJBB", identities=2, templates_per_identity=2, seed=4, max_medias=1)
    trained = tiny_trained_iresnet(root, "IJBB")
    config = dict(backbone="iresnet18", embedding_size=16, in_dim=None, hidden=None, head="dcq",
                  data="/data/faces")
    path = str(tmp_path / "dcq.pt")
    # a DCQ run evaluates its momentum encoder: "model" holds other weights
    torch.save({"format": CHECKPOINT_FORMAT, "config": config,
                "model": build_backbone("iresnet18", 16).state_dict(),
                "ema": MomentumEncoder(trained).state_dict()}, path)
    out_json, roc = tmp_path / "r.json", tmp_path / "roc.png"
    assert eval_cli.main([path, "--ijb", root, "--ijb-target", "ijbb", "--no-ijb-detector-score",
                          "--batch-size", "8", "--json", str(out_json), "--roc", str(roc)]) == 0
    captured = capsys.readouterr()
    assert "IJBB" in captured.out and "tar@far=1e-1" in captured.out and "images/s" in captured.err
    report = json.loads(out_json.read_text())
    assert report["encoder"] == "ema"
    expected = evaluate_ijb(trained, root, "IJBB", detector_score=False, progress=False)
    for key in ("images", "templates", "pairs", "genuine", *(f"tar@far=1e-{k}" for k in range(1, 7))):
        got, want = report["results"][f"IJBB/{key}"], expected[key]
        assert (got is None and np.isnan(want)) or got == want, key
    assert report["roc"]["far"] == expected["roc"][0].tolist()
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        eval_cli.main([path, "--roc", str(roc)])
    with pytest.raises(SystemExit):
        eval_cli.main([path, "--ijb", str(tmp_path / "missing")])
    assert "no such IJB folder" in capsys.readouterr().err
