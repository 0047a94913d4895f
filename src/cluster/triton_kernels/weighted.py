"""Weighted features: ``out[b, i, w, c] = sum_j weights[b, i, j, w] * feat[b, idx[b, i, j], c]``,
forward and backward, with their launches (``_wf_forward``, ``_wf_backward``).

d_weights gathers the features again per slot; d_feat walks the stable-sort reverse map
(reverse_map._reverse_map), so it takes no atomics and sums in a fixed order. Tiles are
[rows, slots, BLOCK_C] gathers sized by ``tuning.TILE_BUDGET``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, tuning
from .common import _cdiv, _device_guard, _gather_rows, _lastdim_unit, _np2, _tl_acc
from .launch import _Launch
from .reverse_map import _reverse_map


def _row_blocks(block_d: int, n_slots: int, dtype: torch.dtype):
    """(rows per program, slots per chunk) of a weighted-feature [rows, slots, block_d] tile."""
    budget = tuning.TILE_BUDGET // (2 if dtype == torch.float64 else 1)
    rows = 16 if block_d <= 16 else 8
    if launch._INTERPRET:
        budget, rows = 1 << 16, 64
    slots = max(1, min(32, budget // (rows * block_d)))
    return rows, min(_np2(n_slots), slots)


def _wf_blocks(C: int, M: int, dtype: torch.dtype) -> tuple[int, int, int]:
    block_c = min(_np2(C), 64)
    rows, slots = _row_blocks(block_c, M, dtype)
    return rows, slots, block_c


@_Launch
@triton.jit
def _wf_fwd_kernel(WT, F, OUT, IDX,
                   swb, swn, swm, sww, sfb, sfn,
                   N, M, W, C,
                   BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                   ACC: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < N
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    IDX += b * N * M
    WT += b * swb
    F += b * sfb
    OUT += b * N * W * C
    for w in range(W):
        acc = tl.zeros([BLOCK_Q, BLOCK_C], ACC)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            ok = q_ok[:, None] & (offs_m[None, :] < M)
            idx = tl.load(IDX + offs_q[:, None] * M + offs_m[None, :], mask=ok, other=0)
            wt = tl.load(WT + offs_q[:, None] * swn + offs_m[None, :] * swm + w * sww,
                         mask=ok, other=0.0).to(ACC)
            ft = _gather_rows(F, 0, idx, offs_c, ok[:, :, None] & c_ok[None, None, :], sfn, ACC)
            acc += tl.sum(wt[:, :, None] * ft, 1)
        tl.store(OUT + (offs_q[:, None] * W + w) * C + offs_c[None, :],
                 acc.to(OUT.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


@_Launch
@triton.jit
def _wf_bwd_w_kernel(DO, F, DW, IDX,
                     sdb, sdn, sdw, sfb, sfn,
                     N, M, W, C,
                     BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr):
    """d_weights[b,i,j,w] = <dout[b,i,w,:], feat[b, idx[b,i,j], :]>."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < N
    IDX += b * N * M
    DO += b * sdb
    F += b * sfb
    DW += b * N * M * W
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ok = q_ok[:, None] & (offs_m[None, :] < M)
        idx = tl.load(IDX + offs_q[:, None] * M + offs_m[None, :], mask=ok, other=0)
        for w in range(W):
            acc = tl.zeros([BLOCK_Q, BLOCK_M], ACC)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < C
                ft = _gather_rows(F, 0, idx, offs_c, ok[:, :, None] & c_ok[None, None, :], sfn,
                                  ACC)
                do = tl.load(DO + offs_q[:, None] * sdn + w * sdw + offs_c[None, :],
                             mask=q_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
                acc += tl.sum(ft * do[:, None, :], 2)
            tl.store(DW + (offs_q[:, None] * M + offs_m[None, :]) * W + w,
                     acc.to(DW.dtype.element_ty), mask=ok)


@_Launch
@triton.jit
def _wf_bwd_f_kernel(DO, WT, DF, PERM, PTR,
                     sdb, sdn, sdw, swb, swn, swm, sww,
                     N, Nf, M, W, C,
                     BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr):
    """d_feat[b,n,:] = sum over slots (i,j) naming n of sum_w weights[b,i,j,w] dout[b,i,w,:],
    walked through the reverse map: no atomics, fixed order."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < Nf
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    PTR += b * (Nf + 1)
    PERM += b * N * M
    DO += b * sdb
    WT += b * swb
    DF += b * Nf * C
    start = tl.load(PTR + offs_k, mask=k_ok, other=0)
    cnt = tl.load(PTR + offs_k + 1, mask=k_ok, other=0) - start
    n_max = tl.max(cnt, 0)
    acc = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    for e0 in range(0, n_max, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        ok = offs_e[None, :] < cnt[:, None]
        slot = tl.load(PERM + start[:, None] + offs_e[None, :], mask=ok, other=0)
        qi = slot // M
        sj = slot - qi * M
        ec_ok = ok[:, :, None] & c_ok[None, None, :]
        for w in range(W):
            wt = tl.load(WT + qi * swn + sj * swm + w * sww, mask=ok, other=0.0).to(ACC)
            do = tl.load(DO + qi[:, :, None] * sdn + w * sdw + offs_c[None, None, :],
                         mask=ec_ok, other=0.0).to(ACC)
            acc += tl.sum(wt[:, :, None] * do, 1)
    tl.store(DF + offs_k[:, None] * C + offs_c[None, :], acc.to(DF.dtype.element_ty),
             mask=k_ok[:, None] & c_ok[None, :])


def _wf_forward(weights, feat, member_idx):
    B, N, M, W = weights.shape
    C = feat.shape[-1]
    feat = _lastdim_unit(feat)
    idx = member_idx.contiguous()
    out = torch.empty((B, N, W, C), dtype=feat.dtype, device=feat.device)
    BQ, BM, BC = _wf_blocks(C, M, feat.dtype)
    grid = (_cdiv(N, BQ), _cdiv(C, BC), B)
    with _device_guard(feat):
        _wf_fwd_kernel[grid](
            weights, feat, out, idx,
            weights.stride(0), weights.stride(1), weights.stride(2), weights.stride(3),
            feat.stride(0), feat.stride(1),
            N, M, W, C, BLOCK_Q=BQ, BLOCK_M=BM, BLOCK_C=BC, ACC=_tl_acc(feat.dtype),
            num_warps=tuning.NUM_WARPS,
        )
    return out


def _wf_backward(dout, weights, feat, member_idx, need_w, need_f):
    B, N, M, W = weights.shape
    Nf, C = feat.shape[1], feat.shape[2]
    feat, dout = _lastdim_unit(feat), _lastdim_unit(dout)
    idx = member_idx.contiguous()
    BQ, BM, BC = _wf_blocks(C, M, feat.dtype)
    acc = _tl_acc(feat.dtype)
    dw = weights.new_empty(0)
    df = feat.new_empty(0)
    with _device_guard(feat):
        if need_w:
            dw = torch.empty((B, N, M, W), dtype=weights.dtype, device=feat.device)
            _wf_bwd_w_kernel[(_cdiv(N, BQ), B)](
                dout, feat, dw, idx, dout.stride(0), dout.stride(1), dout.stride(2),
                feat.stride(0), feat.stride(1), N, M, W, C,
                BLOCK_Q=BQ, BLOCK_M=BM, BLOCK_C=BC, ACC=acc, num_warps=tuning.NUM_WARPS,
            )
        if need_f:
            df = torch.empty((B, Nf, C), dtype=feat.dtype, device=feat.device)
            perm, ptr = _reverse_map(idx, None, Nf)
            _wf_bwd_f_kernel[(_cdiv(Nf, BQ), _cdiv(C, BC), B)](
                dout, weights, df, perm, ptr, dout.stride(0), dout.stride(1), dout.stride(2),
                weights.stride(0), weights.stride(1), weights.stride(2), weights.stride(3),
                N, Nf, M, W, C, BLOCK_K=BQ, BLOCK_E=BM, BLOCK_C=BC, ACC=acc,
                num_warps=tuning.NUM_WARPS,
            )
    return dw, df
