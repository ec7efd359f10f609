"""protomem.evaluation and the protomem.eval CLI: identity evaluation on synthetic data (a trained
encoder far above chance, a noise encoder at chance), .bin verification, checkpoints, the CLI."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protomem import MomentumEncoder
from protomem import eval as eval_cli
from protomem.data import SyntheticIdentities, write_verification_bin
from protomem.evaluation import (
    choose_eval_classes,
    embed,
    evaluate_bin,
    evaluate_identities,
    format_results,
)
from protomem.models import build_backbone
from protomem.training.checkpoint import CHECKPOINT_FORMAT, dataset_from_config, model_from_checkpoint

# A small long-tailed run: megaface2 counts (3 to ~30 samples), low noise so that a few hundred
# steps learn it. Head at 10 samples gives ~28 head and ~172 tail classes.
CONFIG = dict(backbone="mlp", embedding_size=32, in_dim=32, hidden="128", head="pm",
              data="synthetic", num_classes=200, samples_per_class="megaface2", feature_dim=32,
              image_mode=False, noise=0.3, data_seed=3)
HEAD_THRESHOLD = 10
HELDOUT = 100
FARS = (1e-3, 1e-4)
METRICS = ("tar@far=1e-3", "tar@far=1e-4", "rank1", "identities")


def untrained_encoder():
    torch.manual_seed(0)
    return build_backbone("mlp", CONFIG["embedding_size"], in_dim=CONFIG["in_dim"], hidden=(128,))


def train_cosine_softmax(ds, steps=300):
    """An encoder trained with a normalised-softmax classifier (s=16) on every sample of ``ds``."""
    x, y = ds.get_batch(torch.arange(len(ds)))
    enc = untrained_encoder()
    weights = nn.Parameter(torch.randn(ds.num_classes, CONFIG["embedding_size"]) * 0.01)
    opt = torch.optim.Adam(list(enc.parameters()) + [weights], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(ds), (256,), generator=gen)
        logits = 16 * F.normalize(enc(x[idx])) @ F.normalize(weights).T
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc.eval()


class NoiseEncoder(nn.Module):
    """Embeddings independent of the input: every score is chance."""

    def forward(self, x):
        return torch.randn(x.shape[0], CONFIG["embedding_size"])


@pytest.fixture(scope="module")
def dataset():
    return dataset_from_config(CONFIG)


@pytest.fixture(scope="module")
def trained(dataset):
    return train_cosine_softmax(dataset)


@pytest.fixture(scope="module")
def groups(dataset):
    return choose_eval_classes(dataset, head_threshold=HEAD_THRESHOLD)


def impostor_pairs(identities, n_per_class):
    n = identities * n_per_class
    return n * (n - 1) // 2 - identities * n_per_class * (n_per_class - 1) // 2


# --------------------------------------------------------------------------------------------------
# embed


def test_embed_features_matches_model_and_restores_mode():
    model = untrained_encoder()
    x = torch.randn(50, CONFIG["in_dim"])
    out = embed(model, x, batch_size=16)
    assert out.dtype == torch.float32 and out.shape == (50, CONFIG["embedding_size"])
    assert model.training  # the training flag came back
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(out, expected)


def test_embed_images_flip_and_errors():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 6, 8))
    images = torch.randn(7, 3, 4, 6)
    with torch.no_grad():
        expected = model(images) + model(images.flip(3))
    torch.testing.assert_close(embed(model, images, batch_size=3, flip=True), expected)
    with pytest.raises(ValueError, match="flip needs images"):
        embed(model, torch.randn(4, 10), flip=True)
    with pytest.raises(ValueError, match="non-empty"):
        embed(model, torch.randn(0, 10))


# --------------------------------------------------------------------------------------------------
# choose_eval_classes


def test_choose_eval_classes(dataset):
    counts = dataset.class_counts
    g = choose_eval_classes(dataset, head_threshold=HEAD_THRESHOLD)
    assert set(g) == {"head", "tail"}
    assert bool((counts[g["head"]] >= HEAD_THRESHOLD).all())
    assert bool((counts[g["tail"]] < HEAD_THRESHOLD).all())
    # uncapped: every class is in exactly one group
    assert g["head"].numel() + g["tail"].numel() == dataset.num_classes
    assert torch.equal(torch.cat([g["head"], g["tail"]]).sort().values, torch.arange(dataset.num_classes))
    capped = choose_eval_classes(dataset, HEAD_THRESHOLD, max_per_group=20, seed=5)
    assert capped["head"].numel() == 20 and capped["tail"].numel() == 20
    assert bool((capped["tail"].diff() > 0).all())  # ascending, distinct
    again = choose_eval_classes(dataset, HEAD_THRESHOLD, max_per_group=20, seed=5)
    assert all(torch.equal(capped[k], again[k]) for k in capped)
    other = choose_eval_classes(dataset, HEAD_THRESHOLD, max_per_group=20, seed=6)
    assert not torch.equal(capped["tail"], other["tail"])
    with pytest.raises(ValueError, match="head_threshold"):
        choose_eval_classes(dataset, head_threshold=0)


# --------------------------------------------------------------------------------------------------
# evaluate_identities


def test_trained_encoder_far_above_chance(dataset, trained, groups):
    good = evaluate_identities(trained, dataset, groups, heldout_classes=HELDOUT)
    raw = evaluate_identities(untrained_encoder(), dataset, groups, heldout_classes=HELDOUT)
    torch.manual_seed(0)
    noise = evaluate_identities(NoiseEncoder(), dataset, groups, heldout_classes=HELDOUT)
    for group in ("tail", "unseen"):  # enough impostor pairs for both FARs
        # chance: TAR at FAR f is about f, rank-1 about 1 / identities
        assert noise[f"{group}/tar@far=1e-3"] < 0.01
        assert noise[f"{group}/rank1"] < 0.05
        assert good[f"{group}/tar@far=1e-3"] > 0.4
        assert good[f"{group}/tar@far=1e-4"] > 0.2
        assert good[f"{group}/rank1"] > 0.6
        assert good[f"{group}/tar@far=1e-3"] > raw[f"{group}/tar@far=1e-3"] + 0.2
        assert good[f"{group}/rank1"] > raw[f"{group}/rank1"] + 0.2


def test_keys_ranges_and_documented_nans(dataset, trained, groups):
    n_per_class = 5
    res = evaluate_identities(trained, dataset, groups, n_per_class=n_per_class,
                              heldout_classes=HELDOUT, fars=FARS)
    assert list(res) == [f"{g}/{m}" for g in ("head", "tail", "unseen") for m in METRICS]
    assert res["head/identities"] == groups["head"].numel()
    assert res["tail/identities"] == groups["tail"].numel()
    assert res["unseen/identities"] == HELDOUT
    for group in ("head", "tail", "unseen"):
        pairs = impostor_pairs(res[f"{group}/identities"], n_per_class)
        for far in FARS:
            tar = res[f"{group}/tar@far={far:.0e}".replace("e-0", "e-")]
            # NaN exactly when fewer than 1/far impostor pairs exist
            assert math.isnan(tar) == (far * pairs < 1), (group, far, pairs)
            assert math.isnan(tar) or 0.0 <= tar <= 1.0
        assert 0.0 <= res[f"{group}/rank1"] <= 1.0
    # with these sizes the head group has fewer than 10k impostors and the others more
    assert math.isnan(res["head/tar@far=1e-4"]) and not math.isnan(res["tail/tar@far=1e-4"])


def test_deterministic_empty_group_and_no_unseen(dataset, trained):
    groups = {"few": torch.tensor([3, 1, 4]), "none": torch.tensor([], dtype=torch.int64)}
    a = evaluate_identities(trained, dataset, groups, n_per_class=3, heldout_classes=0)
    b = evaluate_identities(trained, dataset, groups, n_per_class=3, heldout_classes=0)
    assert a.keys() == b.keys() and not any(k.startswith("unseen/") for k in a)
    assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    assert a["none/identities"] == 0 and math.isnan(a["none/rank1"])
    assert math.isnan(a["none/tar@far=1e-3"])
    assert a["few/identities"] == 3 and 0.0 <= a["few/rank1"] <= 1.0


def test_sampled_impostors(dataset, trained, groups):
    full = evaluate_identities(trained, dataset, groups, heldout_classes=HELDOUT)
    sampled = evaluate_identities(trained, dataset, groups, heldout_classes=HELDOUT,
                                  max_impostor_pairs=20_000)
    assert sampled.keys() == full.keys()
    assert sampled["unseen/rank1"] == full["unseen/rank1"]  # identification does not sample
    # 20k sampled impostors measure FAR 1e-3 (20 false accepts allowed) as a fraction
    assert 0.0 <= sampled["unseen/tar@far=1e-3"] <= 1.0


def test_bad_identity_arguments(dataset, trained, groups):
    with pytest.raises(ValueError, match="n_per_class"):
        evaluate_identities(trained, dataset, groups, n_per_class=1)
    with pytest.raises(ValueError, match="unseen"):
        evaluate_identities(trained, dataset, {"unseen": torch.tensor([0])})
    with pytest.raises(ValueError, match="heldout_classes"):
        evaluate_identities(trained, dataset, groups, heldout_classes=-1)


# --------------------------------------------------------------------------------------------------
# evaluate_bin


class CountingNet(nn.Module):
    """Average-pools 112x112 images to 14x14 and flattens them; counts the images it embeds."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.images, self.largest_batch = 0, 0

    def forward(self, x):
        self.images += x.shape[0]
        self.largest_batch = max(self.largest_batch, x.shape[0])
        return self.pool(x).flatten(1)


