"""ROC of a verification protocol: points on a log FAR axis for plotting, the plot (PNG), and TAR
read off the ROC as insightface does."""
import math

import torch

__all__ = ["insightface_tars", "plot_roc", "roc_points"]


def roc_points(scores, genuine, num=200):
    """The ROC at ``num`` log-spaced FARs from one impostor pair to all of them, with the exact
    thresholds of ``tar_at_far`` (accept when score > threshold; the (k+1)-th largest impostor
    score for ``k = floor(far * n)`` false accepts).

    Args:
        scores: [P] float scores; genuine: [P] bool (True = same identity).
        num: number of FAR points (>= 2).

    Returns:
        (far, tar): float64 [<= num] tensors on the CPU, FAR as realised (ties can make it smaller
        than asked), ascending and without repeats.
    """
    genuine = torch.as_tensor(genuine, dtype=torch.bool, device=scores.device)
    imp = scores[~genuine].double().sort().values.cpu()
    gen = scores[genuine].double().sort().values.cpu()
    n = imp.numel()
    if n == 0 or gen.numel() == 0:
        raise ValueError("a ROC needs genuine and impostor pairs")
    grid = torch.logspace(0, math.log10(n), num, dtype=torch.float64)
    ends = torch.tensor([1, n])                                         # exact, whatever the rounding
    k = torch.cat([grid.floor().long().clamp(1, n), ends]).unique()     # false accepts allowed
    everything = torch.tensor(-math.inf, dtype=torch.float64)              # k = n: accept all
    threshold = torch.where(k < n, imp[(n - 1 - k).clamp(min=0)], everything)
    far = (n - torch.searchsorted(imp, threshold, right=True)).double() / n
    tar = (gen.numel() - torch.searchsorted(gen, threshold, right=True)).double() / gen.numel()
    keep = torch.cat([far[1:] != far[:-1], torch.tensor([True])])
    return far[keep], tar[keep]


def plot_roc(curves, path, title="1:1 verification", marks=None):
    """Writes ROC curves on a log FAR axis as a PNG (needs matplotlib).

    Args:
        curves: dict label -> (far, tar) (``roc_points``).
        path: the PNG file.
        title: the plot's title.
        marks: optional FARs to draw as vertical guides.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the ROC plot needs matplotlib: pip install matplotlib") from err
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (far, tar) in curves.items():
        # between exact thresholds the ROC is flat until the next accepted impostor
        ax.step(far.numpy(), tar.numpy(), where="post", label=label)
    for far in marks or ():
        ax.axvline(far, color="0.85", lw=0.8, zorder=0)
    ax.set(xscale="log", xlabel="false accept rate", ylabel="true accept rate", title=title,
           ylim=(0, 1.01))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def insightface_tars(scores, genuine, fars):
    """TAR at each FAR read off the ROC the way insightface's ``eval_ijbc.py`` does, for numbers
    comparable with papers: sklearn's ``roc_curve`` (a point per distinct score, accepting
    score >= threshold, collinear points dropped, (0, 0) prepended), then the point whose FPR is
    nearest the FAR (on ties the one with the higher TPR, as the script searches the flipped
    curve). Unlike ``tar_at_far`` the FPR of that point may exceed the FAR.

    Args:
        scores: [P] float scores; genuine: [P] bool (True = same identity).
        fars: FARs in (0, 1].

    Returns:
        dict far -> TAR (float).
    """
    genuine = torch.as_tensor(genuine, dtype=torch.bool, device=scores.device).cpu()
    s = scores.double().cpu()
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], genuine[order].double()
    last_of_value = torch.cat([(s[1:] != s[:-1]).nonzero()[:, 0], torch.tensor([s.numel() - 1])])
    tps = y.cumsum(0)[last_of_value]
    fps = 1 + last_of_value.double() - tps
    if fps.numel() > 2:                                    # sklearn's drop_intermediate
        bend = (fps.diff(2) != 0) | (tps.diff(2) != 0)
        keep = torch.cat([torch.tensor([True]), bend, torch.tensor([True])])
        tps, fps = tps[keep], fps[keep]
    zero = torch.zeros(1, dtype=torch.float64)
    fpr, tpr = torch.cat([zero, fps]) / fps[-1], torch.cat([zero, tps]) / tps[-1]
    out = {}
    for far in fars:
        gap = (fpr - far).abs()
        nearest = (gap == gap.min()).nonzero()[-1, 0]       # the last of the ties
        out[far] = tpr[nearest].item()
    return out
