"""Where a run reports: CSV files (appending across resumes), TensorBoard when installed, and a
progress bar (tqdm when installed, else a line per log step)."""
import csv
import os
import sys


class CSVLog:
    """Rows of dicts appended to ``path``; the header is the first row's keys (later rows may
    only use those keys). Appends to an existing file, so a resumed run continues its log."""

    def __init__(self, path):
        self.path = path
        self._fields = None
        if os.path.exists(path):
            with open(path, newline="") as f:
                self._fields = next(csv.reader(f), None)

    def keep_until(self, step):
        """Drops the rows past ``step`` (those a resumed run will log again); atomic."""
        if self._fields is None:
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if float(r["step"]) <= step]
        if len(kept) == len(rows):
            return
        with open(self.path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, self._fields)
            w.writeheader()
            w.writerows(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, row):
        """Appends one row (dict name -> number or string)."""
        new = self._fields is None
        if new:
            self._fields = list(row)
        extra = set(row) - set(self._fields)
        if extra:
            raise ValueError(f"{self.path}: columns {sorted(extra)} are not in the header")
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self._fields)
            if new:
                w.writeheader()
            w.writerow(row)


class TensorBoard:
    """SummaryWriter when TensorBoard is installed and wanted; otherwise does nothing."""

    def __init__(self, folder, enabled=True):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the package is optional
                return
            self.writer = SummaryWriter(folder)

    def scalars(self, step, values, prefix=""):
        """Logs every numeric value of ``values`` at ``step``."""
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(prefix + k, v, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A progress bar over optimiser steps: tqdm if installed and ``enabled``, else a printed
    line at each ``update`` that carries statistics."""

    def __init__(self, total, initial=0, enabled=True, desc="train"):
        self.bar, self.enabled = None, enabled
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                                file=sys.stderr)
        self.total, self.n = total, initial

    def update(self, n=1, stats=None):
        """Advances n steps; ``stats`` (dict) is shown on the bar or printed."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix({k: _short(v) for k, v in stats.items()}, refresh=False)
        elif stats and self.enabled:
            print(f"step {self.n}/{self.total} " + " ".join(f"{k}={_short(v)}" for k, v in stats.items()),
                  flush=True)

    def write(self, text):
        """Prints a line without breaking the bar (nothing when disabled)."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v