def write_synthetic_bin(path, pairs=20, seed=0):
    """``pairs`` pairs of synthetic face-like images, same-identity and different alternating."""
    ds = SyntheticIdentities(2 * pairs, mode="image", samples_per_class=2, noise=0.3, seed=seed)
    a = torch.arange(pairs)
    b_class = torch.where(a % 2 == 0, a, a + pairs)  # even pairs: the same identity
    b_sample = torch.where(a % 2 == 0, 1, 0)
    first = ds.sample(a, torch.zeros_like(a))
    second = ds.sample(b_class, b_sample)
    images = torch.stack([first, second], 1).flatten(0, 1)  # pair i: images 2i, 2i+1
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    write_verification_bin(path, uint8.numpy(), (a % 2 == 0).tolist(), format="png")
    return pairs


def test_evaluate_bin(tmp_path):
    pytest.importorskip("PIL")
    path = tmp_path / "synth_lfw.bin"
    pairs = write_synthetic_bin(path)
    model = CountingNet()
    res = evaluate_bin(model, str(path), batch_size=16)
    assert res["name"] == "synth_lfw" and res["pairs"] == pairs
    assert model.images == 2 * 2 * pairs  # the flip test embeds every image twice
    assert 0.0 <= res["accuracy"] <= 1.0 and res["accuracy_std"] >= 0.0
    assert 0.0 <= res["threshold"] < 4.0
    # 20 pairs: train folds hold < 1000 impostors, so VAL at FAR 1e-3 is NaN (documented)
    assert math.isnan(res["val@far=1e-3"])
    # same-identity images share their pattern: pixel cosines beat a coin flip
    assert res["accuracy"] > 0.5
    model.images = 0
    no_flip = evaluate_bin(model, str(path), flip=False, nfolds=5)
    assert model.images == 2 * pairs
    assert 0.0 <= no_flip["accuracy"] <= 1.0
    assert "synth_lfw" in format_results(res)
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate_bin(model, str(tmp_path / "missing.bin"))


