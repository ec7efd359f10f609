"""Evaluation of a trained encoder: what the trainer runs periodically and ``python -m
protomem.eval`` runs at the end.

- ``evaluate_identities``: on a ``SyntheticIdentities`` training set, TAR at fixed FARs and rank-1
  identification on new samples of *head* and *tail* training identities and on *unseen* identities
  (a held-out view), the split that shows whether rarely seen classes are learnt as well as
  frequent ones.
- ``evaluate_bin``: insightface's 10-fold verification on a ``.bin`` set (LFW, CFP-FP, AgeDB-30).
- ``embed``: a model's embeddings of a tensor of inputs, in batches, without gradient.
- ``load_checkpoint`` / ``model_from_checkpoint`` / ``dataset_from_config``: a trainer checkpoint
  (``"format": "protomem-train-v1"``) back to its encoder and its synthetic dataset.
- ``format_results``: a results dict as an aligned console table.
"""
import math
import os
import warnings

import torch
from torch import nn

from . import metrics
from .data import load_verification_bin
from .training.builders import build_dataset, build_encoder

__all__ = [
    "CHECKPOINT_FORMAT",
    "choose_eval_classes",
    "dataset_from_config",
    "embed",
    "evaluate_bin",
    "evaluate_identities",
    "format_results",
    "load_checkpoint",
    "model_from_checkpoint",
    "resolve_use_ema",
]

CHECKPOINT_FORMAT = "protomem-train-v1"


# --------------------------------------------------------------------------------------------------
# embeddings


class _Reshaped(nn.Module):
    """Presents inputs of any sample shape to ``flip_embeddings`` (which takes [N, C, H, W]) as
    [N, 1, 1, F] and gives the model its own shape back, so one batching loop with its eval-mode
    and device handling serves images and feature vectors alike."""

    def __init__(self, model, sample_shape):
        super().__init__()
        self.model, self.sample_shape = model, tuple(sample_shape)

    def forward(self, x):
        return self.model(x.reshape(x.shape[0], *self.sample_shape))


