"""Triton kernels of ``cos_lse_fwd`` / ``cos_lse_bwd_w`` (the V3 fused margin cross-entropy).

The forward is flash-decoding shaped: one program per (row block, column slice) keeps its x block
resident (all of D, normalised once) and walks its slice of W in tiles; each W tile feeds two
tensor-core dots, the cosines ``x_hat @ W^T`` and the softmax-weighted sum ``P @ W`` that makes
grad x O(B D). Per logit the epilogue is one FMA (scale, 1/|W_j| and the empty-column mask folded
into per-column values), the same-label mask, the running max, one exp2 and the sum. The running
max is rescaled lazily: only when some row's max grew by more than ``TAU`` (log2 units) since the
last rescale, so the [BLOCK_B, D] accumulator is almost never multiplied after the first tiles.
The slices' partials are merged in PyTorch (a few [S, B, D] ops).

The backward for W (Partial FC, full softmax) gives each program a block of columns and walks the
rows: recompute the cosine tile, P = exp2(s*log2(e)*cos - lse*log2(e)) masked, one dot into the
[BLOCK_M, D] accumulator H, and the tangent projection ``rw*(H - rw^2 <w, H> w)`` in the epilogue,
written straight into grad W in W's dtype: no [M, D] float32 temporary, no atomics.

Precision (``operand_dtype``): "default" runs the dots on tensor cores with float32 accumulation
(bfloat16 operands, float16 when x and W are both float16), whatever the input dtypes, so float32
memories and weights take the fast path; "highest" keeps float32 operands (exact CUDA-core FMAs)
unless x and W share a 16-bit dtype (whose products are exact in float32 anyway). float64 inputs
are the plain-PyTorch path (protomem/ops/cos_lse.py). Every other quantity is float32.

Configs: per kernel a list of (BLOCK_B, BLOCK_M, num_warps, num_stages), pruned for the D bucket
(the float32 accumulators and shared-memory tiles must fit); a GPU launch autotunes over the list,
keyed on the power-of-two buckets of B and M, D's block, the split count and the operand dtype.
``PROTOMEM_TRITON_AUTOTUNE=0`` and the interpreter take the first surviving config."""
import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..ops.cos_lse import PRECISIONS

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
AUTOTUNE_ENV = "PROTOMEM_TRITON_AUTOTUNE"
# lazy rescale threshold in log2 units: probabilities held relative to a stale max stay <= 2**TAU
TAU = 8.0
# auto_splits: at least WAVES programs per SM, slices of at least MIN_SPLIT_COLS columns
WAVES = 2
MIN_SPLIT_COLS = 2048
SMEM_BYTES = 220 * 1024  # sm_90: 227 KB per block, less Triton's own scratch
ACC_REGS = 128  # float32 accumulator registers per thread we allow (of 255)

# (BLOCK_B, BLOCK_M, num_warps, num_stages[, transposed]); the first surviving config is the
# interpreter's. Transposed: _fwd_cols's column-major tiles (2 x D tensor MACs a logit at D = 512,
# one stage there: the variant for the autotuner to weigh on a GPU).
FWD_CONFIGS = ((64, 64, 8, 2), (64, 32, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2),
               (128, 128, 8, 2), (64, 128, 8, 2), (64, 128, 8, 1, True), (64, 128, 8, 2, True))
