"""Resuming a run: its options come from the checkpoint; the user may override only options that
keep the resume exact (not the data, the model's or head's shape, the batches or the optimiser)."""
import os

import torch

from .config import OPTIONS, ConfigError

# Options a resumed run cannot change: its data, encoder, head, batches, optimiser kind and AMP.
FIXED_ON_RESUME = (
    "data", "num_classes", "samples_per_class", "feature_dim", "image_mode", "noise", "data_seed",
    "backbone", "embedding_size", "hidden", "head", "margin", "scale", "m1", "m2", "m3",
    "memory_size", "memory_fraction", "policy", "exemplars", "quality", "memory_dtype", "precision",
    "queue_size", "queue_fraction", "sample_rate", "identities_per_batch", "samples_per_identity",
    "accum_steps", "seed", "optimizer", "amp", "lookalikes", "lookalike_spread", "mining", "mining_k",
)
# Options that say where and how to resume, not what the run is: never reported as changes.
_NOT_RUN_OPTIONS = ("resume", "out")


def checkpoint_path(cfg):
    """The checkpoint ``cfg['resume']`` names ('auto': OUT/checkpoint.pt), or None when 'auto'
    finds none (a fresh start). A named checkpoint that is missing is a ConfigError."""
    path = cfg["resume"]
    if path == "auto":
        path = os.path.join(cfg["out"], "checkpoint.pt")
        return path if os.path.exists(path) else None
    if not os.path.exists(path):
        raise ConfigError(f"argument --resume: checkpoint {path!r} not found")
    return path


def stored_config(cfg):
    """The option dict saved in the checkpoint ``cfg`` resumes from (None: nothing to resume).
    Memory-maps the file, so a large checkpoint is not read twice."""
    path = checkpoint_path(cfg)
    if path is None:
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise ConfigError(f"argument --resume: cannot read {path!r} as a checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise ConfigError(f"argument --resume: {path!r} is not a protomem training checkpoint")
    return {k: v for k, v in ckpt["config"].items() if k in OPTIONS or k == "val_bins"}


def _show(v):
    return repr(v) if isinstance(v, str) else str(v)


def differences(stored, cfg, names):
    """'name: old -> new' for each of ``names`` whose value in ``cfg`` differs from ``stored``."""
    return [f"{n}: {_show(stored[n])} -> {_show(cfg[n])}" for n in names
            if n in stored and n in cfg and stored[n] != cfg[n]]


def merge(stored, given):
    """The options of a resumed run: the checkpoint's, with the ``given`` ones (the user's)
    on top. Sets ``resume_changes`` to the list of changes; a change to an option in
    ``FIXED_ON_RESUME`` is a ConfigError naming every such option."""
    cfg = {name: default for name, (default, _) in OPTIONS.items()}
    cfg.update(stored)
    cfg.update(given)
    refused = differences(stored, cfg, [n for n in FIXED_ON_RESUME if n in given])
    if refused:
        raise ConfigError("argument --resume: a resumed run keeps its data, model, head, batches and optimiser; "
                          f"these options differ from the checkpoint's: {'; '.join(refused)}. Drop them, or "
                          "start a new run in another --out")
    cfg["resume_changes"] = differences(stored, cfg, [n for n in given if n not in _NOT_RUN_OPTIONS])
    return cfg


def check_compatible(stored, cfg, path):
    """Raises ConfigError when ``cfg`` (built without ``merge``) differs from the checkpoint's
    options in ``FIXED_ON_RESUME``."""
    refused = differences(stored, cfg, FIXED_ON_RESUME)
    if refused:
        raise ConfigError(f"cannot resume {path}: options differ from the checkpoint's: {'; '.join(refused)}")