def embed(model, inputs, batch_size=1024, device=None, flip=False):
    """Embeddings of ``inputs``, computed in batches in eval mode under ``torch.no_grad()``.

    Every submodule's training flag is restored afterwards (also on error).

    Args:
        model: ``nn.Module`` mapping [B, *S] inputs to [B, E] embeddings.
        inputs: [N, *S] tensor (float32 feature vectors [N, F], images [N, 3, H, W], ...), N >= 1.
        batch_size: inputs per forward pass.
        device: where the model runs; default the device of its first parameter (CPU if none).
            The model is not moved: pass the device it lives on.
        flip: insightface's flip test, ``model(x) + model(x flipped left-right)``; images only.

    Returns:
        float32 tensor [N, E] on the CPU (not normalised).
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty tensor [N, ...], got "
                         f"{getattr(inputs, 'shape', type(inputs).__name__)}")
    if inputs.dim() == 4:
        return metrics.flip_embeddings(model, inputs, batch_size, device, flip)
    if flip:
        raise ValueError(f"flip needs images [N, C, H, W], got inputs of shape {tuple(inputs.shape)}")
    flat = inputs.reshape(inputs.shape[0], 1, 1, -1)
    return metrics.flip_embeddings(_Reshaped(model, inputs.shape[1:]), flat, batch_size, device, False)


# --------------------------------------------------------------------------------------------------
# identity evaluation on synthetic data


def choose_eval_classes(dataset, head_threshold=20, max_per_group=1000, seed=0):
    """The training identities to evaluate on, as a head group and a tail group.

    A class is *head* when it has at least ``head_threshold`` training samples, *tail* otherwise.
    The default 20 follows the long-tail literature's "few-shot" boundary; with the ``megaface2``
    preset (at least 3 samples, P(n >= 20) = (3/20)**1.76) about 3.6% of the classes are head and
    the rest tail. Up to ``max_per_group`` classes of each group are drawn uniformly without
    replacement, deterministically from ``seed``.

    Args:
        dataset: has ``class_counts``, an int64 tensor [C] of training samples per class.
        head_threshold: the smallest sample count of a head class (int >= 1).
        max_per_group: the most classes per group (int >= 0).
        seed: int seed of the draw.

    Returns:
        dict ``head`` / ``tail`` -> int64 tensor of local class ids (ascending, disjoint).
    """
    for name, value, low in (("head_threshold", head_threshold, 1), ("max_per_group", max_per_group, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    counts = torch.as_tensor(dataset.class_counts).reshape(-1)
    is_head = counts >= head_threshold
    gen = torch.Generator().manual_seed(seed)
    groups = {}
    for name, mask in (("head", is_head), ("tail", ~is_head)):
        ids = mask.nonzero()[:, 0]
        pick = torch.randperm(ids.numel(), generator=gen)[:max_per_group]
        groups[name] = ids[pick].sort().values
    return groups


def _far_key(far):
    """1e-3 -> "1e-3", 5e-4 -> "5e-4": the FAR as written in result keys."""
    mantissa, exponent = f"{far:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _embed_in_chunks(model, make, classes, n_per_class, batch_size, device):
    """Samples of ``classes`` made by ``make(chunk) -> (x, y)`` about ``batch_size`` at a time (so
    image sets are never held whole), embedded. Returns (float32 [m*n, E], int64 [m*n]) on the CPU."""
    embs, labels = [], []
    for chunk in classes.split(max(1, batch_size // n_per_class)):
        x, y = make(chunk)
        embs.append(embed(model, x, batch_size, device))
        labels.append(y.cpu())
    return torch.cat(embs), torch.cat(labels)


def _group_metrics(emb, labels, fars, max_impostor_pairs, seed):
    """TAR@FAR and rank-1 of one labelled embedding set: dict of floats (NaN where unmeasurable)."""
    gen = torch.Generator().manual_seed(seed)
    scores, genuine = metrics.pair_scores(emb, labels, max_impostor_pairs=max_impostor_pairs,
                                          generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # too few impostors: NaN, as documented
        tars = metrics.tar_at_far(scores, genuine, fars)
    out = {f"tar@far={_far_key(far)}": tars[far][0] for far in fars}
    gallery, probes = metrics.identification_split(emb, labels)
    out["rank1"] = metrics.rank1_identification(emb[gallery], labels[gallery], emb[probes],
                                                labels[probes])
    return out


def _nan_metrics(fars):
    return {**{f"tar@far={_far_key(far)}": math.nan for far in fars}, "rank1": math.nan}


def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    return next((t.device for t in model.parameters()), torch.device("cpu"))


def _check_identity_args(groups, n_per_class, heldout_classes):
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 2:
        raise ValueError(f"n_per_class must be an int >= 2 (genuine pairs need two samples), "
                         f"got {n_per_class!r}")
    if isinstance(heldout_classes, bool) or not isinstance(heldout_classes, int) or heldout_classes < 0:
        raise ValueError(f"heldout_classes must be an int >= 0, got {heldout_classes!r}")
    if "unseen" in groups:
        raise ValueError("groups may not be called 'unseen': that group is the held-out identities "
                         "(set its size with heldout_classes)")


def evaluate_identities(model, dataset, groups=None, n_per_class=5, heldout_classes=1000,
                        fars=(1e-3, 1e-4), device=None, batch_size=1024, seed=0,
                        max_impostor_pairs=20_000_000):
    """Verification (TAR at fixed FARs) and rank-1 identification on new samples of training
    identities, grouped, and on identities never trained on.

    For each group of training classes, ``n_per_class`` samples per class that training never
    drew (``dataset.fresh_samples``) are embedded; for the group ``unseen``, the samples of
    ``dataset.heldout(heldout_classes, n_per_class)``. On each set:

    - ``<group>/tar@far=<far>``: TAR at that FAR over every genuine pair and every impostor pair
      (``metrics.pair_scores``, ``metrics.tar_at_far``; exact thresholds). NaN when the set has
      fewer than ``1/far`` impostor pairs (FAR 1e-4 needs 10k: at 5 samples per identity, 29
      identities give 10,150 and 1000 give ~12.5M) or no genuine pair.
    - ``<group>/rank1``: closed-set rank-1 accuracy, the first sample of each identity in the
      gallery and the other ``n_per_class - 1`` as probes.
    - ``<group>/identities``: how many identities the group holds (an int); a group without any has
      NaN metrics.

    With more than ``max_impostor_pairs`` impostor pairs a uniform sample of that many is scored
    (seeded by ``seed``). Scoring all of them block-wise is the faster path while they fit in
    memory (about 0.7 s for 12.5M on 2 CPU cores), so the default only samples beyond 20M (80 MB).

    Args:
        model: encoder ``nn.Module`` mapping the dataset's samples [B, *sample_shape] to [B, E].
        dataset: a ``SyntheticIdentities`` (needs ``fresh_samples``, ``heldout``, ``class_counts``).
        groups: dict name -> int64 tensor of training class ids; default
            ``choose_eval_classes(dataset, seed=seed)`` (head / tail, up to 1000 each).
        n_per_class: samples per identity (>= 2).
        heldout_classes: identities of the unseen group; 0 leaves the group out.
        fars: the FARs of TAR, each in (0, 1].
        device: where the model runs (it is not moved there) and samples are made; default the
            model's device.
        batch_size: samples per forward pass.
        seed: seed of the default groups and of the impostor sample.
        max_impostor_pairs: the most impostor pairs scored per group.

    Returns:
        flat dict ``"<group>/<metric>"`` -> float (identities: int), groups in the order given
        followed by ``unseen``.
    """
    groups = choose_eval_classes(dataset, seed=seed) if groups is None else dict(groups)
    _check_identity_args(groups, n_per_class, heldout_classes)
    fars = tuple(fars)
    device = _model_device(model, device)
    makers = {name: (torch.as_tensor(classes, dtype=torch.int64).reshape(-1),
                     lambda c: dataset.fresh_samples(c, n_per_class, device))
              for name, classes in groups.items()}
    if heldout_classes:
        view = dataset.heldout(heldout_classes, n_per_class)
        # the view holds n_per_class samples of each class, class-major
        makers["unseen"] = (torch.arange(heldout_classes), lambda c: view.get_batch(
            (c[:, None] * n_per_class + torch.arange(n_per_class)).reshape(-1), device))
    results = {}
    for name, (classes, make) in makers.items():
        if classes.numel():
            emb, labels = _embed_in_chunks(model, make, classes, n_per_class, batch_size, device)
            values = _group_metrics(emb, labels, fars, max_impostor_pairs, seed)
        else:
            values = _nan_metrics(fars)
        results.update({f"{name}/{key}": value for key, value in values.items()})
        results[f"{name}/identities"] = int(classes.numel())
    return results


# --------------------------------------------------------------------------------------------------
# insightface .bin verification sets


def evaluate_bin(model, path, batch_size=256, device=None, flip=True, nfolds=10):
    """insightface's verification protocol on a ``.bin`` set.

    The images (decoded to float32 [2P, 3, 112, 112] in [-1, 1]) are embedded with the flip test
    (``metrics.flip_embeddings``); pair i is images 2i and 2i+1; ``metrics.verification_accuracy``
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
    emb = metrics.flip_embeddings(model, images, batch_size, device, flip)
    ver = metrics.verification_accuracy(emb[0::2], emb[1::2], issame, nfolds=nfolds, far_target=1e-3)
    return {"name": os.path.splitext(os.path.basename(path))[0], "pairs": int(issame.numel()),
            "accuracy": ver["accuracy"], "accuracy_std": ver["accuracy_std"],
            "threshold": ver["threshold"], "val@far=1e-3": ver["val"]}