def test_identities_on_images_in_chunks():
    ds = SyntheticIdentities(12, mode="image", samples_per_class=4, noise=0.3, seed=1)
    model = CountingNet()
    res = evaluate_identities(model, ds, {"all": torch.arange(12)}, n_per_class=3,
                              heldout_classes=6, batch_size=8)
    assert model.images == (12 + 6) * 3  # every image embedded once, no flip
    assert model.largest_batch <= 8  # made and embedded a chunk at a time
    assert res["all/identities"] == 12 and res["unseen/identities"] == 6
    assert 0.0 <= res["all/rank1"] <= 1.0 and 0.0 <= res["unseen/rank1"] <= 1.0


# --------------------------------------------------------------------------------------------------
# format_results


def test_format_results_table():
    res = {"head/tar@far=1e-3": 0.5, "head/rank1": math.nan, "head/identities": 12,
           "tail/tar@far=1e-3": 0.25, "tail/identities": 3}
    lines = format_results(res).split("\n")
    assert lines[0].split() == ["tar@far=1e-3", "rank1", "identities"]
    assert lines[1].split() == ["head", "0.5000", "nan", "12"]
    assert lines[2].split() == ["tail", "0.2500", "3"]  # a missing cell is blank
    # right-aligned columns: every value of a column ends where its header does
    end = lines[0].index("tar@far=1e-3") + len("tar@far=1e-3")
    assert lines[1][:end].endswith("0.5000") and lines[2][:end].endswith("0.2500")


