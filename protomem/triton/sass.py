"""Static analysis of SASS text (``cuobjdump -sass`` / ``nvdisasm`` output): instructions, loops
found by their backward branches, the kernel's main loop and its instruction classes.

The main-loop rule (``main_loop``): a loop is the address range from a backward branch's target
to the branch; branches back to one target are one loop, and a backward branch that starts after
another loop's start and ends after its end (an out-of-line block returning into the middle of a
loop) is not a loop. Among the loops, take the innermost one that holds both a tensor-core
instruction (``*MMA``) and a MUFU (the tile's dot and its exp2 epilogue: the column loop of a
flash-style kernel, even when an inner loop over D holds the dots alone); else the innermost one
with a tensor-core instruction; else the innermost one with a MUFU; else the largest innermost
loop. Ties go to the loop with more instructions. Counts are static: the body's instructions once,
including code under a branch inside the loop (reported apart as ``cond``) and nested loops' bodies
once each."""
import re
from collections import Counter
from dataclasses import dataclass

# Classes of the loop-body breakdown, in report order. Uniform-datapath twins (UIADD3, USEL, ...)
# take the class of the instruction without the U; constant loads (LDC, ULDC) count as "other".
CLASSES = ("tensor", "fp", "mufu", "cvt", "int", "sel", "ldst", "shfl", "sync", "other")
_CLASS_OF = {}
for _cls, _ops in {
    "fp": "FFMA FMUL FADD FMNMX FFMA2 FMUL2 FADD2 FSWZADD FCHK HFMA2 HMUL2 HADD2 HMNMX2 "
          "DFMA DMUL DADD",
    "mufu": "MUFU",
    "cvt": "F2F F2FP F2I I2F I2FP F2IP I2IP FRND",
    "int": "IMAD IADD3 IADD VIADD IMUL ISETP FSETP DSETP HSETP2 ISET FSET LOP3 LOP SHF SHL SHR LEA "
           "IMNMX VIMNMX ISCADD IABS POPC FLO BMSK BREV SGXT PLOP3 P2R R2P PRMT IDP",
    "sel": "SEL FSEL",
    "ldst": "LDG STG LDS STS LDSM STSM LD ST LDL STL ATOM ATOMG ATOMS RED REDG LDGSTS LDGDEPBAR "
            "UTMALDG UTMASTG UTMAREDG UTMAPF UTMACCTL UBLKCP UBLKRED",
    "shfl": "SHFL",
    "sync": "BAR BSSY BSYNC WARPSYNC MEMBAR SYNCS DEPBAR WARPGROUP ARRIVES ERRBAR FENCE",
}.items():
    _CLASS_OF.update(dict.fromkeys(_ops.split(), _cls))

_INSTR = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?"  # address, guard
                    r"([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")  # opcode, operands