# --------------------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path):
    """Reads a trainer checkpoint and checks its format.

    Args:
        path: a file written by the trainer.

    Returns:
        dict with at least ``format`` (== ``CHECKPOINT_FORMAT``), ``config`` (flat dict of the
        training options) and ``model`` (the encoder's state_dict); maybe ``ema``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    _check_checkpoint(ckpt, path)
    return ckpt


def _check_checkpoint(ckpt, where="checkpoint"):
    if not isinstance(ckpt, dict):
        raise ValueError(f"{where}: expected a dict written by the protomem trainer, got "
                         f"{type(ckpt).__name__}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: format is {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r} "
                         f"(a checkpoint written by python -m protomem.train)")
    missing = [key for key in ("config", "model") if key not in ckpt]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")


def _encoder_state(ckpt, use_ema):
    if not use_ema:
        return ckpt["model"]
    if ckpt.get("ema") is None:
        raise ValueError("use_ema=True but the checkpoint holds no 'ema' (momentum encoder) state")
    prefix = "encoder."
    state = ckpt["ema"]
    if not all(key.startswith(prefix) for key in state):
        raise ValueError("the checkpoint's 'ema' state is not a MomentumEncoder state_dict "
                         "(keys 'encoder.<...>')")
    return {key[len(prefix):]: value for key, value in state.items()}


def resolve_use_ema(ckpt, use_ema=None):
    """Whether to evaluate a checkpoint's momentum (EMA) encoder: ``use_ema`` when given, else
    True when the checkpoint's ``"ema"`` is there and not None and its head was "dcq" (DCQ
    evaluates its momentum encoder)."""
    if use_ema is not None:
        return bool(use_ema)
    return ckpt.get("ema") is not None and ckpt["config"].get("head") == "dcq"


def model_from_checkpoint(ckpt, use_ema=None):
    """The trained encoder of a checkpoint, rebuilt from its config, in eval mode on the CPU.

    Args:
        ckpt: a checkpoint dict (see ``load_checkpoint``) or a path to one.
        use_ema: take the momentum (EMA) encoder's weights (``ckpt["ema"]``) instead of
            ``ckpt["model"]``; None: ``resolve_use_ema`` decides (yes for a DCQ run that saved them).

    Returns:
        ``nn.Module`` from ``build_backbone(backbone, embedding_size, in_dim=in_dim)`` (and
        ``hidden`` for the MLP), with float32 weights.
    """
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = load_checkpoint(ckpt)
    _check_checkpoint(ckpt)
    cfg = ckpt["config"]
    model = build_encoder({"hidden": None, "in_dim": None, **cfg})
    try:
        model.load_state_dict(_encoder_state(ckpt, resolve_use_ema(ckpt, use_ema)))
    except RuntimeError as err:
        raise ValueError(f"the checkpoint's weights do not fit backbone {cfg['backbone']!r} "
                         f"(embedding_size={cfg['embedding_size']}): {err}") from err
    return model.eval()


def dataset_from_config(cfg):
    """The synthetic training set a run used, rebuilt from its config (same seed: same samples).

    Args:
        cfg: the checkpoint's config: ``data == "synthetic"``, ``num_classes``, ``feature_dim``,
            ``samples_per_class``, ``image_mode``, ``data_seed`` and ``noise`` (None: the default).

    Returns:
        ``SyntheticIdentities``.
    """
    if cfg.get("data") != "synthetic":
        raise ValueError(f"only synthetic training data can be rebuilt for evaluation; this run used "
                         f"data={cfg.get('data')!r} (evaluate on .bin verification sets instead)")
    return build_dataset({"noise": None, **cfg})


# --------------------------------------------------------------------------------------------------
# console


def _cell(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def format_results(results):
    """A results dict as an aligned table: a row per group, a column per metric.

    Args:
        results: flat dict ``"<group>/<metric>" -> value`` (``evaluate_identities``); keys without
            a "/" form one row, named by ``results["name"]`` when present (``evaluate_bin``).

    Returns:
        str: a header line and one line per row (no trailing newline); floats with 4 decimals.
    """
    rows, columns = {}, []
    for key, value in results.items():
        group, _, metric = key.rpartition("/")
        if not group and metric == "name":
            continue
        group = group or str(results.get("name", "-"))
        rows.setdefault(group, {})[metric] = value
        if metric not in columns:
            columns.append(metric)
    table = [[""] + columns] + [[group] + [_cell(vals[c]) if c in vals else "" for c in columns]
                                for group, vals in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in table)
