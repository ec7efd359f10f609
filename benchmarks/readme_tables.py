"""Markdown tables from result rows, and the README's benchmark sections rewritten from them.

A README section is the text between ``<!-- bench:NAME:KEY -->`` and ``<!-- /bench:NAME:KEY -->``
(each on its own line): NAME is a row's ``bench`` ("scale", "memory_update", "margin_ce",
"accuracy"...), KEY a device slug, the stem of ``benchmarks/results/<slug>.csv``, or its first
word ("cpu", "cuda") for the newest results of any device of that kind. Only the text between
markers changes, and rewriting it from the same CSV gives the same text.
"""
import glob
import math
import os
import re

from common import is_oom, parse_params, read_rows

HEAD_NAMES = {"pm": "Prototype Memory", "dcq": "DCQ", "pfc": "Partial FC", "full": "full softmax"}
HEAD_NAMES.update({f"{h}+mining": f"{n} + mining" for h, n in list(HEAD_NAMES.items())})
_OWN_PARAMS = {"pm": "M", "dcq": "K", "pfc": "r"}
MARKER = re.compile(r"(<!-- bench:([\w.-]+):([\w.-]+) -->\n)(.*?)(<!-- /bench:\2:\3 -->)", re.S)


def fmt_value(v):
    """A measurement to about three significant digits ("—" for NaN)."""
    if math.isnan(v):
        return "—"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:#.3g}"


def fmt_count(n):
    """10000 -> "1e4", 25000 -> "2.5e4", 512 -> "512"."""
    n = int(float(n))
    if n < 1000:
        return str(n)
    e = int(math.floor(math.log10(n)))
    return f"{n / 10**e:g}e{e}"


def caption(rows, what):
    r = rows[0]
    return f"{what} on {r['device']}, torch {r['torch']}, protomem {r['protomem']}, {r['date']}."


def _by(rows, metric):
    """{(provider, C): row} of one metric of the scale rows."""
    return {(r["provider"], int(parse_params(r["params"])["C"])): r for r in rows if r["metric"] == metric}


def _cell(t, m):
    if is_oom(t):
        need = parse_params(t["params"]).get("need_gb")
        return f"OOM (needs ~{need} GB)" if need else "OOM"
    return f"{fmt_value(t['median'])} ms, {fmt_value(m['median'])} MB"


def scale_ratios(rows):
    """{provider: (C_small, C_large, time ratio, memory ratio, first OOM C or None)} between the
    smallest and the largest C that ran (None where no C ran)."""
    t, m = _by(rows, "time"), _by(rows, "peak_memory")
    out = {}
    for p in dict.fromkeys(r["provider"] for r in rows):
        cs = sorted(c for q, c in t if q == p)
        ran = [c for c in cs if not is_oom(t[p, c])]
        oom = next((c for c in cs if is_oom(t[p, c])), None)
        if not ran:
            out[p] = None
            continue
        lo, hi = ran[0], ran[-1]
        out[p] = (lo, hi, t[p, hi]["median"] / t[p, lo]["median"],
                  m[p, hi]["median"] / max(m[p, lo]["median"], 1e-9), oom)
    return out


def scale_table(rows):
    """Markdown lines: a head per row, a class count C per column ("time ms, peak MB" or OOM),
    and each head's time and memory at its largest C relative to its smallest."""
    t, m = _by(rows, "time"), _by(rows, "peak_memory")
    cs = sorted({c for _, c in t})
    p0 = parse_params(rows[0]["params"])
    lines = [caption(rows, f"Time per training step and peak memory against the number of classes C "
                           f"(B = {p0['B']}, D = {p0['D']}, float32)"), "",
             "| head | " + " | ".join(f"C = {fmt_count(c)}" for c in cs) + " | largest / smallest C |",
             "|---|" + "---:|" * len(cs) + "---|"]
    for p, ratio in scale_ratios(rows).items():
        own = _OWN_PARAMS.get(p)
        label = HEAD_NAMES.get(p, p)
        if own:
            v = next(parse_params(r["params"])[own] for r in rows if r["provider"] == p)
            label += f" ({own} = {fmt_count(v) if own != 'r' else v})"
        cells = [_cell(t[p, c], m[p, c]) if (p, c) in t else "" for c in cs]
        if ratio is None:
            summary = "—"
        else:
            lo, hi, rt, rm, oom = ratio
            summary = f"time {rt:.2f}x, memory {rm:.2f}x (C = {fmt_count(lo)} to {fmt_count(hi)})"
            summary += f"; OOM from C = {fmt_count(oom)}" if oom else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary} |")
    return lines


