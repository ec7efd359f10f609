"""Prototype obsolescence: how well each class's classifier row (a weight row, a memory
prototype, or the mean of its queue entries) still points at the class as the current encoder
embeds it, against the steps since the class was last in a training batch."""
import torch
import torch.nn.functional as F

from .losses import DCQLoss, PartialFCLoss, PrototypeMemoryLoss

AGE_BINS = (0, 1, 10, 100, 1000, 10_000)


@torch.no_grad()
def classifier_rows(head, classes):
    """The classifier row of each class, as the head holds it now.

    Args:
        head: a PrototypeMemoryLoss, DCQLoss or PartialFCLoss / FullSoftmaxLoss (one process).
        classes: int64 [n] class ids.

    Returns:
        (rows float32 [n, D] on the head's device, held bool [n]): rows of classes the head does
        not hold (evicted from the memory, absent from the queue) are zero and not held.
    """
    if isinstance(head, PrototypeMemoryLoss):
        slots = head.memory.lookup(classes.to(head.memory.protos.device))
        held = slots >= 0
        return head.memory.protos[slots.clamp_min(0)].float() * held[:, None], held
    if isinstance(head, DCQLoss):
        head.flush()
        q = head.queue
        match = q.labels[None, :] == classes.to(q.labels.device)[:, None]  # [n, K]
        sums = match.float() @ q.keys.float()
        return sums, match.any(1)
    if isinstance(head, PartialFCLoss):
        if head.world_size > 1:
            raise ValueError("classifier_rows needs the whole weight: run it in one process")
        return head.weight.detach()[classes.to(head.weight.device)].float(), torch.ones_like(classes, dtype=torch.bool)
    raise TypeError(f"unsupported head {type(head).__name__}")


@torch.no_grad()
def staleness(encoder, head, dataset, classes, last_seen, step, n_per_class=5, device=None,
              batch_size=1024):
    """Cosine between each class's classifier row and the encoder's current mean embedding of
    the class, with the class's age.

    Args:
        encoder: the model embedding ``dataset`` samples (put in eval mode for the call).
        head: see ``classifier_rows``.
        dataset: a ``SyntheticIdentities`` (its ``fresh_samples`` are the class's images).
        classes: int64 [n] training class ids.
        last_seen: int64 [C] step at which each class was last in a batch (-1: never).
        step: the current step.
        n_per_class: fresh samples averaged per class.

    Returns:
        dict of CPU tensors [n]: ``age`` (steps since last seen; -1 never seen), ``cos`` (NaN
        where not held), ``held`` (bool).
    """
    was_training = encoder.training
    encoder.eval()
    try:
        means = []
        for chunk in classes.split(max(1, batch_size // n_per_class)):
            x, _ = dataset.fresh_samples(chunk, n_per_class, device=device)
            e = F.normalize(encoder(x).float(), dim=1)
            means.append(e.reshape(len(chunk), n_per_class, -1).mean(1))
        means = torch.cat(means)
    finally:
        encoder.train(was_training)
    rows, held = classifier_rows(head, classes)
    cos = F.cosine_similarity(rows.to(means.device), means, dim=1).cpu()
    seen = last_seen.cpu()[classes.cpu()]
    age = torch.where(seen >= 0, step - 1 - seen, -1)
    held = held.cpu()
    return {"age": age, "cos": torch.where(held, cos, float("nan")), "held": held}


def by_age(result, bins=AGE_BINS):
    """Mean cosine and held fraction per age bin [lo, hi) of a ``staleness`` result.

    Returns:
        list of dicts: lo, hi (None for the open last bin), classes, held (fraction), cos (mean
        over held classes; NaN if none).
    """
    out = []
    edges = list(bins) + [None]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (result["age"] >= lo) & ((result["age"] < hi) if hi is not None else True)
        n = int(sel.sum())
        held = sel & result["held"]
        out.append({"lo": lo, "hi": hi, "classes": n,
                    "held": float(held.sum()) / n if n else float("nan"),
                    "cos": float(result["cos"][held].mean()) if held.any() else float("nan")})
    return out
