"""Static report of the Triton kernels for a GPU architecture, compiled offline (no GPU needed):
registers, spills, shared memory, SASS size and the main loop's instructions per logit.

    python -m protomem.triton.inspect [--B 512 --M 1000000 --D 512 --dtype bfloat16] [--arch 90]
        [--module NAME ...] [--case SUBSTR] [--json FILE] [--dump DIR] [--triton-path DIR]

A kernel module opts in with ``inspect_cases(B, M, D, dtype) -> list[InspectCase]``. Each case is
compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (sm_90a for 90), the ptxas log
of that compile gives spills, ``cuobjdump`` the registers and the SASS, and ``protomem.triton.sass``
finds the main loop (rule in its docstring). Per logit figures are thread-instructions:
loop instructions * 32 * num_warps / logits_per_iteration.

Pointers are compiled as 16-byte aligned (as a launch on fresh torch tensors specialises them);
integer arguments get no divisibility hint unless the case lists them in ``divisible_by_16``.
Nothing here imports triton at module level, so ``--triton-path`` can put another Triton first."""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import offline, sass
from .offline import ToolMissing, check_tools  # noqa: F401  (part of this module's API)

KERNEL_MODULES = ("protomem.triton.cos_lse",)
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_RES_REGS = re.compile(r"REG:(\d+)")


@dataclass
class InspectCase:
    """One kernel x config to compile.

    ``fn``: a ``@triton.jit`` function (an interpreter-mode one is compiled in a child process);
    ``signature``: arg name -> Triton type ("*bf16", "*fp32", "*i64", "i32", "fp32", ...) for every
    argument not in ``constexprs``; ``logits_per_iteration``: logits (tile elements) one program
    handles per iteration of the main loop, e.g. BLOCK_B * BLOCK_M; ``divisible_by_16``: integer
    arguments whose launch values are multiples of 16 (Triton specialises on it)."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    logits_per_iteration: int
    notes: str = ""
    divisible_by_16: tuple = field(default=())


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _ptxas_log(ptx, arch):
    """``ptxas -v`` of the PTX, for Triton versions that do not print their own log."""
    ptxas = offline.ptxas_path(arch)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        Path(path).write_text(ptx)
        return subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr


def disassemble(cubin):
    """(SASS text, cuobjdump -res-usage text or '') of a cubin."""
    cmd, name = offline.disassembler()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        text = _run(cmd + [path])
        usage = _run([cmd[0], "-res-usage", path]) if name == "cuobjdump" else ""
    return text, usage


def analyse(case, compiled, arch):
    """The report row of one compiled case (see ``COLUMNS`` and the NOTES section)."""
    meta, asm = compiled["metadata"], compiled["asm"]
    log = compiled["ptxas_log"]
    if not _SPILL.search(log):
        log = _ptxas_log(asm["ptx"], arch)
    text, usage = disassemble(asm["cubin"])
    instrs, targets = sass.parse_sass(text)
    loop = sass.loop_report(instrs, targets)
    regs = _RES_REGS.search(usage) or _REGS.search(log)
    spill = _SPILL.search(log)
    threads = 32 * case.num_warps
    per_logit = threads / case.logits_per_iteration
    # the tensor-core MACs one iteration issues, all warpgroups (HGMMA) or warps (HMMA)
    macs = loop["loop_mma_macs"] * (case.num_warps // 4 if loop["loop_hgmma"] else case.num_warps)
    row = dict(
        name=case.name, kernel=meta.get("name"), notes=case.notes, arch=arch,
        num_warps=case.num_warps, num_stages=case.num_stages,
        logits_per_iteration=case.logits_per_iteration,
        registers=int(regs.group(1)) if regs else None,
        spill_stores=int(spill.group(1)) if spill else None,
        spill_loads=int(spill.group(2)) if spill else None,
        shared_bytes=meta.get("shared"),
        sass_instrs=len(instrs),
        tensor_core=any(sass.classify(i.opcode) == "tensor" for i in instrs),
        loop_rule=loop["rule"], loop_instrs=loop["loop_instrs"],
        loop_cond_instrs=loop["loop_cond_instrs"], nested_loops=loop["nested_loops"],
        instr_per_logit=loop["loop_instrs"] * per_logit,
        mufu_per_logit=loop["loop_mufu"] * per_logit,
        hgmma_in_loop=loop["loop_hgmma"],
        loop_mma_macs=macs, mma_macs_per_logit=macs / case.logits_per_iteration,
        loop_classes=loop["classes"],
        loop_opcodes=dict(loop["opcodes"].most_common()),
    )
    return row, text


# ---------------------------------------------------------------------------------------------
# modules, report, CLI


def load_cases(modules, B, M, D, dtype):
    """(cases with their module name, notes on modules skipped) from each module's inspect_cases."""
    cases, skipped = [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
            skipped.append(f"{name}: not found (skipped)")
            continue
        if not hasattr(mod, "inspect_cases"):
            skipped.append(f"{name}: no inspect_cases() (skipped)")
            continue
        cases += [(name, c) for c in mod.inspect_cases(B, M, D, dtype)]
    return cases, skipped


def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def dump(directory, case, compiled, sass_text):
    """Write the case's TTGIR, PTX, SASS and ptxas log under ``directory``."""
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, _safe(case.name))
    for ext in ("ttgir", "ptx"):
        if ext in compiled["asm"]:
            Path(f"{stem}.{ext}").write_text(compiled["asm"][ext])
    Path(f"{stem}.sass").write_text(sass_text)
    Path(f"{stem}.ptxas.log").write_text(compiled["ptxas_log"])