def generic_table(rows):
    """Markdown lines: a params string per row, a (provider, metric) pair per column (median)."""
    cols = {}
    for r in rows:
        key = (r["provider"], r["metric"])
        if key not in cols or is_oom(cols[key]):
            cols[key] = r
    cells = {(r["params"], r["provider"], r["metric"]): r for r in rows}
    lines = [caption(rows, rows[0]["bench"]), "",
             "| params | " + " | ".join(f"{p} {mt} ({c['unit']})" for (p, mt), c in cols.items()) + " |",
             "|---|" + "---:|" * len(cols)]
    for params in dict.fromkeys(r["params"] for r in rows):
        vals = []
        for p, mt in cols:
            r = cells.get((params, p, mt))
            vals.append("" if r is None else "OOM" if is_oom(r) else fmt_value(r["median"]))
        lines.append(f"| {params.replace(';', ', ')} | " + " | ".join(vals) + " |")
    return lines


def _label(metric):
    return metric.replace("_tar_at_far_", " TAR@").replace("_rank1", " rank-1").replace("_", " ")


def per_provider_table(rows):
    """Markdown lines: a row per (params, provider), a column per metric (the accuracy bench)."""
    metrics = list(dict.fromkeys((r["metric"], r["unit"]) for r in rows))
    cells = {(r["params"], r["provider"], r["metric"]): r for r in rows}
    lines = [caption(rows, rows[0]["bench"]) + " Configuration: " +
             "; ".join(dict.fromkeys(r["params"].replace(";", ", ") for r in rows)) + ".", "",
             "| head | " + " | ".join(f"{_label(m)} ({u})" for m, u in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for params, provider in dict.fromkeys((r["params"], r["provider"]) for r in rows):
        vals = [cells.get((params, provider, m)) for m, _ in metrics]
        vals = ["" if r is None else "OOM" if is_oom(r) else fmt_value(r["median"]) for r in vals]
        lines.append(f"| {HEAD_NAMES.get(provider, provider)} | " + " | ".join(vals) + " |")
    return lines


def staleness_table(rows):
    """Markdown lines: a row per age bin, a column per head: "cos (held %)"."""
    def split(params):
        base, _, age = params.partition(";age=")
        return base, age

    heads = list(dict.fromkeys(r["provider"] for r in rows))
    cells = {(split(r["params"])[1], r["provider"], r["metric"]): r["median"] for r in rows}
    ages = list(dict.fromkeys(split(r["params"])[1] for r in rows))
    lines = [caption(rows, "staleness") + " Configuration: " +
             "; ".join(dict.fromkeys(split(r["params"])[0].replace(";", ", ") for r in rows)) +
             ". Cells: mean cos(classifier row, class mean) over the classes the head holds (the % it holds).",
             "", "| steps since last in a batch | classes | " +
             " | ".join(HEAD_NAMES.get(h, h) for h in heads) + " |", "|---|---:|" + "---:|" * len(heads)]
    for age in ages:
        n = cells.get((age, heads[0], "classes"), math.nan)
        if not n:
            continue
        vals = [f"{fmt_value(cells.get((age, h, 'cos'), math.nan))} ({fmt_value(cells.get((age, h, 'held'), math.nan))}%)"
                for h in heads]
        lines.append(f"| {age} | {fmt_value(n)} | " + " | ".join(vals) + " |")
    return lines


_TABLES = {"scale": scale_table, "accuracy": per_provider_table, "staleness": staleness_table}


def table(rows, bench):
    """Markdown text of one bench's rows (all of one device), or None when there are none."""
    rows = [r for r in rows if r["bench"] == bench]
    if not rows:
        return None
    return "\n".join(_TABLES.get(bench, generic_table)(rows)) + "\n"


def rows_for(results_dir, bench, key):
    """The rows of ``bench`` from ``<key>.csv``, else from the newest ``<key>-*.csv`` that has it."""
    exact = os.path.join(results_dir, f"{key}.csv")
    paths = [exact] if os.path.exists(exact) else sorted(glob.glob(os.path.join(results_dir, f"{key}-*.csv")))
    best = []
    for path in paths:
        rows = [r for r in read_rows(path) if r["bench"] == bench]
        if rows and (not best or max(r["date"] for r in rows) > max(r["date"] for r in best)):
            best = rows
    return best


def update_text(text, results_dir):
    """``text`` with every marked section rewritten from the CSVs; (new text, [sections left as
    they were because no results exist for them])."""
    missing = []

    def repl(mt):
        bench, key = mt.group(2), mt.group(3)
        body = table(rows_for(results_dir, bench, key), bench)
        if body is None:
            missing.append(f"{bench}:{key}")
            return mt.group(0)
        return mt.group(1) + body + mt.group(5)

    return MARKER.sub(repl, text), missing


def update_readme(path, results_dir):
    """Rewrites the marked sections of the file at ``path`` in place; returns the missing ones."""
    with open(path) as f:
        text = f.read()
    new, missing = update_text(text, results_dir)
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return missing