# --------------------------------------------------------------------------------------------------
# checkpoints and the CLI


def save_checkpoint(path, model_state, config=CONFIG, **extra):
    torch.save({"format": CHECKPOINT_FORMAT, "config": dict(config), "model": model_state, **extra},
               path)
    return str(path)


def same_results(a, b):
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_model_from_checkpoint(tmp_path, trained):
    # the trainer saves "ema": None when it has no momentum encoder: the encoder is evaluated
    path = save_checkpoint(tmp_path / "c.pt", trained.state_dict(), dict(CONFIG, head="dcq"), ema=None)
    model = model_from_checkpoint(path)
    assert not model.training
    x = torch.randn(9, CONFIG["in_dim"])
    torch.testing.assert_close(embed(model, x), embed(trained, x), rtol=0, atol=0)
    bad = dict(CONFIG, hidden="64")
    with pytest.raises(ValueError, match="do not fit"):
        model_from_checkpoint(torch.load(save_checkpoint(tmp_path / "d.pt", trained.state_dict(), bad),
                                         weights_only=False))


CLI_ARGS = ["--heldout-classes", "50", "--n-per-class", "4", "--head-threshold", str(HEAD_THRESHOLD)]


def cli_expected(model, dataset):
    groups = choose_eval_classes(dataset, HEAD_THRESHOLD, 1000, 0)
    return evaluate_identities(model, dataset, groups, n_per_class=4, heldout_classes=50)


