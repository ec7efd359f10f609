"""PNG plots of result rows (matplotlib, no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from common import is_oom, parse_params  # noqa: E402
from readme_tables import HEAD_NAMES  # noqa: E402

_PANELS = (("time", "time per step (ms)"), ("peak_memory", "peak memory (MB)"))


def plot_scale(rows, path):
    """Time and peak memory against the number of classes, log-log, a line per head; a class
    count where a head ran out of memory is an "x" along the top of the panel. Writes ``path``."""
    rows = [r for r in rows if r["bench"] == "scale"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, label) in zip(axes, _PANELS):
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for i, p in enumerate(dict.fromkeys(r["provider"] for r in rows)):
            mine = sorted((int(parse_params(r["params"])["C"]), r) for r in rows
                          if r["provider"] == p and r["metric"] == metric)
            ok = [(c, r) for c, r in mine if not is_oom(r)]
            color = f"C{i}"
            ax.plot([c for c, _ in ok], [r["median"] for _, r in ok], "o-", color=color,
                    label=HEAD_NAMES.get(p, p))
            ax.errorbar([c for c, _ in ok], [r["median"] for _, r in ok], fmt="none", ecolor=color,
                        yerr=[[r["median"] - r["p20"] for _, r in ok], [r["p80"] - r["median"] for _, r in ok]])
            for c, r in mine:
                if is_oom(r):
                    ax.plot([c], [0.96 - 0.05 * i], "x", color=color, ms=10, mew=2.5, transform=top)
                    ax.text(c, 0.96 - 0.05 * i, "  OOM", color=color, fontsize=8, va="center", transform=top)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C (labels uniform in [0, C))")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    budget = next((parse_params(r["params"]).get("budget_gb") for r in rows if is_oom(r)), None)
    oom = f"estimated need > {budget} GB budget" if budget else "out of memory"
    axes[0].legend(title=f"x along the top: {oom}", fontsize=8, title_fontsize=8)
    r0 = rows[0]
    p0 = parse_params(r0["params"])
    fig.suptitle(f"Loss heads vs number of classes: B = {p0['B']}, D = {p0['D']}, {r0['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
