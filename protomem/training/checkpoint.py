"""Trainer checkpoints back to objects: the encoder a run trained (or its momentum encoder) and
the synthetic dataset it trained on. The application side of evaluation and export
(``python -m protomem.eval``, ``python -m protomem.export``): the ``protomem.evaluation`` library
takes a model and never imports the trainer."""
import os

import torch

from .builders import build_dataset, build_encoder
from .trainer import FORMAT as CHECKPOINT_FORMAT

__all__ = ["CHECKPOINT_FORMAT", "dataset_from_config", "load_checkpoint", "model_from_checkpoint",
           "resolve_use_ema"]



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
