"""The training options: defaults, the command line, and config files (JSON or TOML)."""
import argparse
import json
import os
import sys

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
    "lookalikes": (0.0, "synthetic: fraction of identities in planted look-alike pairs (0: none)"),
    "lookalike_spread": (0.3, "synthetic: distance of planted look-alikes relative to unrelated identities"),
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
    "precision": ("default", "the margin softmax's dot products: default (CUDA: tensor cores, "
                  "bfloat16 operands, float32 accumulation) or highest (float32 operands)"),
    "queue_size": (None, "dcq: entries (default: queue_fraction * classes)"),
    "queue_fraction": (0.1, "dcq: queue size as a fraction of the classes"),
    "ema_momentum": (0.999, "dcq: momentum encoder EMA"),
    "sample_rate": (0.1, "pfc: sampled fraction of the classes"),
    # batches
    "identities_per_batch": (128, "G: identities per (global) batch"),
    "samples_per_identity": (2, "k: samples per identity (pm needs k >= 2; dcq adds a key view)"),
    "mining": ("none", "hard-example mining: none, or doppelganger (batches put look-alikes together)"),
    "mining_fraction": (0.5, "doppelganger: fraction of each batch's identities that are look-alikes"),
    "mining_k": (4, "doppelganger: look-alikes kept per class"),
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
    "bin": ([], "insightface .bin verification sets to evaluate on (as protomem.eval's --bin)"),
    "save_every": (0, "steps between checkpoints (0: only at the end)"),
    "resume": (None, "checkpoint to resume from ('auto': OUT/checkpoint.pt if it exists); the run's "
                     "options come from the checkpoint, the command line overrides what it names"),
    "progress": (True, "show a progress bar"),
    "track_staleness": (False, "record the step each class was last in a batch (for protomem.staleness)"),
    "tensorboard": (True, "also log to TensorBoard when it is installed"),
}


