"""Triton kernels of the fused margin cross-entropy (margins with m1 = 1: CosFace, ArcFace and
their sum). Flash-style: the forward walks W in tiles keeping a running log-sum-exp per row; the
backward recomputes each tile. x arrives as unit rows (a [B, D] copy is cheap); W is read as is
and scaled by its inverse row norms, computed once per call.

Launchers take float tensors on one device and return float32 per-row statistics; the autograd
and op registration live in protomem/ops/margin_ce.py."""
import math

import torch
import triton
import triton.language as tl

from ..margins import SIN_FLOOR, CombinedMargin

_SIN_FLOOR = tl.constexpr(SIN_FLOOR)  # a jit function reads globals only as constexpr

# Candidate tile shapes for autotuning on a GPU (issue 7); the interpreter uses the first.
CONFIGS = [
    dict(BLOCK_B=64, BLOCK_M=64, BLOCK_D=64),
    dict(BLOCK_B=128, BLOCK_M=64, BLOCK_D=64),
    dict(BLOCK_B=64, BLOCK_M=128, BLOCK_D=64),
]


@triton.jit
def _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, M, D, stride_x, stride_w,
              BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        xa = tl.load(xh_ptr + rows[:, None] * stride_x + dd[None, :],
                     mask=(rows[:, None] < B) & (dd[None, :] < D), other=0.0)
        wa = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :],
                     mask=(cols[:, None] < M) & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.dot(xa, tl.trans(wa), input_precision="ieee")
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
def _fwd_kernel(xh_ptr, w_ptr, winv_ptr, rlab_ptr, clab_ptr, lse_ptr, tgt_ptr, bt_ptr, bo_ptr,
                B, M, D, stride_x, stride_w, s, cos_m, sin_m, sinmm, m3,
                WITH_POS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_lab = tl.load(rlab_ptr + rows, mask=rows < B, other=-1)
    m_all = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    l_all = tl.zeros((BLOCK_B,), tl.float32)
    m_t = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_B,), tl.float32)
    best_t = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_o = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_lab = tl.load(clab_ptr + cols, mask=cols < M, other=-1)
        cos = _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, M, D, stride_x, stride_w,
                        BLOCK_B, BLOCK_M, BLOCK_D)
        logit, same, keep = _logits(cos, row_lab, col_lab, cols, M, s, cos_m, sin_m, sinmm, m3, WITH_POS)
        m_new = tl.maximum(m_all, tl.max(logit, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_all = l_all * tl.exp(m_all - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)
        m_all = m_new
        other = keep & (same == 0)
        best_o = tl.maximum(best_o, tl.max(tl.where(other, cos, float("-inf")), 1))
        if not WITH_POS:
            tl_ = tl.where(same, logit, float("-inf"))
            mt_new = tl.maximum(m_t, tl.max(tl_, 1))
            mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            l_t = l_t * tl.exp(m_t - mt_safe) + tl.sum(tl.exp(tl_ - mt_safe[:, None]), 1)
            m_t = mt_new
            best_t = tl.maximum(best_t, tl.max(tl.where(same, cos, float("-inf")), 1))
    lse = tl.where(l_all > 0, m_all + tl.log(tl.maximum(l_all, 1e-30)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=rows < B)
    tl.store(bo_ptr + rows, best_o, mask=rows < B)
    if not WITH_POS:
        tl.store(tgt_ptr + rows, tl.where(l_t > 0, m_t + tl.log(tl.maximum(l_t, 1e-30)), float("-inf")),
                 mask=rows < B)
        tl.store(bt_ptr + rows, best_t, mask=rows < B)


@triton.jit
def _dcos_tile(cos, row_lab, col_lab, cols, M, lse, tgt, a, b, s, cos_m, sin_m, sinmm, m3,
               WITH_POS: tl.constexpr):
    logit, same, keep = _logits(cos, row_lab, col_lab, cols, M, s, cos_m, sin_m, sinmm, m3, WITH_POS)
    dlogit = tl.exp(logit - lse[:, None]) * a[:, None]
    if WITH_POS:
        return dlogit * s
    dlogit += tl.where(same, tl.exp(logit - tgt[:, None]), 0.0) * b[:, None]
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


@triton.jit
def _bwd_x_kernel(xh_ptr, w_ptr, winv_ptr, rlab_ptr, clab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr,
                  g_ptr, B, M, D, stride_x, stride_w, s, cos_m, sin_m, sinmm, m3,
                  WITH_POS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """G[rows, d-block] = sum_j dcos[rows, j] * W[j, d-block] / |W_j|; grid (row blocks, d blocks)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_lab, lse, tgt, a, b = _row_stats(rlab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr, rows, B)
    G = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_lab = tl.load(clab_ptr + cols, mask=cols < M, other=-1)
        cos = _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, M, D, stride_x, stride_w,
                        BLOCK_B, BLOCK_M, BLOCK_D)
        dcos = _dcos_tile(cos, row_lab, col_lab, cols, M, lse, tgt, a, b, s, cos_m, sin_m, sinmm, m3, WITH_POS)
        winv = tl.load(winv_ptr + cols, mask=cols < M, other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :],
                     mask=(cols[:, None] < M) & (dd[None, :] < D), other=0.0).to(tl.float32)
        G += tl.dot(dcos * winv[None, :], wt, input_precision="ieee")
    tl.store(g_ptr + rows[:, None] * D + dd[None, :], G, mask=(rows[:, None] < B) & (dd[None, :] < D))


@triton.jit
def _bwd_w_kernel(xh_ptr, w_ptr, winv_ptr, rlab_ptr, clab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr,
                  h_ptr, B, M, D, stride_x, stride_w, s, cos_m, sin_m, sinmm, m3,
                  WITH_POS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """H[cols, d-block] = sum_i dcos[i, cols] * xh[i, d-block]; grid (column blocks, d blocks)."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_lab = tl.load(clab_ptr + cols, mask=cols < M, other=-1)
    H = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for i0 in range(0, B, BLOCK_B):
        rows = i0 + tl.arange(0, BLOCK_B)
        row_lab, lse, tgt, a, b = _row_stats(rlab_ptr, lse_ptr, tgt_ptr, a_ptr, b_ptr, rows, B)
        cos = _cos_tile(xh_ptr, w_ptr, winv_ptr, rows, cols, B, M, D, stride_x, stride_w,
                        BLOCK_B, BLOCK_M, BLOCK_D)
        dcos = _dcos_tile(cos, row_lab, col_lab, cols, M, lse, tgt, a, b, s, cos_m, sin_m, sinmm, m3, WITH_POS)
        xt = tl.load(xh_ptr + rows[:, None] * stride_x + dd[None, :],
                     mask=(rows[:, None] < B) & (dd[None, :] < D), other=0.0)
        H += tl.dot(tl.trans(dcos), xt, input_precision="ieee")
    tl.store(h_ptr + cols[:, None] * D + dd[None, :], H, mask=(cols[:, None] < M) & (dd[None, :] < D))


def _margin_args(scale, m2, m3):
    return dict(s=float(scale), cos_m=math.cos(m2), sin_m=math.sin(m2), sinmm=m2 * math.sin(m2), m3=float(m3))


def _prepare(x, W, normalize_x, normalize_w):
    xf = x.float()
    x_inv = 1 / xf.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize_x else torch.ones_like(xf[:, :1])
    w_inv = 1 / W.float().norm(dim=1).clamp_min(1e-12) if normalize_w else W.new_ones(W.shape[0], dtype=torch.float32)
    return (xf * x_inv).contiguous(), x_inv, w_inv.contiguous(), W.contiguous()


def margin_ce_fwd_triton(x, W, row_labels, col_labels, pos_cos, scale, m1, m2, m3, normalize_x,
                         normalize_w, config=CONFIGS[0]):
    """(lse, target, best_target, best_other), each [B] float32; as protomem.ops.margin_ce_fwd
    (m1 = 1)."""
    if m1 != 1.0:
        raise ValueError("the Triton margin cross-entropy supports m1 = 1 only")
    xh, _, w_inv, Wc = _prepare(x, W, normalize_x, normalize_w)
    B, D = xh.shape
    M = Wc.shape[0]
    lse, tgt, bt, bo = (torch.empty(B, device=x.device, dtype=torch.float32) for _ in range(4))
    grid = (triton.cdiv(B, config["BLOCK_B"]),)
    _fwd_kernel[grid](xh, Wc, w_inv, row_labels.contiguous(), col_labels.contiguous(), lse, tgt,
                      bt, bo, B, M, D, xh.stride(0), Wc.stride(0), **_margin_args(scale, m2, m3),
                      WITH_POS=pos_cos is not None, **config)
    if pos_cos is not None:
        pos = pos_cos.float()
        tgt = scale * CombinedMargin(scale, 1.0, m2, m3).target_cos(pos)
        lse = torch.logaddexp(lse, tgt)
        bt = pos.clone()  # an output must not alias the pos_cos input
    return lse, tgt, bt, bo


def margin_ce_bwd_triton(grad_lse, grad_target, x, W, row_labels, col_labels, pos_cos, lse, target,
                         scale, m1, m2, m3, normalize_x, normalize_w, need_grad_w, config=CONFIGS[0]):
    """(grad_x, grad_W or None, grad_pos_cos or None); as protomem.ops.margin_ce_bwd (m1 = 1)."""
    xh, x_inv, w_inv, Wc = _prepare(x, W, normalize_x, normalize_w)
    B, D = xh.shape
    M = Wc.shape[0]
    a = grad_lse.float().contiguous()
    b = grad_target.float().masked_fill(torch.isinf(target), 0).contiguous()
    tgt = target.float().masked_fill(torch.isinf(target), 0).contiguous()
    lse = lse.float().contiguous()
    rl, cl = row_labels.contiguous(), col_labels.contiguous()
    margin = _margin_args(scale, m2, m3)
    with_pos = pos_cos is not None
    G = torch.empty(B, D, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(B, config["BLOCK_B"]), triton.cdiv(D, config["BLOCK_D"]))
    _bwd_x_kernel[grid](xh, Wc, w_inv, rl, cl, lse, tgt, a, b, G, B, M, D, xh.stride(0), Wc.stride(0),
                        **margin, WITH_POS=with_pos, **config)
    grad_x = (G - xh * (G * xh).sum(1, keepdim=True)) * x_inv if normalize_x else G
    grad_w = None
    if need_grad_w:
        H = torch.empty(M, D, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(D, config["BLOCK_D"]))
        _bwd_w_kernel[grid](xh, Wc, w_inv, rl, cl, lse, tgt, a, b, H, B, M, D, xh.stride(0), Wc.stride(0),
                            **margin, WITH_POS=with_pos, **config)
        if normalize_w:
            wh = Wc.float() * w_inv[:, None]
            H = (H - wh * (H * wh).sum(1, keepdim=True)) * w_inv[:, None]
        grad_w = H.to(W.dtype)
    grad_pos = None
    if with_pos:
        pos = pos_cos.float()
        sin_t = torch.sqrt((1 - pos * pos).clamp_min(0)).clamp_min(SIN_FLOOR)
        dphi = torch.where(pos > -math.cos(m2), math.cos(m2) + pos * math.sin(m2) / sin_t, torch.ones_like(pos))
        grad_pos = ((a * torch.exp(target.float() - lse) + grad_target.float()) * scale * dphi).to(pos_cos.dtype)
    return grad_x.to(x.dtype), grad_w, grad_pos