# (BLOCK_M, BLOCK_B, num_warps, num_stages): bwd_w's programs own BLOCK_M columns, step BLOCK_B rows
BWD_W_CONFIGS = ((64, 64, 8, 2), (64, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2),
                 (128, 128, 8, 2))


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, float32 accumulation."""
    if UPCAST:  # the interpreter multiplies bfloat16 bit patterns as integers (Triton 3.8)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=tl.float32)
    return acc


@triton.jit(do_not_specialize=["KEY_B", "KEY_M", "S"])
def _fwd_kernel(x_ptr, w_ptr, rw_ptr, dscale_ptr, rlab_ptr, clab_ptr,
                m_ptr, l_ptr, best_ptr, idx_ptr, dir_ptr,
                B, M, D, S, stride_x, stride_w, c1, KEY_B, KEY_M,
                OP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TAU: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    """Grid (row blocks, S slices). Writes the slice's partials: m [S, B] (the max the sums are
    relative to, log2 units), l [S, B], best [S, B] (max s*log2(e)*cos), idx [S, B] int64 (its
    first column), dir [S, B, D] (sum_j 2^(t_j - m) * dscale * w_j / |w_j|). The column loop
    holds its tiles row-major (_fwd_rows) or, TRANSPOSED, column-major (_fwd_cols); same results."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < B
    # x_hat in the operand dtype, resident for the whole column loop
    xo = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + dd[None, :],
                 mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    rlab = tl.load(rlab_ptr + rows, mask=rmask, other=-3)
    dscale = tl.load(dscale_ptr)
    per = tl.cdiv(tl.cdiv(M, BLOCK_M), S) * BLOCK_M
    lo = split * per
    hi = tl.minimum(lo + per, M)
    if TRANSPOSED:
        m, l, best, bidx, acc_t = _fwd_cols(xo, rlab, w_ptr, rw_ptr, clab_ptr, dscale, lo, hi, D,
                                            stride_w, c1, OP, DOT_PREC, UPCAST, TAU, BLOCK_B,
                                            BLOCK_M, BLOCK_D)
        acc = tl.trans(acc_t)
    else:
        m, l, best, bidx, acc = _fwd_rows(xo, rlab, w_ptr, rw_ptr, clab_ptr, dscale, lo, hi, D,
                                          stride_w, c1, OP, DOT_PREC, UPCAST, TAU, BLOCK_B,
                                          BLOCK_M, BLOCK_D)
    at = split * B + rows
    tl.store(m_ptr + at, m, mask=rmask)
    tl.store(l_ptr + at, l, mask=rmask)
    tl.store(best_ptr + at, best, mask=rmask)
    tl.store(idx_ptr + at, bidx.to(tl.int64), mask=rmask)
    tl.store(dir_ptr + at.to(tl.int64)[:, None] * D + dd[None, :], acc,
             mask=rmask[:, None] & (dd[None, :] < D))


@triton.jit
def _row_stats(BLOCK_B: tl.constexpr):
    """The running statistics of BLOCK_B rows before any column: (max, sum, best, its index)."""
    return (tl.full((BLOCK_B,), float("-inf"), tl.float32), tl.zeros((BLOCK_B,), tl.float32),
            tl.full((BLOCK_B,), float("-inf"), tl.float32), tl.full((BLOCK_B,), -1, tl.int32))


