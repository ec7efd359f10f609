"""Results as text: aligned console tables and result keys."""
import math

__all__ = ["far_key", "format_results"]


def far_key(far):
    """The FAR as written in result keys: 1e-3 -> "1e-3", 5e-4 -> "5e-4" (str)."""
    mantissa, exponent = f"{far:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"



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
