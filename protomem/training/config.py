"""The training options: defaults, the command line, and config files (JSON or TOML)."""
import argparse
import json
import os

HEADS = ("pm", "dcq", "pfc", "full")
MARGINS = ("default", "cosface", "arcface", "combined")

# name -> (default, help). Every option is also a config-file key; the command line wins.
OPTIONS = {
    # data
    "data": ("synthetic", "'synthetic', or a folder with train.rec/train.idx, a .rec file, or an "
                          "image folder (one sub-folder per identity)"),
    "num_classes": (20000, "synthetic: number of identities"),
    "samples_per_class": ("megaface2", "synthetic: an int, 'zipf' or 'megaface2' (88%% of classes < 10)"),
    "feature_dim": (128, "synthetic: feature size (feature mode)"),
    "image_mode": (False, "synthetic: 3x112x112 images instead of features"),
    "noise": (None, "synthetic: per-sample noise (default: the dataset's)"),
    "data_seed": (0, "synthetic: dataset seed"),
    "num_workers": (0, "DataLoader workers for image datasets"),
    # encoder
    "backbone": ("mlp", "mlp, iresnet18, iresnet34, iresnet50, iresnet100"),
    "embedding_size": (512, "embedding size"),
    "hidden": ("512", "mlp: hidden layer sizes, comma separated"),
    # head
    "head": ("pm", "pm (Prototype Memory), dcq (Dynamic Class Queue), pfc (Partial FC), full"),
    "margin": ("default", "default (the head's), cosface, arcface, combined"),
    "scale": (64.0, "margin: logit scale s"),
    "m1": (1.0, "combined margin: multiplicative angular margin"),
    "m2": (0.5, "arcface / combined: additive angular margin (radians)"),
    "m3": (0.4, "cosface / combined: additive cosine margin"),
    "memory_size": (None, "pm: slots (default: memory_fraction * classes)"),
    "memory_fraction": (0.1, "pm: memory size as a fraction of the classes"),
    "pm_momentum": (0.0, "pm: prototype refresh momentum"),
    "policy": ("lru", "pm: eviction policy, lru or fifo"),
    "exemplars": ("all", "pm: all or leave_one_out"),
    "detach_prototypes": (True, "pm: prototypes are constants of the loss"),
    "quality": (None, "pm: None or norm (weight exemplars by embedding norm)"),
    "memory_dtype": ("float32", "pm/dcq: storage dtype of the memory or queue"),
    "queue_size": (None, "dcq: entries (default: queue_fraction * classes)"),
    "queue_fraction": (0.1, "dcq: queue size as a fraction of the classes"),
    "ema_momentum": (0.999, "dcq: momentum encoder EMA"),
    "sample_rate": (0.1, "pfc: sampled fraction of the classes"),
    # batches
    "identities_per_batch": (128, "G: identities per (global) batch"),
    "samples_per_identity": (2, "k: samples per identity (pm needs k >= 2; dcq adds a key view)"),
    # optimisation
    "optimizer": ("sgd", "sgd or adamw"),
    "lr": (0.1, "peak learning rate"),
    "momentum": (0.9, "sgd momentum"),
    "weight_decay": (5e-4, "weight decay"),
    "epochs": (1.0, "epochs (fractions allowed); ignored when max_steps is set"),
    "max_steps": (None, "optimiser steps"),
    "warmup_steps": (0, "linear warmup steps"),
    "schedule": ("poly", "poly (power 2, as insightface), cosine or constant"),
    "amp": ("none", "none, bf16 or fp16 (fp16 uses a GradScaler)"),
    "clip_grad": (None, "clip the encoder's gradient norm to this value"),
    "accum_steps": (1, "micro-batches per optimiser step"),
    "seed": (0, "seed of the model initialisation and the sampler"),
    "device": ("auto", "auto, cpu, cuda"),
    # output
    "out": ("runs/train", "output folder: log.csv, eval.csv, checkpoints"),
    "log_every": (20, "steps between log rows"),
    "eval_every": (0, "steps between evaluations (0: only at the end)"),
    "eval_classes": (1000, "evaluation identities per group (head, tail, unseen)"),
    "val_bins": ("", "insightface .bin verification sets to evaluate on, comma separated"),
    "save_every": (0, "steps between checkpoints (0: only at the end)"),
    "resume": (None, "checkpoint to resume from ('auto': OUT/checkpoint.pt if it exists)"),
    "progress": (True, "show a progress bar"),
    "track_staleness": (False, "record the step each class was last in a batch (for protomem.staleness)"),
    "tensorboard": (True, "also log to TensorBoard when it is installed"),
}


def _parse_bool(text):
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _parse_value(text, default):
    """A command-line string as the type of the option's default (None: int, float or str)."""
    if isinstance(default, bool):
        return _parse_bool(text)
    if text is None or str(text).lower() == "none":
        return None
    if isinstance(default, str):  # str options that also take a count (samples_per_class)
        return int(text) if str(text).isdigit() else str(text)
    for kind in ((int,) if isinstance(default, int) else (float,) if isinstance(default, float)
                 else (str,) if isinstance(default, str) else (int, float, str)):
        try:
            return kind(text)
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"cannot read {text!r} as {type(default).__name__}")


def build_parser():
    """The argparse parser of ``python -m protomem.train``."""
    p = argparse.ArgumentParser(prog="protomem-train",
                                description="Train an identity encoder with a protomem loss head.")
    p.add_argument("--config", help="a JSON or TOML file of options (the command line wins)")
    for name, (default, text) in OPTIONS.items():
        # SUPPRESS: an option left out stays out, so a config file's value is not overridden
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                       type=lambda s, d=default: _parse_value(s, d), metavar="X",
                       help=f"{text} (default: {default})")
    return p


def load_file(path):
    """Options from a JSON or TOML file: a flat table of option names."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        values = tomllib.loads(raw.decode())
    else:
        values = json.loads(raw)
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown options in {path}: {', '.join(unknown)}")
    return values


def resolve(argv=None, **overrides):
    """The full option dict: defaults < config file < command line < ``overrides``; checked.

    Returns:
        dict of every option in ``OPTIONS`` (plus ``in_dim``, the encoder's input size for
        feature data).
    """
    args = vars(build_parser().parse_args(argv))
    cfg = {name: default for name, (default, _) in OPTIONS.items()}
    if args.get("config"):
        cfg.update(load_file(args.pop("config")))
    args.pop("config", None)
    cfg.update(args)
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown options: {', '.join(unknown)}")
    cfg.update(overrides)
    check(cfg)
    return cfg


def check(cfg):
    """Raises ValueError naming the option when a value is out of range."""
    if cfg["head"] not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {cfg['head']!r}")
    if cfg["margin"] not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {cfg['margin']!r}")
    if cfg["head"] == "pm" and cfg["samples_per_identity"] < 2:
        raise ValueError("head pm needs samples_per_identity >= 2: a class prototype made from one "
                         "exemplar is the exemplar itself")
    for name in ("identities_per_batch", "samples_per_identity", "accum_steps", "embedding_size"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"{name} must be an int >= 1, got {cfg[name]!r}")
    if cfg["optimizer"] not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be sgd or adamw, got {cfg['optimizer']!r}")
    if cfg["schedule"] not in ("poly", "cosine", "constant"):
        raise ValueError(f"schedule must be poly, cosine or constant, got {cfg['schedule']!r}")
    if cfg["amp"] not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, got {cfg['amp']!r}")
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {cfg['device']!r}")
    if cfg["max_steps"] is None and not cfg["epochs"] > 0:
        raise ValueError(f"epochs must be > 0, got {cfg['epochs']!r}")
