"""protomem.triton.inspect: the offline sm_90a compile of a toy flash-style kernel (bf16 tensor
cores vs float32 "ieee" FMAs) and the SASS parser on a hand-written snippet."""
import os

import pytest
import torch
import triton
import triton.language as tl

from protomem.triton import inspect as pti
from protomem.triton import offline, sass


@triton.jit
def _toy_lse_kernel(x_ptr, w_ptr, out_ptr, B, M, D: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """out[B] = log2 sum_j 2^(x @ W^T)[:, j], x [B, D], W [M, D]: one program per row block walks
    the columns with a running max and sum."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dd = tl.arange(0, D)
    x = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=rows[:, None] < B, other=0.0)
    m = tl.full([BLOCK_B], -float("inf"), tl.float32)
    lsum = tl.zeros([BLOCK_B], tl.float32)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        w = tl.load(w_ptr + cols[None, :] * D + dd[:, None], mask=cols[None, :] < M, other=0.0)
        t = tl.where(cols[None, :] < M, tl.dot(x, w, input_precision=PREC), -float("inf"))
        m_new = tl.maximum(m, tl.max(t, 1))
        lsum = lsum * tl.exp2(m - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), 1)
        m = m_new
    tl.store(out_ptr + rows, m + tl.log2(lsum), mask=rows < B)


def toy_case(dtype, block_b, block_m, d, num_warps):
    """The toy kernel at one tile shape: bf16 operands on the default (tensor-core) dot, float32
    ones on the exact "ieee" one."""
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return pti.InspectCase(
        name=f"toy[{block_b}x{block_m}x{d} {ptr[1:]} {prec}]", fn=_toy_lse_kernel,
        signature=dict(x_ptr=ptr, w_ptr=ptr, out_ptr="*fp32", B="i32", M="i32"),
        constexprs=dict(D=d, BLOCK_B=block_b, BLOCK_M=block_m, PREC=prec),
        num_warps=num_warps, num_stages=2, logits_per_iteration=block_b * block_m)


def inspect_cases(B, M, D, dtype):
    """The toy for ``python -m protomem.triton.inspect --module tests.test_triton_inspect``."""
    return [toy_case(dtype, 64, 64, min(D, 128), 4)]


def _tools_or_skip():
    try:
        pti.check_tools(90)
    except pti.ToolMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def toy_rows():
    _tools_or_skip()
    interp = os.environ.get("TRITON_INTERPRET")
    cases = {"bf16": toy_case(torch.bfloat16, 64, 64, 64, 4),
             "ieee": toy_case(torch.float32, 32, 32, 32, 4)}
    rows = dict(zip(cases, pti.inspect_all(list(cases.values()))))
    for row in rows.values():
        assert "error" not in row, row["error"]
    assert os.environ.get("TRITON_INTERPRET") == interp  # the compile restores the environment
    return cases, rows


def test_bf16_uses_hgmma_and_ieee_does_not(toy_rows):
    cases, rows = toy_rows
    bf, ie = rows["bf16"], rows["ieee"]
    assert bf["tensor_core"] and bf["hgmma_in_loop"] > 0 and bf["loop_rule"] == "tensor+mufu"
    assert not ie["tensor_core"] and ie["hgmma_in_loop"] == 0 and ie["loop_rule"] == "mufu"
    # the loop's wgmmas do exactly one tile's multiply-accumulates: BLOCK_B * BLOCK_M * D
    c = cases["bf16"].constexprs
    assert bf["loop_mma_macs"] == c["BLOCK_B"] * c["BLOCK_M"] * c["D"]
    assert bf["mma_macs_per_logit"] == c["D"] and ie["mma_macs_per_logit"] == 0
    for r in (bf, ie):
        assert r["registers"] > 0 and r["spill_stores"] is not None
        assert r["sass_instrs"] > r["loop_instrs"]
        assert r["shared_bytes"] >= 0 and r["nested_loops"] == 0


def test_per_logit_figures_follow_the_tile_shape(toy_rows):
    cases, rows = toy_rows
    bf, ie = rows["bf16"], rows["ieee"]
    d_ieee = cases["ieee"].constexprs["D"]
    threads = 32 * cases["ieee"].num_warps
    # float32 dot on CUDA cores: one FFMA per multiply-accumulate, D of them per logit
    ffma_per_logit = ie["loop_opcodes"]["FFMA"] * threads / cases["ieee"].logits_per_iteration
    assert d_ieee <= ffma_per_logit <= d_ieee + 1  # + per-row rescale FFMAs
    assert d_ieee < ie["instr_per_logit"] < 2 * d_ieee
    # one exp2 per logit, plus one per row and tile for the rescale (replicated across threads)
    for case, r in ((cases["bf16"], bf), (cases["ieee"], ie)):
        assert 1 <= r["mufu_per_logit"] <= 1 + 32 * case.num_warps / case.constexprs["BLOCK_M"]
        # max, subtract, exp2 and add at least; far below the CUDA-core dot's D FFMAs for bf16
        assert 4 <= r["instr_per_logit"]
    assert bf["instr_per_logit"] < cases["bf16"].constexprs["D"] / 2


SNIPPET = """
        Function : k
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0040*/                   MUFU.EX2 R5, R5 ;
        /*0050*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0060*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0070*/                   ISETP.GE.AND P0, PT, R2, 0x4, PT ;
        /*0080*/              @!P0 BRA 0x50 ;
        /*0090*/                   FMNMX R6, R6, R5, !PT ;
        /*00a0*/              @P1 BRA 0xd0 ;
        /*00b0*/                   FMUL R7, R7, R6 ;
        /*00c0*/                   F2FP.BF16.F32.PACK_AB R8, R7, R7 ;
        /*00d0*/                   FSEL R9, R6, RZ, P2 ;
        /*00e0*/                   SHFL.BFLY PT, R3, R6, 0x1, 0x1f ;
        /*00f0*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*0100*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0110*/                   STS [R1], R9 ;
        /*0120*/                   NOP ;
        /*0130*/              @!P3 BRA 0x30 ;
        /*0140*/                   EXIT ;
        /*0150*/                   BRA 0x150;
"""


def test_sass_parser_loops_and_classes():
    instrs, targets = sass.parse_sass(SNIPPET)
    assert len(instrs) == 21 and all(i.base != "NOP" for i in instrs)
    assert sass.find_loops(targets) == [sass.Loop(0x30, 0x130), sass.Loop(0x50, 0x80)]
    rep = sass.loop_report(instrs, targets)
    # the inner loop has a dot but no MUFU: the outer one (dots + exp2) is the main loop
    assert (rep["loop_start"], rep["loop_end"], rep["rule"]) == (0x30, 0x130, "tensor+mufu")
    assert rep["loop_instrs"] == 16 and rep["nested_loops"] == 1
    assert rep["loop_cond_instrs"] == 2  # FMUL, F2FP under @P1 BRA
    assert rep["classes"] == dict(tensor=2, fp=2, mufu=1, cvt=1, int=3, sel=1, ldst=1, shfl=1,
                                  sync=1, other=3)
    assert rep["loop_hgmma"] == 2 and rep["loop_mma_macs"] == 2 * 64 * 32 * 16
    assert sass.mma_macs("HMMA.16816.F32.BF16") == 16 * 8 * 16  # sm_80: m16n8k16 per warp


def test_sass_parser_without_tensor_cores_and_out_of_line_block():
    text = """
        /*0000*/                   MOV R2, RZ ;
        /*0010*/                   FFMA R3, R4, R5, R3 ;
        /*0020*/              @P0 BRA 0x80 ;
        /*0030*/                   MUFU.EX2 R6, R3 ;
        /*0040*/              @!P1 BRA 0x10 ;
        /*0050*/                   EXIT ;
        /*0080*/                   FMUL R7, R7, R3 ;
        /*0090*/                   BRA 0x30 ;
"""
    instrs, targets = sass.parse_sass(text)
    # the rare block at 0x80 returns into the loop: not a loop of its own
    assert sass.find_loops(targets) == [sass.Loop(0x10, 0x40)]
    rep = sass.loop_report(instrs, targets)
    assert rep["rule"] == "mufu" and rep["loop_instrs"] == 4 and rep["loop_cond_instrs"] == 0


def test_missing_tool_and_bad_triton_path_are_named(tmp_path):
    with pytest.raises(pti.ToolMissing, match="no-such-tool not found"):
        offline.tool_path("no-such-tool")
    with pytest.raises(FileNotFoundError, match="no triton package"):
        offline.use_triton_path(str(tmp_path))
    (tmp_path / "triton").mkdir()
    with pytest.raises(RuntimeError, match="already imported"):  # this process imported triton
        offline.use_triton_path(str(tmp_path))
