"""From options to objects: the dataset, encoder, head, optimiser and schedule of a run."""
import math
import os

import torch

from .. import losses, margins
from ..data import ImageFolderIdentities, RecordIODataset, SyntheticIdentities
from ..models import build_backbone
from .config import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_dataset(cfg):
    """The training set: ``SyntheticIdentities`` for data='synthetic', insightface RecordIO for a
    folder holding train.rec or a .rec file, else an image folder (one sub-folder per identity).
    Sets ``cfg['in_dim']`` (the feature size, or None for images) and returns the dataset, whose
    ``labels`` is an int64 tensor [N] and ``num_classes`` an int."""
    data = cfg["data"]
    if data == "synthetic":
        extra = {"noise": cfg["noise"]} if cfg["noise"] is not None else {}
        if cfg.get("lookalikes"):
            extra.update(lookalikes=cfg["lookalikes"], lookalike_spread=cfg["lookalike_spread"])
        ds = SyntheticIdentities(cfg["num_classes"], feature_dim=cfg["feature_dim"],
                                 samples_per_class=cfg["samples_per_class"],
                                 mode="image" if cfg["image_mode"] else "feature",
                                 seed=cfg["data_seed"], **extra)
        cfg["in_dim"] = None if cfg["image_mode"] else cfg["feature_dim"]
        return ds
    cfg["in_dim"] = None
    if data.endswith(".rec") or os.path.exists(os.path.join(data, "train.rec")):
        return RecordIODataset(data)
    if os.path.isdir(data):
        return ImageFolderIdentities(data)
    raise ConfigError(f"argument --data: data must be 'synthetic', a .rec file, a folder with train.rec, or an image "
                     f"folder; {data!r} is none of these")


def build_encoder(cfg):
    """The encoder named by ``cfg['backbone']`` (after ``build_dataset`` set ``in_dim``)."""
    extra = {}
    if cfg["backbone"] == "mlp" and cfg.get("hidden") is not None:  # "512,256", 512 or [512, 256]
        hidden = cfg["hidden"]
        parts = hidden.split(",") if isinstance(hidden, str) else [hidden] if isinstance(hidden, int) else hidden
        extra["hidden"] = tuple(int(h) for h in parts if str(h).strip())
    return build_backbone(cfg["backbone"], cfg["embedding_size"], in_dim=cfg["in_dim"], **extra)


def build_margin(cfg):
    """The margin object, or None for the head's default."""
    kind, s = cfg["margin"], cfg["scale"]
    if kind == "default":
        return None
    if kind == "cosface":
        return margins.CosFace(s, cfg["m3"])
    if kind == "arcface":
        return margins.ArcFace(s, cfg["m2"])
    return margins.CombinedMargin(s, cfg["m1"], cfg["m2"], cfg["m3"])


def _fraction_size(explicit, fraction, num_classes):
    return int(explicit) if explicit is not None else max(1, math.ceil(fraction * num_classes))


def build_head(cfg, num_classes, device):
    """The loss head of ``cfg['head']`` for ``num_classes`` identities, on ``device``."""
    margin, head = build_margin(cfg), cfg["head"]
    D = cfg["embedding_size"]
    if head == "pm":
        M = _fraction_size(cfg["memory_size"], cfg["memory_fraction"], num_classes)
        if M < cfg["identities_per_batch"]:
            raise ConfigError(f"argument --memory-size: the memory ({M} slots) is smaller than the "
                              f"{cfg['identities_per_batch']} identities of one batch; raise --memory-size "
                              "(or --memory-fraction) or lower --identities-per-batch")
        return losses.PrototypeMemoryLoss(
            D, M, margin=margin, momentum=cfg["pm_momentum"], policy=cfg["policy"],
            exemplars=cfg["exemplars"], detach_prototypes=cfg["detach_prototypes"],
            quality=cfg["quality"], memory_dtype=_DTYPES[cfg["memory_dtype"]],
            precision=cfg.get("precision", "default"), device=device)
    if head == "dcq":
        K = _fraction_size(cfg["queue_size"], cfg["queue_fraction"], num_classes)
        rows = cfg["identities_per_batch"] * cfg["samples_per_identity"]
        if K < rows:
            raise ConfigError(f"argument --queue-size: the queue ({K} entries) is smaller than the {rows} "
                              "keys of one batch; raise --queue-size (or --queue-fraction) or lower the batch")
        return losses.DCQLoss(D, K, margin=margin, queue_dtype=_DTYPES[cfg["memory_dtype"]],
                              precision=cfg.get("precision", "default"), device=device)
    precision = cfg.get("precision", "default")
    if head == "pfc":
        return losses.PartialFCLoss(D, num_classes, cfg["sample_rate"], margin=margin, seed=cfg["seed"],
                                    precision=precision, device=device)
    return losses.FullSoftmaxLoss(D, num_classes, margin=margin, seed=cfg["seed"], precision=precision,
                                  device=device)


def describe_head(head):
    """'pm, memory 2000 slots'-like words for the start-up summary."""
    if isinstance(head, losses.PrototypeMemoryLoss):
        return f"pm (Prototype Memory), memory {head.memory.protos.shape[0]} slots"
    if isinstance(head, losses.DCQLoss):
        return f"dcq (Dynamic Class Queue), queue {head.queue.keys.shape[0]} entries"
    if isinstance(head, losses.FullSoftmaxLoss):
        return f"full softmax, {head.num_classes} classes"
    return f"pfc (Partial FC), {head.num_classes} classes, sample rate {head.sample_rate:g}"


def build_optimizer(cfg, encoder, head):
    """SGD (momentum, weight decay) or AdamW over the encoder's and the head's parameters."""
    params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def build_schedule(cfg, optimizer, total_steps):
    """Linear warmup over ``warmup_steps``, then poly (power 2), cosine or constant to the end."""
    warmup, kind = int(cfg["warmup_steps"]), cfg["schedule"]

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (1 - t) ** 2 if kind == "poly" else 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