# Listed values of the options that take one of a few words (shown by --help, checked by argparse).
CHOICES = {
    "head": HEADS, "margin": MARGINS, "backbone": ("mlp", "iresnet18", "iresnet34", "iresnet50", "iresnet100"),
    "policy": ("lru", "fifo"), "exemplars": ("all", "leave_one_out"), "quality": ("none", "norm"),
    "memory_dtype": ("float32", "bfloat16", "float16"), "optimizer": ("sgd", "adamw"),
    "precision": ("default", "highest"),
    "schedule": ("poly", "cosine", "constant"), "amp": ("none", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"), "mining": ("none", "doppelganger"),
}
# The value's type where the default (None) does not say it.
KINDS = {"noise": float, "memory_size": int, "queue_size": int, "max_steps": int, "clip_grad": float,
         "resume": str, "quality": str}
METAVARS = {
    "data": "PATH", "num_classes": "N", "samples_per_class": "N|zipf|megaface2", "feature_dim": "N",
    "noise": "SIGMA", "data_seed": "SEED", "num_workers": "N", "embedding_size": "N", "hidden": "N[,N...]",
    "scale": "S", "m1": "M1", "m2": "RAD", "m3": "M3", "memory_size": "SLOTS", "memory_fraction": "FRAC",
    "pm_momentum": "A", "queue_size": "N", "queue_fraction": "FRAC", "ema_momentum": "M",
    "sample_rate": "R", "identities_per_batch": "G", "samples_per_identity": "K", "lr": "LR",
    "momentum": "M", "weight_decay": "WD", "epochs": "EPOCHS", "max_steps": "STEPS",
    "warmup_steps": "STEPS", "clip_grad": "NORM", "accum_steps": "N", "seed": "SEED", "out": "DIR",
    "log_every": "STEPS", "eval_every": "STEPS", "eval_classes": "N", "bin": "FILE",
    "save_every": "STEPS", "resume": "auto|PATH", "lookalikes": "FRAC", "lookalike_spread": "S",
    "mining_fraction": "FRAC", "mining_k": "K",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(ValueError):
    """An option value that cannot work; the CLI reports it as an argparse error (exit code 2)."""


def _parse_bool(text):
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _kind(name):
    default = OPTIONS[name][0]
    return KINDS.get(name) or (type(default) if default is not None else str)


def _parse_samples(text):
    """samples_per_class: a count or a named distribution."""
    if str(text).isdigit():
        return int(text)
    if text not in ("zipf", "megaface2"):
        raise argparse.ArgumentTypeError(f"expected an int, 'zipf' or 'megaface2', got {text!r}")
    return text


def _parse_optional(kind):
    """int/float options whose default is None also take 'none'."""
    def parse(text):
        return None if str(text).lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def _bool_words(argv):
    """The old ``--flag true|false`` spelling as ``--flag`` / ``--no-flag`` (still accepted)."""
    flags = {"--" + n.replace("_", "-") for n, (d, _) in OPTIONS.items() if isinstance(d, bool)}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in flags and not eq and i + 1 < len(argv) and argv[i + 1].lower() in _TRUE + _FALSE:
            value, i = argv[i + 1], i + 1
        if name in flags and (eq or value):
            arg = name if _parse_bool(value) else "--no-" + name[2:]
        out.append(arg)
        i += 1
    return out


def build_parser():
    """The argparse parser of ``python -m protomem.train``."""
    p = argparse.ArgumentParser(prog="protomem-train", usage="%(prog)s [options]  (--help lists them)",
                                description="Train an identity encoder with a protomem loss head.")
    p.add_argument("--config", metavar="FILE", help="a JSON or TOML file of options (the command line wins)")
    for name, (default, text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        # SUPPRESS: an option left out stays out, so a config file's (or a checkpoint's) value stands
        common = dict(dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%") + f" (default: {default})")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif name == "bin":
            p.add_argument(flag, nargs="+", metavar=METAVARS[name], **common)
        elif name in CHOICES:
            p.add_argument(flag, choices=CHOICES[name], metavar="{" + ",".join(CHOICES[name]) + "}", **common)
        elif name == "samples_per_class":
            p.add_argument(flag, type=_parse_samples, metavar=METAVARS[name], **common)
        else:
            kind = _kind(name)
            p.add_argument(flag, type=_parse_optional(kind) if default is None and kind is not str else kind,
                           metavar=METAVARS.get(name, name.upper()), **common)
    p.add_argument("--val-bins", dest="val_bins", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def load_file(path):
    """Options from a JSON or TOML file: a flat table of option names."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python < 3.11: the tomli package (a dependency there)
            import tomli as tomllib
        values = tomllib.loads(raw.decode())
    else:
        values = json.loads(raw)
    unknown = sorted(set(values) - set(OPTIONS) - {"val_bins"})
    if unknown:
        raise ConfigError(f"unknown options in {path}: {', '.join(unknown)}")
    return values


def _old_spellings(values):
    """``val_bins: 'a,b'`` (the old spelling) as ``bin: [a, b]``, with a note; quality 'none' as None."""
    if str(values.get("quality")).lower() == "none":
        values["quality"] = None
    old = values.pop("val_bins", "")
    if old:
        import warnings

        warnings.warn("--val-bins a,b is deprecated: use --bin a b (as protomem.eval)", FutureWarning, stacklevel=3)
        values.setdefault("bin", [s.strip() for s in str(old).split(",") if s.strip()])
    if isinstance(values.get("bin"), str):
        values["bin"] = [values["bin"]]
    return values


def given_options(argv=None, overrides=None, parser=None):
    """The options the user named: config file < command line < ``overrides`` (dict)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars((parser or build_parser()).parse_args(_bool_words(argv)))
    given = load_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    given.update(args)
    unknown = sorted(set(overrides or {}) - set(OPTIONS) - {"val_bins"})
    if unknown:
        raise ConfigError(f"unknown options: {', '.join(unknown)}")
    given.update(overrides or {})
    return _old_spellings(given)


def resolve(argv=None, parser=None, **overrides):
    """The full option dict: defaults < config file < command line < ``overrides``; checked.
    With ``resume`` set and its checkpoint present, the checkpoint's options replace the
    defaults and the config file (``protomem.training.resume.merge``).

    Returns:
        dict of every option in ``OPTIONS`` (plus ``in_dim``, the encoder's input size for
        feature data, once the dataset is built, and ``resume_changes``: the options a resume
        changed, as "name: old -> new" strings).
    """
    from . import resume

    given = given_options(argv, overrides, parser)
    cfg = {name: default for name, (default, _) in OPTIONS.items()}
    cfg.update(given)
    stored = resume.stored_config(cfg) if cfg["resume"] else None
    if stored is not None:
        cfg = resume.merge(_old_spellings(stored), given)
    check(cfg)
    return cfg


def check(cfg):
    """Raises ConfigError naming the option when a value is out of range."""
    for name, allowed in CHOICES.items():
        value = cfg[name] if not (name == "quality" and cfg[name] is None) else "none"
        if value not in allowed:
            raise ConfigError(f"argument --{name.replace('_', '-')}: invalid choice: {value!r} "
                              f"(choose from {', '.join(map(repr, allowed))})")
    if cfg["head"] == "pm" and cfg["samples_per_identity"] < 2:
        raise ConfigError("argument --samples-per-identity: head pm needs samples_per_identity >= 2: a class "
                          "prototype made from one exemplar is the exemplar itself")
    for name in ("identities_per_batch", "samples_per_identity", "accum_steps", "embedding_size"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ConfigError(f"argument --{name.replace('_', '-')}: {name} must be an int >= 1, got {cfg[name]!r}")
    for name in ("mining_fraction", "lookalikes"):
        if not 0.0 <= cfg[name] <= 1.0:
            raise ConfigError(f"argument --{name.replace('_', '-')}: must be in [0, 1], got {cfg[name]!r}")
    if not 0.0 < cfg["lookalike_spread"] <= 1.0:
        raise ConfigError(f"argument --lookalike-spread: must be in (0, 1], got {cfg['lookalike_spread']!r}")
    if not isinstance(cfg["mining_k"], int) or cfg["mining_k"] < 1:
        raise ConfigError(f"argument --mining-k: must be an int >= 1, got {cfg['mining_k']!r}")
    if cfg["max_steps"] is None and not cfg["epochs"] > 0:
        raise ConfigError(f"argument --epochs: epochs must be > 0, got {cfg['epochs']!r}")
    for name in ("memory_size", "queue_size"):
        if cfg[name] is not None and cfg[name] < 1:
            raise ConfigError(f"argument --{name.replace('_', '-')}: must be >= 1, got {cfg[name]!r}")
    if cfg["data"] != "synthetic" and not os.path.exists(cfg["data"]):
        raise ConfigError(f"argument --data: {cfg['data']!r} does not exist (give 'synthetic', a folder "
                          "with train.rec/train.idx, a .rec file or an image folder)")
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("argument --device: cuda asked for, but torch sees no CUDA GPU "
                              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    for path in cfg["bin"]:
        if not os.path.exists(path):
            raise ConfigError(f"argument --bin: {path!r} does not exist")