_LABEL = re.compile(r"^\s*(\.L[\w.]*):")
_HEX_TARGET = re.compile(r"0x([0-9a-fA-F]+)")
_LABEL_TARGET = re.compile(r"`?\((\.L[\w.]*)\)")
_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPES = {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "884": 8 * 8 * 4}  # HMMA.16816 = m16n8k16


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: byte address, guard predicate ('' if none), full opcode with its
    modifiers (``HGMMA.64x64x16.F32.BF16``) and the operand text."""
    addr: int
    pred: str
    opcode: str
    operands: str

    @property
    def base(self):
        """The opcode without modifiers: ``HGMMA``."""
        return self.opcode.split(".", 1)[0]


@dataclass(frozen=True)
class Loop:
    """Instructions ``start <= addr <= end`` (``end``: the backward branch)."""
    start: int
    end: int

    def contains(self, other):
        return self != other and self.start <= other.start and other.end <= self.end

    def body(self, instrs):
        return [i for i in instrs if self.start <= i.addr <= self.end]


def parse_sass(text):
    """The instructions of the first function in ``text`` (Triton cubins hold one), NOPs dropped,
    with label branch targets (nvdisasm) resolved to addresses.

    Returns:
        (instrs, targets): list of Instr in address order, dict addr -> branch target address.
    """
    instrs, labels, pending, raw_targets = [], {}, [], {}
    seen_function = False
    for line in text.splitlines():
        if "Function :" in line or re.match(r"^\s*\.text\.", line):
            if seen_function and instrs:
                break
            seen_function = True
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        ins = Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip())
        for name in pending:
            labels[name] = ins.addr
        pending = []
        if ins.base in ("BRA", "JMP", "BRX", "CALL") or ins.base.endswith("BRA"):
            t = _LABEL_TARGET.search(ins.operands) or _HEX_TARGET.search(ins.operands)
            if t:
                raw_targets[ins.addr] = t.group(1)
        if ins.base != "NOP":
            instrs.append(ins)
    targets = {a: labels[t] if t.startswith(".L") else int(t, 16)
               for a, t in raw_targets.items() if not t.startswith(".L") or t in labels}
    return instrs, targets


def classify(opcode):
    """The breakdown class (one of CLASSES) of an opcode or base opcode."""
    base = opcode.split(".", 1)[0]
    if base.endswith("MMA"):
        return "tensor"
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base.startswith("U") and base[1:] in _CLASS_OF:
        return _CLASS_OF[base[1:]]
    return "other"


def find_loops(targets):
    """Loops from the branch map of ``parse_sass`` (see the module docstring), sorted by start."""
    ends = {}
    for src, dst in targets.items():
        if dst < src:  # a branch to itself is the trailing trap after EXIT, not a loop
            ends[dst] = max(ends.get(dst, src), src)
    loops = [Loop(s, e) for s, e in ends.items()]
    return sorted((lp for lp in loops
                   if not any(o.start < lp.start <= o.end < lp.end for o in loops)),
                  key=lambda lp: lp.start)


def main_loop(instrs, loops):
    """The loop the per-logit figures come from, by the module docstring's rule.

    Returns:
        (Loop or None, rule name: "tensor+mufu" | "tensor" | "mufu" | "largest" | "none").
    """
    def has(lp, cls):
        return any(classify(i.opcode) == cls for i in lp.body(instrs))

    for rule, need in (("tensor+mufu", ("tensor", "mufu")), ("tensor", ("tensor",)),
                       ("mufu", ("mufu",)), ("largest", ())):
        cands = [lp for lp in loops if all(has(lp, c) for c in need)]
        inner = [lp for lp in cands if not any(lp.contains(o) for o in cands)]
        if inner:
            return max(inner, key=lambda lp: len(lp.body(instrs))), rule
    return None, "none"


def conditional_addrs(instrs, targets, loop):
    """Addresses in ``loop`` that a forward branch inside the loop can jump over."""
    spans = [(src, dst) for src, dst in targets.items()
             if loop.start <= src < dst <= loop.end]
    return {i.addr for i in loop.body(instrs) if any(s < i.addr < d for s, d in spans)}


def mma_macs(opcode):
    """Multiply-accumulates of one warpgroup (HGMMA ``.MxNxK``) or warp (HMMA ``.16816``)
    instruction; 0 for a shape the opcode does not spell (sm_100's UTCHMMA)."""
    m = _MMA_SHAPE.search(opcode)
    if m:
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    parts = opcode.split(".")
    return _HMMA_SHAPES.get(parts[1], 0) if parts[0] == "HMMA" and len(parts) > 1 else 0


def loop_report(instrs, targets):
    """Static figures of the main loop of one kernel's SASS.

    Returns:
        dict: rule, loop_start/loop_end (addresses or None), loop_instrs, loop_cond_instrs,
        nested_loops, classes {class: count} over CLASSES, loop_mufu, loop_hgmma, loop_mma_macs
        (summed over the loop's tensor-core instructions), opcodes (Counter of base opcodes).
    """
    loops = find_loops(targets)
    loop, rule = main_loop(instrs, loops)
    body = loop.body(instrs) if loop else []
    classes = Counter(classify(i.opcode) for i in body)
    return dict(
        rule=rule,
        loop_start=loop.start if loop else None,
        loop_end=loop.end if loop else None,
        loop_instrs=len(body),
        loop_cond_instrs=len(conditional_addrs(instrs, targets, loop)) if loop else 0,
        nested_loops=sum(loop.contains(o) for o in loops) if loop else 0,
        classes={c: classes.get(c, 0) for c in CLASSES},
        loop_mufu=classes.get("mufu", 0),
        loop_hgmma=sum(i.base == "HGMMA" for i in body),
        loop_mma_macs=sum(mma_macs(i.opcode) for i in body if classify(i.opcode) == "tensor"),
        opcodes=Counter(i.base for i in body),
    )
