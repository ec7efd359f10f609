"""Triton kernels of the fused margin cross-entropy (margins with m1 = 1: CosFace, ArcFace and
their sum). Flash-style: the forward walks W in tiles keeping a running log-sum-exp per row; the
backward recomputes each tile. x arrives as unit rows (a [B, D] copy is cheap); W is read as is
and scaled by its inverse row norms, computed once per call.

Precision: the dots read their operands in the *operand dtype* (``operand_dtype``): bfloat16 or
float16 when x and W share that dtype (tensor cores, float32 accumulation; x is normalised in
float32, then cast), float32 otherwise (a 16-bit W next to a float32 x is widened tile by tile,
so mixed inputs compute in the higher precision). float32 dots use ``FP32_DOT_PRECISION``.
Everything else (margins, exp, log-sum-exp, the gradients' projections) is float32.

Configurations: each kernel has a list of ``triton.Config`` (tile shapes, warps, stages). On a GPU
the launch is autotuned over its list, keyed on the power-of-two buckets of B, M and D, whether
pos_cos is given, and the dtypes; ``PROTOMEM_TRITON_AUTOTUNE=0`` (and the interpreter, where
tuning would run every config on the CPU) takes the first config instead. ``chosen_configs()``
reports what ran.

Split over M: with few row blocks (small B) the forward and the grad-x kernel also split the
columns into ``splits`` slices, one program per (row block, slice); the forward's partial
statistics and grad x's partial sums are combined by a second small kernel. ``auto_splits``
chooses the count on a GPU; the launchers take ``splits=`` to force one.

Launchers take float tensors on one device and return float32 per-row statistics; the autograd
and op registration live in protomem/ops/margin_ce.py."""
import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..margins import SIN_FLOOR, CombinedMargin

_SIN_FLOOR = tl.constexpr(SIN_FLOOR)  # a jit function reads globals only as constexpr

# float32 dots: "ieee" is exact (CUDA-core FMAs, as the C++ kernel); "tf32" would run them on
# tensor cores at ~1e-3 relative error per product. Switch deliberately, for a measured reason.
FP32_DOT_PRECISION = "ieee"
LOW_PRECISION = (torch.bfloat16, torch.float16)
AUTOTUNE_ENV = "PROTOMEM_TRITON_AUTOTUNE"
# auto_splits: aim at this many programs per SM, never a slice under MIN_SPLIT_COLS columns.
WAVES = 2
MIN_SPLIT_COLS = 4096
_N_STATS = 6  # partial forward statistics: max, sum exp, target max, target sum exp, best cosines


def _configs(*rows):
    """triton.Configs from rows (BLOCK_B, BLOCK_M, BLOCK_D[, BLOCK_DO], num_warps, num_stages)."""
    names = ("BLOCK_B", "BLOCK_M", "BLOCK_D", "BLOCK_DO")
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