@triton.jit
def _column_tile(w_ptr, rw_ptr, clab_ptr, j0, hi, D, stride_w, OP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(columns [BLOCK_M], W tile [BLOCK_M, BLOCK_D] in OP, their label keys, 1/|W_j|) of the
    tile at j0; columns past hi read as empty (key -2, zero)."""
    cols = j0 + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    cmask = cols < hi
    w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + dd[None, :],
                mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
    clab = tl.load(clab_ptr + cols, mask=cmask, other=-2)
    rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0)
    return cols, w.to(OP), clab, rw


@triton.jit
def _fwd_rows(xo, rlab, w_ptr, rw_ptr, clab_ptr, dscale, lo, hi, D, stride_w, c1,
              OP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TAU: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The column loop over [BLOCK_B, BLOCK_M] tiles, rows owning the reductions (FlashAttention's
    layout): (m, l, best, index, direction [BLOCK_B, BLOCK_D]). At 64 rows on 8 warps Triton 3.6
    has both warpgroups compute the whole cosine tile (3 x D tensor MACs a logit)."""
    m, l, best, bidx = _row_stats(BLOCK_B)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for j0 in range(lo, hi, BLOCK_M):
        cols, wo, clab, rw = _column_tile(w_ptr, rw_ptr, clab_ptr, j0, hi, D, stride_w, OP,
                                          BLOCK_M, BLOCK_D)
        live = clab >= -1
        rwc = tl.where(live, rw * c1, 0.0)
        bias = tl.where(live, 0.0, float("-inf"))
        dots = _mma(xo, tl.trans(wo), tl.zeros((BLOCK_B, BLOCK_M), tl.float32), DOT_PREC, UPCAST)
        t = dots * rwc[None, :] + bias[None, :]
        t = tl.where(rlab[:, None] == clab[None, :], float("-inf"), t)
        tmax = tl.max(t, 1)
        better = tmax > best
        if tl.max(better.to(tl.int32), 0) > 0:  # rare after the first tiles: the column index
            first = tl.min(tl.where(t == tmax[:, None], cols[None, :], 2147483647), 1)
            bidx = tl.where(better, first, bidx)
            best = tl.maximum(best, tmax)
        grow = tl.where(tmax > m, tmax - m, 0.0)
        if tl.max(grow, 0) > TAU:  # lazy rescale of the accumulator
            m_new = tl.maximum(m, tmax)
            alpha = tl.where(m_new == m, 1.0, tl.exp2(m - m_new))
            acc = acc * alpha[:, None]
            l = l * alpha
            m = m_new
        p = tl.exp2(t - tl.where(m == float("-inf"), 0.0, m)[:, None])
        l += tl.sum(p, 1)
        acc = _mma((p * (rw * dscale)[None, :]).to(OP), wo, acc, DOT_PREC, UPCAST)
    return m, l, best, bidx, acc


@triton.jit
def _fwd_cols(xo, rlab, w_ptr, rw_ptr, clab_ptr, dscale, lo, hi, D, stride_w, c1,
              OP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TAU: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """_fwd_rows with transposed [BLOCK_M, BLOCK_B] tiles: cos^T = W x_hat^T, direction^T +=
    W^T P^T, returned as [BLOCK_D, BLOCK_B]. With 128 columns on 8 warps each warpgroup
    computes its own 64 columns: 2 x D tensor MACs a logit; the row statistics become
    reductions over the warps."""
    xt = tl.trans(xo)
    m, l, best, bidx = _row_stats(BLOCK_B)
    acc = tl.zeros((BLOCK_D, BLOCK_B), tl.float32)
    for j0 in range(lo, hi, BLOCK_M):
        cols, wo, clab, rw = _column_tile(w_ptr, rw_ptr, clab_ptr, j0, hi, D, stride_w, OP,
                                          BLOCK_M, BLOCK_D)
        dots = _mma(wo, xt, tl.zeros((BLOCK_M, BLOCK_B), tl.float32), DOT_PREC, UPCAST)
        t = dots * (rw * c1)[:, None]
        t = tl.where((clab[:, None] == rlab[None, :]) | (clab[:, None] < -1), float("-inf"), t)
        tmax = tl.max(t, 0)
        better = tmax > best
        if tl.max(better.to(tl.int32), 0) > 0:
            bidx = tl.where(better, tl.min(tl.where(t == tmax[None, :], cols[:, None], 2147483647), 0), bidx)
            best = tl.maximum(best, tmax)
        if tl.max(tl.where(tmax > m, tmax - m, 0.0), 0) > TAU:
            m_new = tl.maximum(m, tmax)
            alpha = tl.where(m_new == m, 1.0, tl.exp2(m - m_new))
            acc, l, m = acc * alpha[None, :], l * alpha, m_new
        p = tl.exp2(t - tl.where(m == float("-inf"), 0.0, m)[None, :])
        l += tl.sum(p, 0)
        acc = _mma(tl.trans(wo), (p * (rw * dscale)[:, None]).to(OP), acc, DOT_PREC, UPCAST)
    return m, l, best, bidx, acc


@triton.jit(do_not_specialize=["KEY_B", "KEY_M"])
def _bwd_w_kernel(xh_ptr, gs_ptr, w_ptr, rw_ptr, rlab_ptr, clab_ptr, lse2_ptr, gw_ptr, gmax_ptr,
                  B, M, D, stride_x, stride_w, stride_g, c1, KEY_B, KEY_M,
                  NORMALIZE_W: tl.constexpr, OP: tl.constexpr, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Grid (column blocks,). grad_W[j] = rw_j (H_j - rw_j^2 <w_j, H_j> w_j) (normalize_w) or H_j,
    H_j = gmax * sum_i gs_i p_ij x_hat_i over the row's other columns; 0 for empty columns."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    cmask = cols < M
    wmask = cmask[:, None] & (dd[None, :] < D)
    w_at = w_ptr + cols.to(tl.int64)[:, None] * stride_w + dd[None, :]
    wo = tl.load(w_at, mask=wmask, other=0.0).to(OP)
    clab = tl.load(clab_ptr + cols, mask=cmask, other=-2)
    rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0)
    rwc = rw * c1
    H = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        xh = tl.load(xh_ptr + rows.to(tl.int64)[:, None] * stride_x + dd[None, :],
                     mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
        rlab = tl.load(rlab_ptr + rows, mask=rmask, other=-3)
        lse2 = tl.load(lse2_ptr + rows, mask=rmask, other=float("inf"))
        gs = tl.load(gs_ptr + rows, mask=rmask, other=0.0)
        dots = _mma(wo, tl.trans(xh), tl.zeros((BLOCK_M, BLOCK_B), tl.float32), DOT_PREC, UPCAST)
        p = tl.exp2(dots * rwc[:, None] - lse2[None, :]) * gs[None, :]
        p = tl.where(clab[:, None] == rlab[None, :], 0.0, p)
        H = _mma(p.to(OP), xh, H, DOT_PREC, UPCAST)
    H = H * tl.load(gmax_ptr)
    if NORMALIZE_W:  # W reloaded (cache hit) rather than held in registers through the loop
        wf = tl.load(w_at, mask=wmask, other=0.0).to(tl.float32)
        g = rw[:, None] * H - (rw * rw * rw * tl.sum(wf * H, 1))[:, None] * wf
    else:
        g = H
    g = tl.where((clab >= -1)[:, None], g, 0.0)
    tl.store(gw_ptr + cols.to(tl.int64)[:, None] * stride_g + dd[None, :],
             g.to(gw_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def _norm_cast_kernel(w_ptr, out_ptr, rw_ptr, M, D, stride_w, NORMALIZE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One read of W [M, D]: out = W in the operand dtype, rw = 1 / max(|W_j|, 1e-12) (or 1)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    ss = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        at = rows.to(tl.int64)[:, None] * stride_w + dd[None, :]
        mask = rmask[:, None] & (dd[None, :] < D)
        w = tl.load(w_ptr + at, mask=mask, other=0.0).to(tl.float32)
        ss += tl.sum(w * w, 1)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=mask)
    if NORMALIZE:
        rw = 1.0 / tl.maximum(tl.sqrt(ss), 1e-12)
    else:
        rw = tl.full((BLOCK_R,), 1.0, tl.float32)
    tl.store(rw_ptr + rows, rw, mask=rmask)


# ---------------------------------------------------------------------------------------------
# configuration choice


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled():
    """Whether launches without an explicit config autotune: on a GPU unless
    PROTOMEM_TRITON_AUTOTUNE=0; never under TRITON_INTERPRET=1 (first config instead)."""
    return not _interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _bucket(n):
    """The power of two >= n (>= 1): the autotuner's key for a size."""
    return 1 << max(int(n) - 1, 0).bit_length()


def fits(block_rows, block_cols, num_warps, num_stages, block_d, op_bytes, w_bytes):
    """Whether a tile config's float32 accumulator ([block_rows, block_d] over the threads) stays
    within ACC_REGS registers per thread and its shared-memory tiles (the resident block and
    num_stages streamed tiles) within SMEM_BYTES."""
    acc_regs = block_rows * block_d // (32 * num_warps)
    smem = block_rows * block_d * op_bytes + num_stages * block_cols * block_d * w_bytes
    return acc_regs <= ACC_REGS and smem <= SMEM_BYTES


@functools.lru_cache(maxsize=None)
def _configs(kind, block_d, op_bytes, w_bytes):
    """triton.Configs of FWD_CONFIGS / BWD_W_CONFIGS that fit the D block (at least the smallest)."""
    rows = FWD_CONFIGS if kind == "fwd" else BWD_W_CONFIGS
    names = ("BLOCK_B", "BLOCK_M") if kind == "fwd" else ("BLOCK_M", "BLOCK_B")
    kept = [r for r in rows if fits(*r[:4], block_d, op_bytes, w_bytes)]
    if not kept:  # a very wide D: the smallest tile, more registers than we like
        kept = [min(rows, key=lambda r: r[0] * r[1])]
    extra = (lambda r: dict(TRANSPOSED=r[4] if len(r) > 4 else False)) if kind == "fwd" else (lambda r: {})
    return [triton.Config(dict(zip(names, r[:2])) | extra(r), num_warps=r[2], num_stages=r[3])
            for r in kept]


_CHOSEN = {}


@functools.lru_cache(maxsize=None)
def _tuner(kind, block_d, op_bytes, w_bytes):
    kernel = _fwd_kernel if kind == "fwd" else _bwd_w_kernel
    keys = ["KEY_B", "KEY_M", "OP", "BLOCK_D"] + (["S"] if kind == "fwd" else [])
    return triton.autotune(_configs(kind, block_d, op_bytes, w_bytes), key=keys)(kernel)


def _launch(kind, grid, *args, B, M, block_d, op_dtype, w_dtype, config=None, splits=1, **consts):
    """Runs the kernel: autotuned (GPU), the given config, or the first config; records it."""
    kernel = _fwd_kernel if kind == "fwd" else _bwd_w_kernel
    sizes = (op_dtype.itemsize, w_dtype.itemsize)
    keys = dict(KEY_B=_bucket(B), KEY_M=_bucket(M))
    if config is None and autotune_enabled():
        tuner = _tuner(kind, block_d, *sizes)
        tuner[grid](*args, **keys, BLOCK_D=block_d, **consts)
        config = tuner.best_config
    else:
        config = config if config is not None else _configs(kind, block_d, *sizes)[0]
        kernel[grid](*args, **keys, BLOCK_D=block_d, **consts, **config.all_kwargs())
    key = (kind, keys["KEY_B"], keys["KEY_M"], block_d, str(op_dtype).replace("torch.", ""), splits)
    _CHOSEN[key] = config
    return config


def chosen_configs():
    """The configs the launches so far ran: a list of dicts with kernel, B, M (power-of-two
    buckets), D (the D block), dtype (of the dot operands), splits and config (str)."""
    names = ("kernel", "B", "M", "D", "dtype", "splits")
    return [dict(zip(names, key), config=str(cfg)) for key, cfg in _CHOSEN.items()]


def print_chosen_configs(file=None):
    """Prints chosen_configs() one line per row (for a GPU run's notes)."""
    for r in chosen_configs():
        print(f"{r['kernel']:>5} B<={r['B']} M<={r['M']} D<={r['D']} {r['dtype']} "
              f"splits={r['splits']}: {r['config']}", file=file)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def auto_splits(B, M, n_sm, block_b=64):
    """Column slices for B rows and M columns on n_sm SMs (0: not a GPU -> 1): enough slices for
    WAVES programs per SM over the ceil(B / block_b) row blocks, never slices of fewer than
    MIN_SPLIT_COLS columns. H100 (132 SMs), B = 512, M = 1e6: 8 row blocks -> 33 slices."""
    if n_sm <= 0:
        return 1
    row_blocks = triton.cdiv(B, block_b)
    return max(1, min(triton.cdiv(WAVES * n_sm, row_blocks), M // MIN_SPLIT_COLS))


def resolve_splits(splits, B, M, device):
    """The split count of a launch: ``splits`` itself (>= 1), or auto_splits for the device."""
    if splits is None:
        n_sm = _sm_count(device.index or 0) if device.type == "cuda" and not _interpreting() else 0
        return auto_splits(B, M, n_sm)
    if int(splits) < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    return int(splits)


# ---------------------------------------------------------------------------------------------
# launchers



def operand_dtype(x_dtype, w_dtype, precision):
    """The dtype the dots read. "default": float16 when x and W are both float16, else bfloat16
    (tensor cores); "highest": x's dtype when x and W share a 16-bit dtype, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    same16 = x_dtype == w_dtype and x_dtype in (torch.bfloat16, torch.float16)
    if precision == "highest":
        return x_dtype if same16 else torch.float32
    return torch.float16 if x_dtype == w_dtype == torch.float16 else torch.bfloat16


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _dot_consts(op_dtype):
    return dict(OP=_TL[op_dtype], DOT_PREC="ieee" if op_dtype == torch.float32 else "tf32",
                UPCAST=_interpreting() and op_dtype == torch.bfloat16)


def inverse_norms(t, normalize):
    """1 / max(|row|, 1e-12) of t [N, D] in float32 without a float32 copy (ones if not normalize)."""
    if not normalize:
        return torch.ones(t.shape[0], device=t.device, dtype=torch.float32)
    return 1 / torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).clamp_min(1e-12)


def norms_and_cast(W, normalize, op_dtype):
    """(W in op_dtype [M, D], 1/|W_j| float32 [M]) in one read of W: a float32 memory or weight
    computed with bfloat16 operands is cast once per step rather than tile by tile in every
    row-block program (the report: 2.2x the forward's instructions), for a transient copy of
    half its size. W already in op_dtype is returned as is."""
    if W.dtype == op_dtype or op_dtype.itemsize > W.dtype.itemsize:  # never a wider copy
        return W, inverse_norms(W, normalize)
    M, D = W.shape
    out = torch.empty(M, D, device=W.device, dtype=op_dtype)
    rw = torch.empty(M, device=W.device, dtype=torch.float32)
    block_d = min(triton.next_power_of_2(max(D, 16)), 256)
    block_r = max(1, 4096 // block_d)
    _norm_cast_kernel[(triton.cdiv(M, block_r),)](W, out, rw, M, D, W.stride(0), NORMALIZE=bool(normalize),
                                                 BLOCK_R=block_r, BLOCK_D=block_d)
    return out, rw


def label_keys(row_labels, col_labels):
    """int32 keys with the same equalities as the int64 labels between rows and columns (the
    kernels compare 32-bit keys): a row's key is the first position of its label among the sorted
    row labels; a column's is that position when some row carries its label, -1 when none does,
    -2 for an empty column (label < 0). Padded rows read -3."""
    srt = torch.sort(row_labels).values
    rkey = torch.searchsorted(srt, row_labels)
    pos = torch.searchsorted(srt, col_labels).clamp_max(max(srt.shape[0] - 1, 0))
    hit = srt[pos] == col_labels if srt.shape[0] else torch.zeros_like(col_labels, dtype=torch.bool)
    ckey = torch.where(col_labels < 0, -2, torch.where(hit, pos, -1))
    return rkey.to(torch.int32).contiguous(), ckey.to(torch.int32).contiguous()


def cos_lse_fwd_triton(x, W, row_labels, col_labels, scale, normalize_x, normalize_w,
                       precision="default", config=None, splits=None):
    """As ``protomem.ops.cos_lse.cos_lse_fwd`` on CUDA (or the interpreter): x [B, D], W [M, D]
    float32/bfloat16/float16 -> (lse [B], best [B], best_index [B] int64, direction [B, D],
    w_inv_norm [M]), float32. config: a triton.Config of FWD_CONFIGS' form (None: autotune /
    first); splits: column slices (None: auto_splits)."""
    B, D = x.shape
    M = W.shape[0]
    dev = x.device
    op = operand_dtype(x.dtype, W.dtype, precision)
    W = W.contiguous()
    xh = (x.float() * inverse_norms(x, normalize_x)[:, None]).to(op)
    W, rw = norms_and_cast(W, normalize_w, op)
    # the direction sums p_j * rw_j * w_j in the operand dtype: scale rw so its largest is ~1
    # (a power of two, undone below), which keeps float16 from overflowing on tiny columns
    big = rw.max() if M else torch.ones((), device=dev)
    dscale = torch.exp2(-torch.floor(torch.log2(big.clamp_min(1e-30)))).reshape(1)
    S = resolve_splits(splits, B, M, dev)
    c1 = float(scale) * LOG2E
    m = torch.empty(S, B, device=dev, dtype=torch.float32)
    l, best = torch.empty_like(m), torch.empty_like(m)
    idx = torch.empty(S, B, device=dev, dtype=torch.int64)
    part = torch.empty(S, B, D, device=dev, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    _launch("fwd", lambda META: (triton.cdiv(B, META["BLOCK_B"]), S), xh, W, rw, dscale,
            *label_keys(row_labels, col_labels), m, l, best, idx, part, B, M, D, S,
            xh.stride(0), W.stride(0), c1, B=B, M=M, block_d=block_d, op_dtype=op, w_dtype=W.dtype,
            config=config, splits=S, TAU=TAU, **_dot_consts(op))
    lse, best_t, best_index, direction = merge_splits(m, l, best, idx, part)
    return lse * LN2, best_t / c1, best_index, direction / dscale, rw


def merge_splits(m, l, best, idx, part):
    """Combines S slices' partials (log2 units; see _fwd_kernel) into (lse2 [B], best [B],
    best_index [B], direction [B, D]) like flash-decoding: rescale to the common max and add."""
    top = m.amax(dim=0)
    top_safe = torch.where(top == float("-inf"), 0.0, top)
    w = torch.exp2(m - top_safe)  # -inf partials weigh 0
    total = (l * w).sum(dim=0)
    has = total > 0
    lse2 = torch.where(has, top_safe + torch.log2(torch.where(has, total, 1.0)), float("-inf"))
    direction = torch.einsum("sb,sbd->bd", w / torch.where(has, total, 1.0), part)
    b = best.amax(dim=0)
    first = torch.where(best == b, idx, torch.iinfo(torch.int64).max).amin(dim=0)
    best_index = torch.where(b == float("-inf"), -1, first)
    return lse2, b, best_index, direction


def cos_lse_bwd_w_triton(grad_lse, x, W, row_labels, col_labels, lse, w_inv_norm, scale,
                         normalize_x, normalize_w, precision="default", config=None):
    """As ``protomem.ops.cos_lse.cos_lse_bwd_w`` on CUDA: grad_W [M, D] in W's dtype. config: a
    triton.Config of BWD_W_CONFIGS' form (None: autotune / first)."""
    B, D = x.shape
    M = W.shape[0]
    op = operand_dtype(x.dtype, W.dtype, precision)
    W = W.contiguous()
    xf = x.float()
    xh = (xf * inverse_norms(x, normalize_x)[:, None]).to(op).contiguous()
    g = grad_lse.float() * float(scale)
    finite = torch.isfinite(lse) | torch.isnan(lse)
    g = torch.where(finite, g, 0.0)
    # the row factors enter the dot through P (<= 1 each): divide by their largest magnitude
    gmax = g.abs().amax().clamp_min(1e-30).reshape(1) if B else torch.ones(1, device=x.device)
    gs = (g / gmax).contiguous()
    lse2 = torch.where(finite, lse.float() * LOG2E, float("inf")).contiguous()
    out = torch.empty_like(W)
    block_d = max(16, triton.next_power_of_2(D))
    _launch("bwd_w", lambda META: (triton.cdiv(M, META["BLOCK_M"]),), xh, gs, W,
            w_inv_norm.float().contiguous(), *label_keys(row_labels, col_labels), lse2,
            out, gmax, B, M, D, xh.stride(0), W.stride(0), out.stride(0), float(scale) * LOG2E,
            B=B, M=M, block_d=block_d, op_dtype=op, w_dtype=W.dtype, config=config,
            NORMALIZE_W=bool(normalize_w), **_dot_consts(op))
    return out


# ---------------------------------------------------------------------------------------------
# the static report (python -m protomem.triton.inspect)

_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def inspect_cases(B, M, D, dtype, precision="default"):
    """The kernels x configs of this module for an offline compile (protomem.triton.inspect): the
    forward and grad-W kernels for x and W of ``dtype`` [B, D] / [M, D] at ``precision``."""
    from .inspect import InspectCase

    op = operand_dtype(dtype, dtype, precision)
    block_d = max(16, triton.next_power_of_2(D))
    ptr = {t: "*" + _TRITON_TYPE[t] for t in _TRITON_TYPE}
    # the integer arguments a launch at these sizes would see as multiples of 16
    values = dict(B=B, M=M, D=D, stride_x=D, stride_w=D, stride_g=D)
    div16 = tuple(k for k, v in values.items() if v % 16 == 0)
    dots = dict(_dot_consts(op), UPCAST=False)
    cases = []
    w_fwd = op if op.itemsize < dtype.itemsize else dtype  # the forward reads norms_and_cast's copy
    fwd_sig = dict(x_ptr=ptr[op], w_ptr=ptr[w_fwd], rw_ptr="*fp32",
                   dscale_ptr="*fp32", rlab_ptr="*i32", clab_ptr="*i32", m_ptr="*fp32",
                   l_ptr="*fp32", best_ptr="*fp32", idx_ptr="*i64", dir_ptr="*fp32", B="i32",
                   M="i32", D="i32", S="i32", stride_x="i32", stride_w="i32", c1="fp32",
                   KEY_B="i32", KEY_M="i32")
    for cfg in _configs("fwd", block_d, op.itemsize, w_fwd.itemsize):
        c = cfg.kwargs
        cases.append(InspectCase(
            name=f"cos_lse_fwd{'T' if c['TRANSPOSED'] else ''}[{c['BLOCK_B']}x{c['BLOCK_M']}x{block_d} "
                 f"w{cfg.num_warps} s{cfg.num_stages}]",
            fn=_fwd_kernel, signature=fwd_sig,
            constexprs=dict(dots, TAU=TAU, BLOCK_B=c["BLOCK_B"], BLOCK_M=c["BLOCK_M"], BLOCK_D=block_d,
                            TRANSPOSED=c["TRANSPOSED"]),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            logits_per_iteration=c["BLOCK_B"] * c["BLOCK_M"], notes=f"{dtype}->{op}",
            divisible_by_16=div16))
    bwd_sig = dict(xh_ptr=ptr[op], gs_ptr="*fp32", w_ptr=ptr[dtype], rw_ptr="*fp32",
                   rlab_ptr="*i32", clab_ptr="*i32", lse2_ptr="*fp32", gw_ptr=ptr[dtype],
                   gmax_ptr="*fp32", B="i32", M="i32", D="i32", stride_x="i32", stride_w="i32",
                   stride_g="i32", c1="fp32", KEY_B="i32", KEY_M="i32")
    for cfg in _configs("bwd_w", block_d, op.itemsize, dtype.itemsize):
        c = cfg.kwargs
        cases.append(InspectCase(
            name=f"cos_lse_bwd_w[{c['BLOCK_M']}x{c['BLOCK_B']}x{block_d} w{cfg.num_warps} s{cfg.num_stages}]",
            fn=_bwd_w_kernel, signature=bwd_sig,
            constexprs=dict(dots, NORMALIZE_W=True, BLOCK_M=c["BLOCK_M"], BLOCK_B=c["BLOCK_B"],
                            BLOCK_D=block_d),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            logits_per_iteration=c["BLOCK_M"] * c["BLOCK_B"], notes=f"{dtype}->{op}",
            divisible_by_16=div16))
    return cases