COLUMNS = (("case", "name", "{}"), ("w/s", None, None), ("regs", "registers", "{}"),
           ("spill st/ld B", None, None), ("smem KB", "shared_bytes", None),
           ("SASS", "sass_instrs", "{}"), ("loop", "loop_instrs", "{}"),
           ("cond", "loop_cond_instrs", "{}"), ("instr/logit", "instr_per_logit", "{:.1f}"),
           ("MUFU/logit", "mufu_per_logit", "{:.2f}"), ("HGMMA", "hgmma_in_loop", "{}"),
           ("TC MAC/logit", "mma_macs_per_logit", "{:.0f}"),
           ("TC", "tensor_core", None), ("rule", "loop_rule", "{}"))


def _cell(title, key, fmt, row):
    if title == "w/s":
        return f"{row['num_warps']}/{row['num_stages']}"
    if title == "spill st/ld B":
        return f"{row['spill_stores']}/{row['spill_loads']}"
    if title == "smem KB":
        return "?" if row["shared_bytes"] is None else f"{row['shared_bytes'] / 1024:.1f}"
    if title == "TC":
        return "yes" if row["tensor_core"] else "no"
    return fmt.format(row[key])


def markdown(rows, header):
    """The report: a header, the summary table and the loop breakdown table."""
    out = [f"# Static kernel report ({header})", ""]
    good = [r for r in rows if "error" not in r]
    out.append("| " + " | ".join(t for t, _, _ in COLUMNS) + " |")
    out.append("|" + "---|" * len(COLUMNS))
    for r in good:
        out.append("| " + " | ".join(_cell(t, k, f, r) for t, k, f in COLUMNS) + " |")
    out += ["", "Main-loop instructions by class (static, per warp and iteration):", ""]
    out.append("| case | " + " | ".join(sass.CLASSES) + " |")
    out.append("|" + "---|" * (len(sass.CLASSES) + 1))
    for r in good:
        out.append(f"| {r['name']} | " + " | ".join(str(r["loop_classes"][c]) for c in sass.CLASSES)
                   + " |")
    for r in rows:
        if "error" in r:
            out.append(f"\n- {r['name']}: FAILED: {r['error']}")
    return "\n".join(out)


def inspect_all(cases, arch=90, dump_dir=None):
    """Compile and analyse cases (one child process for all of them under the interpreter).

    Returns:
        list of report rows (see ``analyse``); a case that failed has only name and error."""
    rows = []
    for case, compiled in zip(cases, offline.compile_all(cases, arch)):
        if isinstance(compiled, Exception):
            rows.append(dict(name=case.name, error=f"{type(compiled).__name__}: {compiled}"))
            continue
        row, text = analyse(case, compiled, arch)
        if dump_dir:
            dump(dump_dir, case, compiled, text)
        rows.append(row)
    return rows


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m protomem.triton.inspect",
                                description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--M", type=lambda s: int(float(s)), default=10**6)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--arch", type=int, default=90,
                   help="compute capability x10: 80, 90 (sm_90a), 100")
    p.add_argument("--module", action="append", default=[],
                   help="another module with inspect_cases() (repeatable)")
    p.add_argument("--no-default-modules", action="store_true",
                   help=f"only the --module ones, not {', '.join(KERNEL_MODULES)}")
    p.add_argument("--case", default="", help="only cases whose name contains this")
    p.add_argument("--json", help="write the rows (with the header) to this file")
    p.add_argument("--dump", help="write TTGIR/PTX/SASS/ptxas log per case into this folder")
    p.add_argument("--triton-path",
                   help="folder of another Triton (pip install --target), put first")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    if args.triton_path:
        offline.use_triton_path(args.triton_path)
    import torch
    import triton

    try:
        check_tools(args.arch)
    except ToolMissing as e:
        sys.exit(f"protomem.triton.inspect: {e}")
    modules = list(dict.fromkeys(([] if args.no_default_modules else list(KERNEL_MODULES))
                                 + args.module))
    cases, skipped = load_cases(modules, args.B, args.M, args.D, getattr(torch, args.dtype))
    cases = [(m, c) for m, c in cases if args.case in c.name]
    for note in skipped:
        print(note, file=sys.stderr)
    rows = []
    for i, (module, case) in enumerate(cases, 1):
        t0 = time.perf_counter()
        row = dict(inspect_all([case], args.arch, args.dump)[0], module=module)
        rows.append(row)
        msg = (row["error"].strip().splitlines()[0] if "error" in row else
               f"{row['registers']} regs, {row['instr_per_logit']:.1f} instr/logit, "
               f"{row['mufu_per_logit']:.2f} MUFU/logit")
        print(f"[{i}/{len(cases)}] {case.name}: {time.perf_counter() - t0:.1f} s, {msg}",
              file=sys.stderr)
    header = (f"Triton {triton.__version__} ({os.path.dirname(triton.__file__)}), ptxas "
              f"{offline.tool_version(offline.ptxas_path(args.arch))}, sm_{args.arch}"
              f"{'a' if args.arch >= 90 else ''}, B={args.B} M={args.M} D={args.D} {args.dtype}")
    print(markdown(rows, header))
    for note in skipped:
        print(f"\n- {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, triton_version=triton.__version__,
                                                   skipped=skipped, rows=rows), indent=1))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