# BLOCK_B rows x BLOCK_M columns per tile, the cosine dot reduced over D in BLOCK_D chunks.
# The first config of each list is the interpreter's and the PROTOMEM_TRITON_AUTOTUNE=0 default.
# Chosen from an offline sm_90 compile (bfloat16, Triton 3.8) to spill little; see NOTES.md.
FWD_CONFIGS = _configs((64, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
                       (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 2))
# Backward: BLOCK_DO is the width of the gradient tile each program owns. The cosine tile is
# recomputed once per BLOCK_DO slice of D, so BLOCK_DO >= D recomputes nothing (at the cost of
# a BLOCK_B x BLOCK_DO float32 accumulator). bwd_w's BLOCK_B is its step over the rows.
BWD_X_CONFIGS = _configs((64, 64, 64, 64, 4, 3), (128, 64, 64, 64, 8, 3), (64, 128, 64, 128, 8, 3),
                         (128, 64, 64, 128, 8, 3), (64, 64, 64, 256, 8, 3), (64, 128, 64, 256, 8, 2),
                         (64, 64, 64, 512, 8, 2))
BWD_W_CONFIGS = _configs((64, 64, 64, 64, 4, 3), (128, 64, 64, 64, 8, 3), (64, 128, 64, 64, 8, 3),
                         (64, 128, 64, 128, 8, 3), (64, 64, 64, 256, 8, 3), (64, 64, 64, 512, 8, 2))


# ---------------------------------------------------------------------------------------------
# tile helpers


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation."""
    if UPCAST:  # the interpreter multiplies bfloat16 bit patterns as integers (Triton 3.8)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=tl.float32)
    return acc


@triton.jit
def _col_slice(M, S, BLOCK_M: tl.constexpr):
    """Columns [lo, hi) of this program's slice (program axis 1 of the S slices); whole tiles."""
    per = tl.cdiv(tl.cdiv(M, BLOCK_M), S) * BLOCK_M
    lo = tl.program_id(1) * per
    return lo, tl.minimum(lo + per, M)


@triton.jit
def _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, M, D, stride_x, stride_w,
              BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    wrow = cols.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        xa = tl.load(xh_ptr + rows[:, None] * stride_x + dd[None, :],
                     mask=(rows[:, None] < B) & (dd[None, :] < D), other=0.0)
        wa = tl.load(w_ptr + wrow + dd[None, :], mask=(cols[:, None] < M) & (dd[None, :] < D), other=0.0)
        acc = _mma(xa, tl.trans(wa.to(xa.dtype)), acc, DOT_PREC, UPCAST)
    winv = tl.load(winv_ptr + cols, mask=cols < M, other=0.0)
    return acc * winv[None, :]


@triton.jit
def _logits(cos, row_lab, col_lab, cols, M, s, cos_m, sin_m, sinmm, m3, WITH_POS: tl.constexpr):
    live = (col_lab >= 0) & (cols < M)
    same = (row_lab[:, None] == col_lab[None, :]) & live[None, :]
    sin_t = tl.sqrt(tl.maximum(1.0 - cos * cos, 0.0))
    phi = tl.where(cos > -cos_m, cos * cos_m - sin_t * sin_m, cos - sinmm) - m3
    if WITH_POS:
        logit = s * cos
        keep = live[None, :] & (same == 0)
    else:
        logit = s * tl.where(same, phi, cos)
        keep = tl.broadcast_to(live[None, :], cos.shape)
    return tl.where(keep, logit, float("-inf")), same, keep


@triton.jit
def _online_lse(m, l, logit):
    """Running (max, sum of exp(logit - max)) of each row after one more tile of logits."""
    m_new = tl.maximum(m, tl.max(logit, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp(m - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)


@triton.jit
def _merge_lse(m, l, m2, l2):
    """(max, sum of exp) of the union of two parts, each given as (max, sum of exp)."""
    m_new = tl.maximum(m, m2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp(m - m_safe) + l2 * tl.exp(m2 - m_safe)


@triton.jit
def _finish_lse(m, l):
    return tl.where(l > 0, m + tl.log(tl.maximum(l, 1e-30)), float("-inf"))


@triton.jit
def _no_stats(BLOCK: tl.constexpr):
    """The statistics of no column: (max, sum exp) of all and of target logits, best cosines."""
    ninf = tl.full((BLOCK,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK,), tl.float32)
    return ninf, zero, ninf, zero, ninf, ninf


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["KEY_B", "KEY_M", "KEY_D"])
def _fwd_kernel(xh_ptr, w_ptr, winv_ptr, rlab_ptr, clab_ptr, part_ptr, B, M, D, S, stride_x,
                stride_w, s, cos_m, sin_m, sinmm, m3, KEY_B, KEY_M, KEY_D,
                WITH_POS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[k, slice, rows]: a row block's statistics over one column slice (grid: row blocks x
    slices); k = max and sum exp of all logits, of the target logits, best target / other cos."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_lab = tl.load(rlab_ptr + rows, mask=rows < B, other=-1)
    lo, hi = _col_slice(M, S, BLOCK_M)
    m_all, l_all, m_t, l_t, best_t, best_o = _no_stats(BLOCK_B)
    for j0 in range(lo, hi, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_lab = tl.load(clab_ptr + cols, mask=cols < hi, other=-1)
        cos = _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, hi, D, stride_x, stride_w,
                        BLOCK_B, BLOCK_M, BLOCK_D, DOT_PREC, UPCAST)
        logit, same, keep = _logits(cos, row_lab, col_lab, cols, hi, s, cos_m, sin_m, sinmm, m3, WITH_POS)
        m_all, l_all = _online_lse(m_all, l_all, logit)
        best_o = tl.maximum(best_o, tl.max(tl.where(keep & (same == 0), cos, float("-inf")), 1))
        if not WITH_POS:
            m_t, l_t = _online_lse(m_t, l_t, tl.where(same, logit, float("-inf")))
            best_t = tl.maximum(best_t, tl.max(tl.where(same, cos, float("-inf")), 1))
    out = part_ptr + tl.program_id(1) * B + rows
    SB = S * B
    ok = rows < B
    tl.store(out, m_all, mask=ok)
    tl.store(out + SB, l_all, mask=ok)
    tl.store(out + 2 * SB, m_t, mask=ok)
    tl.store(out + 3 * SB, l_t, mask=ok)
    tl.store(out + 4 * SB, best_t, mask=ok)
    tl.store(out + 5 * SB, best_o, mask=ok)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, tgt_ptr, bt_ptr, bo_ptr, B, S, BLOCK: tl.constexpr):
    """Merges the S slices' partial statistics part[6, S, B] into (lse, target, best_target,
    best_other), each [B]."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    SB = S * B
    m, l, m_t, l_t, best_t, best_o = _no_stats(BLOCK)
    for k in range(0, S):
        p = part_ptr + k * B + rows
        m, l = _merge_lse(m, l, tl.load(p, mask=ok, other=float("-inf")), tl.load(p + SB, mask=ok, other=0.0))
        m_t, l_t = _merge_lse(m_t, l_t, tl.load(p + 2 * SB, mask=ok, other=float("-inf")),
                              tl.load(p + 3 * SB, mask=ok, other=0.0))
        best_t = tl.maximum(best_t, tl.load(p + 4 * SB, mask=ok, other=float("-inf")))
        best_o = tl.maximum(best_o, tl.load(p + 5 * SB, mask=ok, other=float("-inf")))
    tl.store(lse_ptr + rows, _finish_lse(m, l), mask=ok)
    tl.store(tgt_ptr + rows, _finish_lse(m_t, l_t), mask=ok)
    tl.store(bt_ptr + rows, best_t, mask=ok)
    tl.store(bo_ptr + rows, best_o, mask=ok)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dcos_tile(cos, row_lab, col_lab, cols, M, lse, tgt, a, b, s, cos_m, sin_m, sinmm, m3,
               WITH_POS: tl.constexpr):
    logit, same, keep = _logits(cos, row_lab, col_lab, cols, M, s, cos_m, sin_m, sinmm, m3, WITH_POS)
    dlogit = tl.exp(logit - lse[:, None]) * a[:, None]
    if WITH_POS:
        return dlogit * s
    # a target logit is <= its row's target LSE; the min keeps the other entries from overflowing
    dlogit += tl.where(same, tl.exp(tl.minimum(logit - tgt[:, None], 0.0)), 0.0) * b[:, None]
    sin_t = tl.maximum(tl.sqrt(tl.maximum(1.0 - cos * cos, 0.0)), _SIN_FLOOR)
    dphi = tl.where(cos > -cos_m, cos_m + cos * sin_m / sin_t, 1.0)
    return dlogit * s * tl.where(same, dphi, 1.0)


@triton.jit
def _row_stats(rlab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr, rows, B):
    """A row block's label, log-sum-exp, target LSE and the incoming gradients of both."""
    m = rows < B
    return (tl.load(rlab_ptr + rows, mask=m, other=-1), tl.load(lse_ptr + rows, mask=m, other=0.0),
            tl.load(tgt_ptr + rows, mask=m, other=0.0), tl.load(a_ptr + rows, mask=m, other=0.0),
            tl.load(b_ptr + rows, mask=m, other=0.0))


@triton.jit(do_not_specialize=["KEY_B", "KEY_M", "KEY_D"])
def _bwd_x_kernel(xh_ptr, w_ptr, winv_ptr, rlab_ptr, clab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr,
                  g_ptr, B, M, D, S, stride_x, stride_w, s, cos_m, sin_m, sinmm, m3,
                  KEY_B, KEY_M, KEY_D, WITH_POS: tl.constexpr, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """G[slice, rows, d-block] = sum over the slice's columns j of dcos[rows, j] W[j, d-block] /
    |W_j| (float32 [S, B, D]); grid (row blocks, slices, d blocks)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dd = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    lo, hi = _col_slice(M, S, BLOCK_M)
    row_lab, lse, tgt, a, b = _row_stats(rlab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr, rows, B)
    G = tl.zeros((BLOCK_B, BLOCK_DO), tl.float32)
    for j0 in range(lo, hi, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_lab = tl.load(clab_ptr + cols, mask=cols < hi, other=-1)
        cos = _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, hi, D, stride_x, stride_w,
                        BLOCK_B, BLOCK_M, BLOCK_D, DOT_PREC, UPCAST)
        dcos = _dcos_tile(cos, row_lab, col_lab, cols, hi, lse, tgt, a, b, s, cos_m, sin_m, sinmm, m3, WITH_POS)
        winv = tl.load(winv_ptr + cols, mask=cols < hi, other=0.0)
        wt = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + dd[None, :],
                     mask=(cols[:, None] < hi) & (dd[None, :] < D), other=0.0).to(xh_ptr.dtype.element_ty)
        G = _mma((dcos * winv[None, :]).to(wt.dtype), wt, G, DOT_PREC, UPCAST)
    out = g_ptr + (tl.program_id(1) * B + rows).to(tl.int64)[:, None] * D + dd[None, :]
    tl.store(out, G, mask=(rows[:, None] < B) & (dd[None, :] < D))


@triton.jit(do_not_specialize=["KEY_B", "KEY_M", "KEY_D"])
def _bwd_w_kernel(xh_ptr, w_ptr, winv_ptr, rlab_ptr, clab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr,
                  h_ptr, B, M, D, stride_x, stride_w, s, cos_m, sin_m, sinmm, m3,
                  KEY_B, KEY_M, KEY_D, WITH_POS: tl.constexpr, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """H[cols, d-block] = sum_i dcos[i, cols] * xh[i, d-block] (float32 [M, D]); grid (column
    blocks, d blocks)."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    col_lab = tl.load(clab_ptr + cols, mask=cols < M, other=-1)
    H = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for i0 in range(0, B, BLOCK_B):
        rows = i0 + tl.arange(0, BLOCK_B)
        row_lab, lse, tgt, a, b = _row_stats(rlab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr, rows, B)
        cos = _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, M, D, stride_x, stride_w,
                        BLOCK_B, BLOCK_M, BLOCK_D, DOT_PREC, UPCAST)
        dcos = _dcos_tile(cos, row_lab, col_lab, cols, M, lse, tgt, a, b, s, cos_m, sin_m, sinmm, m3, WITH_POS)
        xt = tl.load(xh_ptr + rows[:, None] * stride_x + dd[None, :],
                     mask=(rows[:, None] < B) & (dd[None, :] < D), other=0.0)
        H = _mma(tl.trans(dcos.to(xt.dtype)), xt, H, DOT_PREC, UPCAST)
    tl.store(h_ptr + cols.to(tl.int64)[:, None] * D + dd[None, :], H,
             mask=(cols[:, None] < M) & (dd[None, :] < D))


@triton.jit
def _tangent_kernel(g_ptr, v_ptr, inv_ptr, out_ptr, N, D, S, stride_v, PROJECT: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = (g - u (g . u)) * inv per row, with g = sum_k G[k] over the S partials of G [S, N, D]
    and u = v * inv the unit row (PROJECT; else out = g): the gradient through v / |v|."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < N) & (dd[None, :] < D)
    at = rows.to(tl.int64)[:, None] * D + dd[None, :]
    g = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for k in range(0, S):
        g += tl.load(g_ptr + k * N * D + at, mask=ok, other=0.0)
    if PROJECT:
        inv = tl.load(inv_ptr + rows, mask=rows < N, other=0.0)
        u = tl.load(v_ptr + rows.to(tl.int64)[:, None] * stride_v + dd[None, :], mask=ok, other=0.0)
        u = u.to(tl.float32) * inv[:, None]
        g = (g - u * tl.sum(g * u, 1)[:, None]) * inv[:, None]
    tl.store(out_ptr + at, g.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# configuration choice


def autotune_enabled():
    """Whether launches without an explicit config autotune: on a GPU unless
    PROTOMEM_TRITON_AUTOTUNE=0; never under TRITON_INTERPRET=1 (first config instead)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _bucket(n):
    """The power of two >= n (>= 1): the autotuner's key for a size."""
    return 1 << max(int(n) - 1, 0).bit_length()


_CHOSEN = {}


class _Tuned:
    """A jit kernel and its config list; a launch autotunes over the list, or runs the given
    config, or the first one (see autotune_enabled), and records which one ran."""

    def __init__(self, name, kernel, configs):
        self.name, self.kernel, self.configs = name, kernel, configs
        self.tuner = triton.autotune(configs, key=["KEY_B", "KEY_M", "KEY_D", "WITH_POS"])(kernel)

    def __call__(self, grid, *args, sizes, config=None, splits=1, **consts):
        keys = dict(zip(("KEY_B", "KEY_M", "KEY_D"), map(_bucket, sizes)))
        if config is None and autotune_enabled():
            self.tuner[grid](*args, **keys, **consts)
            config = self.tuner.best_config
        else:
            config = config if config is not None else self.configs[0]
            self.kernel[grid](*args, **keys, **consts, **config.all_kwargs())
        dtype = str(args[0].dtype).replace("torch.", "")
        _CHOSEN[(self.name, *keys.values(), dtype, bool(consts.get("WITH_POS")), splits)] = config
        return config


_FWD = _Tuned("fwd", _fwd_kernel, FWD_CONFIGS)
_BWD_X = _Tuned("bwd_x", _bwd_x_kernel, BWD_X_CONFIGS)
_BWD_W = _Tuned("bwd_w", _bwd_w_kernel, BWD_W_CONFIGS)


def chosen_configs():
    """The configs the launches so far ran, one row per (kernel, key): a list of dicts with kernel,
    B/M/D (power-of-two buckets), dtype (of the dot operands), with_pos, splits and config
    (str of the triton.Config)."""
    names = ("kernel", "B", "M", "D", "dtype", "with_pos", "splits")
    return [dict(zip(names, key), config=str(cfg)) for key, cfg in _CHOSEN.items()]


def print_chosen_configs(file=None):
    """Prints chosen_configs() one line per row (for a GPU run's notes)."""
    for r in chosen_configs():
        print(f"{r['kernel']:>5} B<={r['B']} M<={r['M']} D<={r['D']} {r['dtype']} "
              f"with_pos={r['with_pos']} splits={r['splits']}: {r['config']}", file=file)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def auto_splits(B, M, n_sm):
    """Column slices for B rows and M columns on n_sm SMs (0: not a GPU -> 1).

    The rule: with the largest row block (128 rows) there are ceil(B / 128) row blocks; split
    the columns into enough slices for WAVES programs per SM, but never into slices of fewer
    than MIN_SPLIT_COLS columns (the x block is reloaded and the partials written per slice).
    H100 (132 SMs), B = 512, M = 1e6: 4 row blocks -> 66 slices of ~15k columns."""
    if n_sm <= 0:
        return 1
    row_blocks = triton.cdiv(B, 128)
    return max(1, min(triton.cdiv(WAVES * n_sm, row_blocks), M // MIN_SPLIT_COLS))


def resolve_splits(splits, B, M, device):
    """The column-split count a launch uses: splits itself (>= 1), or auto_splits for the device
    when None (1 off a GPU and under the interpreter)."""
    if splits is None:
        n_sm = _sm_count(device.index or 0) if device.type == "cuda" and not _interpreting() else 0
        return auto_splits(B, M, n_sm)
    if int(splits) < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    return int(splits)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# launchers


def operand_dtype(x, W):
    """The dtype the dots read: x's when x and W share bfloat16 or float16 (tensor cores),
    float32 otherwise (mixed or float32/float64 inputs compute in float32)."""
    return x.dtype if x.dtype == W.dtype and x.dtype in LOW_PRECISION else torch.float32


def _dot_flags(op_dtype):
    prec = FP32_DOT_PRECISION if op_dtype == torch.float32 else "tf32"  # ignored for 16-bit dots
    return dict(DOT_PREC=prec, UPCAST=_interpreting() and op_dtype == torch.bfloat16)


def _margin_args(scale, m2, m3):
    return dict(s=float(scale), cos_m=math.cos(m2), sin_m=math.sin(m2), sinmm=m2 * math.sin(m2), m3=float(m3))


def _prepare(x, W, normalize_x, normalize_w):
    """(xh float32 [B, D] unit rows, xh in the operand dtype, 1/|x| [B, 1], 1/|W| [M], W
    contiguous)."""
    xf = x.float()
    x_inv = 1 / xf.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize_x else torch.ones_like(xf[:, :1])
    if normalize_w:  # the dtype argument avoids a float32 copy of W
        w_inv = 1 / torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).clamp_min(1e-12)
    else:
        w_inv = W.new_ones(W.shape[0], dtype=torch.float32)
    xh = (xf * x_inv).contiguous()
    return xh, xh.to(operand_dtype(x, W)), x_inv, w_inv.contiguous(), W.contiguous()


def margin_ce_fwd_triton(x, W, row_labels, col_labels, pos_cos, scale, m1, m2, m3, normalize_x,
                         normalize_w, config=None, splits=None):
    """(lse, target, best_target, best_other), each [B] float32; as protomem.ops.margin_ce_fwd
    (m1 = 1). x [B, D], W [M, D] float (see operand_dtype); config: a triton.Config of
    FWD_CONFIGS' form (None: autotune / first); splits: column slices (None: auto_splits)."""
    if m1 != 1.0:
        raise ValueError("the Triton margin cross-entropy supports m1 = 1 only")
    _, xop, _, w_inv, Wc = _prepare(x, W, normalize_x, normalize_w)
    B, D = xop.shape
    M = Wc.shape[0]
    S = resolve_splits(splits, B, M, x.device)
    part = torch.empty(_N_STATS, S, B, device=x.device, dtype=torch.float32)
    _FWD(lambda META: (triton.cdiv(B, META["BLOCK_B"]), S), xop, Wc, w_inv, row_labels.contiguous(),
         col_labels.contiguous(), part, B, M, D, S, xop.stride(0), Wc.stride(0),
         **_margin_args(scale, m2, m3), sizes=(B, M, D), config=config, splits=S,
         WITH_POS=pos_cos is not None, **_dot_flags(xop.dtype))
    lse, tgt, bt, bo = (torch.empty(B, device=x.device, dtype=torch.float32) for _ in range(4))
    _combine_kernel[(triton.cdiv(B, 128),)](part, lse, tgt, bt, bo, B, S, BLOCK=128)
    if pos_cos is not None:
        pos = pos_cos.float()
        tgt = scale * CombinedMargin(scale, 1.0, m2, m3).target_cos(pos)
        lse = torch.logaddexp(lse, tgt)
        bt = pos.clone()  # an output must not alias the pos_cos input
    return lse, tgt, bt, bo


def _tangent(G, v, inv, out_dtype, project):
    """The row gradient through v / |v| (see _tangent_kernel): G [S, N, D] float32 partials,
    v [N, D], inv [N] float32 -> [N, D] out_dtype."""
    S, N, D = G.shape
    out = torch.empty(N, D, device=G.device, dtype=out_dtype)
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 4096 // block_d))
    _tangent_kernel[(triton.cdiv(N, block_r),)](G, v, inv, out, N, D, S, v.stride(0), PROJECT=project,
                                                BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def margin_ce_bwd_triton(grad_lse, grad_target, x, W, row_labels, col_labels, pos_cos, lse, target,
                         scale, m1, m2, m3, normalize_x, normalize_w, need_grad_w, config_x=None,
                         config_w=None, splits=None):
    """(grad_x [B, D] x.dtype, grad_W [M, D] W.dtype or None, grad_pos_cos or None); as
    protomem.ops.margin_ce_bwd (m1 = 1). config_x / config_w: triton.Configs of BWD_X_CONFIGS /
    BWD_W_CONFIGS' form (None: autotune / first); splits: grad x's column slices (None: auto)."""
    _, xop, x_inv, w_inv, Wc = _prepare(x, W, normalize_x, normalize_w)
    B, D = xop.shape
    M = Wc.shape[0]
    a = grad_lse.float().contiguous()
    b = grad_target.float().masked_fill(torch.isinf(target), 0).contiguous()
    tgt = target.float().masked_fill(torch.isinf(target), 0).contiguous()
    args = (xop, Wc, w_inv, row_labels.contiguous(), col_labels.contiguous(), lse.float().contiguous(),
            tgt, a, b)
    consts = dict(_margin_args(scale, m2, m3), sizes=(B, M, D), WITH_POS=pos_cos is not None,
                  **_dot_flags(xop.dtype))
    S = resolve_splits(splits, B, M, x.device)
    G = torch.empty(S, B, D, device=x.device, dtype=torch.float32)
    _BWD_X(lambda META: (triton.cdiv(B, META["BLOCK_B"]), S, triton.cdiv(D, META["BLOCK_DO"])), *args,
           G, B, M, D, S, xop.stride(0), Wc.stride(0), config=config_x, splits=S, **consts)
    grad_x = _tangent(G, x.contiguous(), x_inv.view(-1).contiguous(), x.dtype, normalize_x)
    grad_w = None
    if need_grad_w:
        H = torch.empty(1, M, D, device=x.device, dtype=torch.float32)
        _BWD_W(lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(D, META["BLOCK_DO"])), *args,
               H, B, M, D, xop.stride(0), Wc.stride(0), config=config_w, **consts)
        grad_w = _tangent(H, Wc, w_inv, W.dtype, normalize_w)
    grad_pos = None
    if pos_cos is not None:
        pos = pos_cos.float()
        sin_t = torch.sqrt((1 - pos * pos).clamp_min(0)).clamp_min(SIN_FLOOR)
        dphi = torch.where(pos > -math.cos(m2), math.cos(m2) + pos * math.sin(m2) / sin_t, torch.ones_like(pos))
        grad_pos = ((a * torch.exp(target.float() - lse) + grad_target.float()) * scale * dphi).to(pos_cos.dtype)
    return grad_x, grad_w, grad_pos