def test_cli_ema_default_for_dcq(tmp_path, capsys, dataset, trained):
    untrained = untrained_encoder().eval()
    ema = MomentumEncoder(trained)
    path = save_checkpoint(tmp_path / "dcq.pt", untrained.state_dict(), dict(CONFIG, head="dcq"),
                           ema=ema.state_dict())
    out_json = tmp_path / "r.json"
    assert eval_cli.main([path, *CLI_ARGS, "--json", str(out_json), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "ema encoder" in printed and "unseen" in printed and "tar@far=1e-4" in printed
    report = json.loads(out_json.read_text())
    assert report["encoder"] == "ema" and report["checkpoint"] == path
    results = {k: math.nan if v is None else v for k, v in report["results"].items()}
    assert same_results(results, cli_expected(trained, dataset))

    eval_cli.main([path, *CLI_ARGS, "--no-use-ema", "--json", str(out_json)])
    report = json.loads(out_json.read_text())
    results = {k: math.nan if v is None else v for k, v in report["results"].items()}
    assert report["encoder"] == "model" and same_results(results, cli_expected(untrained, dataset))


def test_cli_subprocess_pm(tmp_path, dataset, trained):
    path = save_checkpoint(tmp_path / "pm.pt", trained.state_dict(),
                           ema=MomentumEncoder(untrained_encoder()).state_dict())
    out_json = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "protomem.eval", path, *CLI_ARGS, "--json",
                           str(out_json)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out_json.read_text())
    assert report["encoder"] == "model"  # a pm run evaluates its encoder even with an ema saved
    results = {k: math.nan if v is None else v for k, v in report["results"].items()}
    assert same_results(results, cli_expected(trained, dataset))
    for line in ("head", "tail", "unseen"):
        assert line in proc.stdout


def test_cli_bin_with_image_backbone(tmp_path, capsys):
    pytest.importorskip("PIL")
    bin_path = tmp_path / "tiny.bin"
    pairs = write_synthetic_bin(bin_path, pairs=10)
    config = dict(CONFIG, backbone="iresnet18", embedding_size=16, in_dim=None, data="/data/faces")
    torch.manual_seed(0)
    model = build_backbone("iresnet18", 16)
    path = save_checkpoint(tmp_path / "img.pt", model.state_dict(), config)
    out_json = tmp_path / "r.json"
    assert eval_cli.main([path, "--bin", str(bin_path), "--no-flip", "--batch-size", "20",
                          "--json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())["results"]
    assert set(results) == {f"tiny/{k}" for k in ("pairs", "accuracy", "accuracy_std", "threshold",
                                                  "val@far=1e-3")}
    assert results["tiny/pairs"] == pairs and 0.0 <= results["tiny/accuracy"] <= 1.0
    assert results["tiny/val@far=1e-3"] is None  # NaN in JSON is null
    assert "tiny" in capsys.readouterr().out


@pytest.mark.parametrize("change, argv_extra, message", [
    (None, [], "not found"),
    ({"format": "something-else"}, [], "format"),
    ({"config": dict(CONFIG, backbone="resnet9000")}, [], "unknown backbone 'resnet9000'"),
    ({}, ["--use-ema"], "no 'ema'"),
    ({"ema": None, "config": dict(CONFIG, head="dcq")}, ["--use-ema"], "no 'ema'"),
    ({"config": dict(CONFIG, data="/data/faces")}, [], "pass --bin"),
    ({}, ["--bin", "/nonexistent/lfw.bin"], "not found"),
])
def test_cli_errors(tmp_path, capsys, trained, change, argv_extra, message):
    path = str(tmp_path / "c.pt")
    if change is not None:
        ckpt = {"format": CHECKPOINT_FORMAT, "config": dict(CONFIG), "model": trained.state_dict()}
        ckpt.update(change)
        torch.save(ckpt, path)
    with pytest.raises(SystemExit) as exc:
        eval_cli.main([path, *argv_extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder": {}}, path)
    with pytest.raises(ValueError, match="protomem-train-v1"):
        model_from_checkpoint(str(path))
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a dict"):
        model_from_checkpoint(str(path))


def test_library_does_not_import_the_trainer():
    code = ("import sys, protomem, protomem.evaluation, protomem.metrics; "
            "print(sorted(m for m in sys.modules if m.startswith('protomem.train')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_identity_metrics_equal_a_brute_force_computation(dataset, trained):
    """TAR@FAR and rank-1 of evaluate_identities against the protocol written out here: cosine of
    every pair, the (floor(far * n) + 1)-th largest impostor score as threshold (accept strictly
    above), and rank-1 with each identity's first sample as its gallery entry."""
    classes = torch.arange(60)
    n = 4
    res = evaluate_identities(trained, dataset, {"g": classes}, n_per_class=n, heldout_classes=0,
                              fars=(1e-2, 1e-3))
    x, y = dataset.fresh_samples(classes, n, "cpu")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(trained.eval()(x).float(), dim=1)
    cos = emb @ emb.T
    i, j = torch.triu_indices(len(y), len(y), offset=1)
    scores, same = cos[i, j], y[i] == y[j]
    imp = scores[~same].sort(descending=True).values
    for far in (1e-2, 1e-3):
        threshold = imp[int(far * len(imp))]
        want = (scores[same] > threshold).double().mean().item()
        assert abs(res[f"g/tar@far={far:.0e}".replace("e-0", "e-")] - want) < 1e-12, far
    first = torch.zeros(len(y), dtype=torch.bool)
    for c in classes:
        first[(y == c).nonzero()[0]] = True
    nearest = (emb[~first] @ emb[first].T).argmax(dim=1)
    want_rank1 = (y[first][nearest] == y[~first]).double().mean().item()
    assert abs(res["g/rank1"] - want_rank1) < 1e-12
    assert 0.1 < want_rank1 < 1.0  # a value that moves, not a constant
