"""The backward's query side: Delta, dq, the blank's partial sums and the bias-table
gradient's terms, by the per-query kernel or the query-cluster kernel, and their launch.

``_blocks`` decides which kernel runs (``common._group_blocks``, ``tuning.TUNING_GROUP``),
``_bwd_q`` launches it; backward.py calls both. Both kernels share the prologue (Delta,
the blank key's share) and the bias-table step (``_bwd_q_dpe``: float atomics into
replicas, ds to a buffer, or int64 fixed point with the scale ``_dpe_fixed_scale``
derives on the device). No float atomics touch dq or the blank sums, so those are
bitwise reproducible in both modes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tuning, union
from .common import (
    _GROUP,
    _attn_blocks,
    _batch_heads,
    _cdiv,
    _chunk_logits,
    _chunk_slots,
    _dot_flags,
    _gather_rows,
    _group_blocks,
    _group_slots,
    _load_slots,
    _maxnreg,
    _mma,
    _np2,
    _rows_left_by_map,
    _rows_of_broken_groups,
    _test_slots,
    _tl_acc,
)
from .launch import _Launch
from .union import _union_chunk


@triton.jit
def _dpe_fixed_scale(AMAX_DO, AMAX_V, log2_c):
    """Fixed-point scale S of the deterministic d_pe_table: a power of two such that the sum
    of |ds| * S over the whole call stays below 2^61, so no int64 partial sum overflows.

    Bound: ds_j = p_j (dp_j - delta) with dp_j = dout . v_j and delta the p-weighted mean of
    the dp (blank included), so |ds_j| <= 2 p_j A with A = D max|dout| max|v|, and the p of
    one query and head sum to at most 1: the call's sum of |ds| is at most 2 A n_queries;
    ``log2_c`` = log2(4 D n_queries) adds a factor 2 for float32 rounding. Each ds is then
    rounded to a multiple of 1/S, at most 2^-62 of that bound: negligible next to the
    gradient's largest entries. S = 0 flags non-finite inputs (the sums then come out NaN).
    """
    lg = tl.log2(tl.load(AMAX_DO).to(tl.float32)) + tl.log2(tl.load(AMAX_V).to(tl.float32))
    e = tl.floor(61.0 - (lg + log2_c))
    # NaN (checked before tl.minimum, which drops NaN on the GPU) or an infinite bound: S = 0.
    ok = (e == e) & (e >= -126.0)
    # Zero inputs give e = +inf: S = 2^121, still a float32, and every ds is 0 anyway.
    return tl.where(ok, tl.exp2(tl.minimum(e, 121.0)), 0.0)


@triton.jit
def _dpe_step_scale(AMAX_DO, AMAX_V, DPE_SCALE, log2_c, first, DPE_MODE: tl.constexpr):
    """DPE_MODE 3's fixed-point scale (0.0 in the other modes); the first program stores
    it for the host, which divides the int64 sums by it."""
    dpe_scale = 0.0
    if DPE_MODE == 3:
        dpe_scale = _dpe_fixed_scale(AMAX_DO, AMAX_V, log2_c)
        if first:
            tl.store(DPE_SCALE, dpe_scale)
    return dpe_scale


@triton.jit
def _bwd_q_prologue(
    O, DO, LSE, DELTA, BK, BV, DBK_PART, DBV_PART, h, lin, offs_q, q_ok, qs,
    soh, son, sdoh, sdon, sbkh, sbvh, H, N, D,
    HAS_BLANK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Head h of the program's query rows (qs: their q times the scale): Delta (stored),
    lse, dout, and dq's start, i.e. the blank key's share; the blank's partial sums of
    dblank_k / dblank_v go to one [H, D] row per program (``lin``), added up by _backward_tail_kernel:
    fixed order, no atomics."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qd_ok = q_ok[:, None] & d_ok[None, :]
    do = tl.load(DO + h * sdoh + offs_q[:, None] * sdon + offs_d[None, :], mask=qd_ok,
                 other=0.0).to(ACC)
    o = tl.load(O + h * soh + offs_q[:, None] * son + offs_d[None, :], mask=qd_ok,
                other=0.0).to(ACC)
    # O already holds the blank's share, so this is the full sum_j p_j dp_j.
    delta = tl.sum(do * o, 1)
    tl.store(DELTA + h * N + offs_q, delta, mask=q_ok)
    lse = tl.load(LSE + h * N + offs_q, mask=q_ok, other=float("inf"))
    dq = tl.zeros_like(do)
    if HAS_BLANK:
        bk = tl.load(BK + h * sbkh + offs_d, mask=d_ok, other=0.0).to(ACC)
        bv = tl.load(BV + h * sbvh + offs_d, mask=d_ok, other=0.0).to(ACC)
        pb = tl.exp(tl.sum(qs * bk[None, :], 1) - lse)
        pb = tl.where(q_ok, pb, 0.0)
        dsb = pb * (tl.sum(do * bv[None, :], 1) - delta)
        dq += dsb[:, None] * bk[None, :]
        tl.store(DBK_PART + (lin * H + h) * D + offs_d, tl.sum(dsb[:, None] * qs, 0),
                 mask=d_ok)
        tl.store(DBV_PART + (lin * H + h) * D + offs_d, tl.sum(pb[:, None] * do, 0),
                 mask=d_ok)
    return do, delta, lse, dq


@triton.jit
def _bwd_q_dpe(DPE, DSBUF, ds, pe, ok, off, rep, h, T, H, dpe_scale, DPE_MODE: tl.constexpr):
    """ds of head h into the bias-table gradient (see _attn_bwd_q_kernel's DPE_MODE)."""
    if DPE_MODE == 1:
        # Relaxed: the sums are read only after the kernel; acq_rel (triton's default)
        # would order each of these against the program's other accesses.
        tl.atomic_add(DPE + (rep * T + pe) * H + h, ds, mask=ok, sem="relaxed")
    if DPE_MODE == 2:
        tl.store(DSBUF + off * H + h, ds, mask=ok)
    if DPE_MODE == 3:
        fx = ds * dpe_scale
        fx = tl.where(fx >= 0, fx + 0.5, fx - 0.5).to(tl.int64)
        tl.atomic_add(DPE + (rep * T + pe) * H + h, fx, mask=ok, sem="relaxed")


@triton.jit
def _bwd_q_rows(
    Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV, DPE, DSBUF, DBK_PART,
    DBV_PART, h, lin, rep, dpe_scale, offs_q, q_ok, row_off, idx0, pe0, ok0, off0,
    sqh, sqn, skh, skn, svh, svn, soh, son, sdoh, sdon, spet, speh, sbkh, sbvh,
    H, N, M, D, T, scale_hi, scale_lo,
    HAS_PE: tl.constexpr, DPE_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BLANK: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Head h of a row block, each query gathering its own keys (any member_idx), BLOCK_M
    slots per chunk. Pointers are already offset to the batch."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qd_ok = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + h * sqh + offs_q[:, None] * sqn + offs_d[None, :], mask=qd_ok,
                other=0.0).to(ACC)
    qs = q * scale_hi + q * scale_lo
    do, delta, lse, dq = _bwd_q_prologue(
        O, DO, LSE, DELTA, BK, BV, DBK_PART, DBV_PART, h, lin, offs_q, q_ok, qs, soh, son,
        sdoh, sdon, sbkh, sbvh, H, N, D, HAS_BLANK, BLOCK_D, ACC)
    for m0 in range(0, M, BLOCK_M):
        if ONE_CHUNK:
            idx, pe, ok, off = idx0, pe0, ok0, off0
        else:
            idx, pe, ok, off = _load_slots(IDX, PEIDX, MASK, row_off, q_ok, m0, M,
                                           HAS_PE, HAS_MASK, BLOCK_M)
        s, kt, kd_ok = _chunk_logits(K, PE, h, qs, idx, pe, ok, offs_d, d_ok, skh, skn,
                                     spet, speh, HAS_PE, ACC)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        vt = _gather_rows(V, h * svh, idx, offs_d, kd_ok, svn, ACC)
        dp = tl.sum(do[:, None, :] * vt, 2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * kt, 1)
        _bwd_q_dpe(DPE, DSBUF, ds, pe, ok, off, rep, h, T, H, dpe_scale, DPE_MODE)
    dq = dq * scale_hi + dq * scale_lo
    tl.store(DQ + h * soh + offs_q[:, None] * son + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_ok)


@triton.jit
def _bwd_q_batch(Q, K, V, O, DO, DQ, LSE, DELTA, IDX, PEIDX, MASK, DSBUF, b,
                 sqb, skb, svb, sob, sdob, H, N, M, D):
    """The query-side kernels' pointers offset to batch b."""
    return (Q + b * sqb, K + b * skb, V + b * svb, O + b * sob, DO + b * sdob,
            DQ + b * sob, LSE + b * H * N, DELTA + b * H * N, IDX + b * N * M,
            PEIDX + b * N * M, MASK + b * N * M, DSBUF + b * N * M * H)


@_Launch
@triton.jit
def _attn_bwd_q_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV,
    DPE, DSBUF, AMAX_DO, AMAX_V, DPE_SCALE, DBK_PART, DBV_PART, UINFO,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    spet, speh, sbkh, sbvh,
    H, N, M, D, T, R, scale_hi, scale_lo, HPG, NHG, log2_c,
    HAS_PE: tl.constexpr, DPE_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BLANK: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    BROKEN_ONLY: tl.constexpr, GROUP: tl.constexpr, TEST_M: tl.constexpr,
    MAPPED: tl.constexpr,
):
    """Query side: Delta, dq, the blank's partial sums and the bias-table gradient. With
    BROKEN_ONLY it runs after the query-cluster kernel, in blocks of GROUP rows, and takes
    only the groups that do not share a key list (the other kernel took the rest); with
    MAPPED, only the groups the union map left to it (common._rows_left_by_map).

    DPE_MODE 0: no table gradient; 1: float atomics into DPE [R, T, H], replica
    ``lin % R``; 2: ds written to DSBUF [B, N, M, H] for a deterministic segment sum
    afterwards; 3: like 1, but ds * S rounded to int64 (fixed point, S from
    _dpe_fixed_scale, stored to DPE_SCALE by the first program): integer sums are exact,
    so the result is the same in any order.
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    # Head groups of one row block write disjoint heads of the same partial row.
    lin = b * tl.num_programs(0) + pid
    # Neighbouring programs (which run at the same time) add into different replicas.
    rep = lin % R
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < N
    row_off = offs_q * M
    Q, K, V, O, DO, DQ, LSE, DELTA, IDX, PEIDX, MASK, DSBUF = _bwd_q_batch(
        Q, K, V, O, DO, DQ, LSE, DELTA, IDX, PEIDX, MASK, DSBUF, b, sqb, skb, svb, sob, sdob,
        H, N, M, D)
    dpe_scale = _dpe_step_scale(AMAX_DO, AMAX_V, DPE_SCALE, log2_c, (pid == 0) & (pid_bh == 0),
                                DPE_MODE)
    if MAPPED:
        q_ok = _rows_left_by_map(UINFO, b, offs_q, q_ok, N, GROUP, MAPPED)
    elif BROKEN_ONLY:
        q_ok = _rows_of_broken_groups(IDX, MASK, offs_q, q_ok, M, HAS_MASK, GROUP, BLOCK_Q,
                                      TEST_M)
    if tl.max(q_ok.to(tl.int32), 0) > 0:
        idx0, pe0, ok0, off0 = 0, 0, 0, 0
        if ONE_CHUNK:
            idx0, pe0, ok0, off0 = _load_slots(IDX, PEIDX, MASK, row_off, q_ok, 0, M,
                                               HAS_PE, HAS_MASK, BLOCK_M)
        for h in range(h_lo, h_hi):
            _bwd_q_rows(Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV, DPE,
                        DSBUF, DBK_PART, DBV_PART, h, lin, rep, dpe_scale, offs_q, q_ok,
                        row_off, idx0, pe0, ok0, off0, sqh, sqn, skh, skn, svh, svn, soh, son,
                        sdoh, sdon, spet, speh, sbkh, sbvh, H, N, M, D, T, scale_hi, scale_lo,
                        HAS_PE, DPE_MODE, HAS_MASK, HAS_BLANK, ONE_CHUNK, BLOCK_M, BLOCK_D,
                        ACC)


@_Launch
@triton.jit
def _attn_bwd_q_cluster_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV,
    DPE, DSBUF, AMAX_DO, AMAX_V, DPE_SCALE, DBK_PART, DBV_PART,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    spet, speh, sbkh, sbvh,
    H, N, M, D, T, R, scale_hi, scale_lo, HPG, NHG, log2_c,
    HAS_PE: tl.constexpr, DPE_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BLANK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):
    """Query side by query cluster, one program per GROUP queries: _attn_bwd_q_kernel's
    work, but a group sharing its key list (the shared lists' layout) gathers the keys
    and values once and takes the scores, dp = dout v^T and dq += ds k as tl.dot products
    of GROUP rows, as _attn_fwd_cluster_kernel does. A group that does not share is left
    to the per-query kernel launched after this one (BROKEN_ONLY, GROUP-row blocks: the
    same partial rows of the blank's sums)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    lin = b * tl.num_programs(0) + pid
    rep = lin % R
    Q, K, V, O, DO, DQ, LSE, DELTA, IDX, PEIDX, MASK, DSBUF = _bwd_q_batch(
        Q, K, V, O, DO, DQ, LSE, DELTA, IDX, PEIDX, MASK, DSBUF, b, sqb, skb, svb, sob, sdob,
        H, N, M, D)
    dpe_scale = _dpe_step_scale(AMAX_DO, AMAX_V, DPE_SCALE, log2_c, (pid == 0) & (pid_bh == 0),
                                DPE_MODE)
    offs_q, q_ok, pe, ok, lead, live, shared = _group_slots(
        IDX, PEIDX, MASK, pid, N, M, HAS_PE, HAS_MASK, GROUP, 1, BLOCK_M)
    if shared:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        qd_ok = q_ok[:, None] & d_ok[None, :]
        kv_ok = live[:, None] & d_ok[None, :]
        off = offs_q[:, None] * M + tl.arange(0, BLOCK_M)[None, :]
        for h in range(h_lo, h_hi):
            q = tl.load(Q + h * sqh + offs_q[:, None] * sqn + offs_d[None, :], mask=qd_ok,
                        other=0.0)
            qs = q.to(ACC)
            qs = qs * scale_hi + qs * scale_lo
            do, delta, lse, dq = _bwd_q_prologue(
                O, DO, LSE, DELTA, BK, BV, DBK_PART, DBV_PART, h, lin, offs_q, q_ok, qs, soh,
                son, sdoh, sdon, sbkh, sbvh, H, N, D, HAS_BLANK, BLOCK_D, ACC)
            k = tl.load(K + h * skh + lead[:, None] * skn + offs_d[None, :], mask=kv_ok,
                        other=0.0)
            s = _mma(q, tl.trans(k), UPCAST).to(ACC)
            s = s * scale_hi + s * scale_lo
            if HAS_PE:
                s += tl.load(PE + pe * spet + h * speh, mask=ok, other=0.0).to(ACC)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            v = tl.load(V + h * svh + lead[:, None] * svn + offs_d[None, :], mask=kv_ok,
                        other=0.0)
            # dout in its own dtype again (exact: it was widened from it).
            dp = _mma(do.to(v.dtype), tl.trans(v), UPCAST).to(ACC)
            ds = p * (dp - delta[:, None])
            if SPLIT:
                # ds as hi + lo 16-bit parts, as p in the forward.
                ds_hi = ds.to(k.dtype)
                ds_lo = (ds - ds_hi.to(ACC)).to(k.dtype)
                dq += _mma(ds_hi, k, UPCAST) + _mma(ds_lo, k, UPCAST)
            else:
                dq += _mma(ds.to(k.dtype), k, UPCAST).to(ACC)
            _bwd_q_dpe(DPE, DSBUF, ds, pe, ok, off, rep, h, T, H, dpe_scale, DPE_MODE)
            dq = dq * scale_hi + dq * scale_lo
            tl.store(DQ + h * soh + offs_q[:, None] * son + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=qd_ok)


@_Launch
@triton.jit
def _attn_bwd_q_union_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, PEIDX, MASK, PE, BK, BV,
    DPE, DSBUF, AMAX_DO, AMAX_V, DPE_SCALE, DBK_PART, DBV_PART, UC, SLOT, UINFO,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    spet, speh, sbkh, sbvh,
    H, N, M, D, T, R, scale_hi, scale_lo, HPG, NHG, log2_c,
    HAS_PE: tl.constexpr, DPE_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BLANK: tl.constexpr, GROUP: tl.constexpr, UCAP: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):
    """Query side of the groups the map gives the union kernels: backward_q's
    _attn_bwd_q_kernel (Delta, dq, the blank's partial row, the bias-table terms; see its
    DPE_MODE) with scores, dp = dout v^T and dq += ds k as tl.dot products over chunks of
    CHUNK union entries."""
    g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    lin = b * tl.num_programs(0) + g
    rep = lin % R
    dpe_scale = _dpe_step_scale(AMAX_DO, AMAX_V, DPE_SCALE, log2_c, (g == 0) & (pid_bh == 0),
                                DPE_MODE)
    n_u = tl.load(UINFO + lin)
    if n_u >= 0:
        BLOCK_K: tl.constexpr = CHUNK * GROUP
        Q += b * sqb
        K += b * skb
        V += b * svb
        O += b * sob
        DO += b * sdob
        DQ += b * sob
        LSE += b * H * N
        DELTA += b * H * N
        PEIDX += b * N * M
        MASK += b * N * M
        DSBUF += b * N * M * H
        UC += lin * UCAP
        SLOT += lin * UCAP * GROUP
        offs_q = g * GROUP + tl.arange(0, GROUP)
        q_ok = offs_q < N
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        qd_ok = q_ok[:, None] & d_ok[None, :]
        for h in range(h_lo, h_hi):
            q = tl.load(Q + h * sqh + offs_q[:, None] * sqn + offs_d[None, :], mask=qd_ok,
                        other=0.0)
            qs = q.to(ACC)
            qs = qs * scale_hi + qs * scale_lo
            do, delta, lse, dq = _bwd_q_prologue(
                O, DO, LSE, DELTA, BK, BV, DBK_PART, DBV_PART, h, lin, offs_q, q_ok, qs, soh,
                son, sdoh, sdon, sbkh, sbvh, H, N, D, HAS_BLANK, BLOCK_D, ACC)
            for u0 in range(0, n_u, CHUNK):
                keys, k_ok, ok, pe, off = _union_chunk(UC, SLOT, PEIDX, MASK, u0, n_u, offs_q,
                                                       q_ok, N, M, HAS_PE, HAS_MASK, GROUP,
                                                       BLOCK_K)
                kd_ok = k_ok[:, None] & d_ok[None, :]
                k = tl.load(K + h * skh + keys[:, None] * skn + offs_d[None, :], mask=kd_ok,
                            other=0.0)
                s = _mma(q, tl.trans(k), UPCAST).to(ACC)
                s = s * scale_hi + s * scale_lo
                if HAS_PE:
                    s += tl.load(PE + pe * spet + h * speh, mask=ok, other=0.0).to(ACC)
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                v = tl.load(V + h * svh + keys[:, None] * svn + offs_d[None, :], mask=kd_ok,
                            other=0.0)
                # dout in its own dtype again (exact: it was widened from it).
                dp = _mma(do.to(v.dtype), tl.trans(v), UPCAST).to(ACC)
                ds = p * (dp - delta[:, None])
                if SPLIT:
                    # ds as hi + lo 16-bit parts, as p in the forward.
                    ds_hi = ds.to(k.dtype)
                    ds_lo = (ds - ds_hi.to(ACC)).to(k.dtype)
                    dq += _mma(ds_hi, k, UPCAST) + _mma(ds_lo, k, UPCAST)
                else:
                    dq += _mma(ds.to(k.dtype), k, UPCAST).to(ACC)
                _bwd_q_dpe(DPE, DSBUF, ds, pe, ok, off, rep, h, T, H, dpe_scale, DPE_MODE)
            dq = dq * scale_hi + dq * scale_lo
            tl.store(DQ + h * soh + offs_q[:, None] * son + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=qd_ok)


# =========================================================================== launch


def _blocks(N: int, D: int, M: int, dtype):
    """How the query side runs: (the query-cluster kernel's blocks or None, the per-query
    kernel's (rows, slots, BLOCK_D, num_warps), row blocks per batch, the union kernel's
    num_warps or None). After the query-cluster or union kernel the per-query one takes
    blocks of _GROUP rows, so that all have one program, and one partial row of the
    blank's sums, per group."""
    q_group = _group_blocks(D, M, dtype, "bwd_q")
    u_warps = union.union_blocks(D, M, dtype, "bwd_q")
    rows = _attn_blocks(D, M, dtype, "bwd_q")
    if q_group is not None or u_warps is not None:
        if rows[0] != _GROUP:
            rows = (_GROUP, _chunk_slots("bwd_q", dtype, _GROUP, rows[2], M), *rows[2:])
        return q_group, rows, _cdiv(N, _GROUP), u_warps
    return None, rows, _cdiv(N, rows[0]), None


def _bwd_q(blocks, hpg, nhg, q, k, v, out, dout, lse, delta, dq, idx, pe_idx, mask_u8, pe_t,
           bk, bv, dpe, dsbuf, amax_do, amax_v, dpe_scale, dbk_part, dbv_part, T, n_rep, hi,
           lo, log2_c, has_pe, dpe_mode, has_mask, has_blank, umap=None):
    """One launch of the query side (``blocks`` from :func:`_blocks`, ``hpg`` / ``nhg`` the
    head split): writes delta and dq, and per ``dpe_mode`` (see _attn_bwd_q_kernel) dpe or
    dsbuf, and the blank's partial rows. Buffers a mode does not use may be None.
    ``umap``: the union map (union._union_map) where the backward built one: the union
    kernel (where it is on) takes its groups, and the per-query kernel reads which groups
    are left to it instead of testing them (MAPPED)."""
    B, H, N, D = q.shape
    M = idx.shape[-1]
    q_group, rows, n_qblocks, u_warps = blocks
    BQ, RM, RD, r_warps = rows
    q_args = (
        q, k, v, out, dout, lse, delta, dq, idx, pe_idx, mask_u8, pe_t, bk, bv,
        dpe if dpe is not None else delta, dsbuf if dsbuf is not None else delta,
        amax_do, amax_v, dpe_scale if dpe_scale is not None else delta, dbk_part, dbv_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        pe_t.stride(0) if has_pe else 0, pe_t.stride(1) if has_pe else 0,
        bk.stride(0) if has_blank else 0, bv.stride(0) if has_blank else 0,
        H, N, M, D, T, n_rep, hi, lo, hpg, nhg, log2_c,
    )
    q_flags = dict(HAS_PE=has_pe, DPE_MODE=dpe_mode, HAS_MASK=has_mask, HAS_BLANK=has_blank,
                   ACC=_tl_acc(q.dtype))
    if q_group is not None:
        BM, BD, _heads, warps = q_group
        _attn_bwd_q_cluster_kernel[(n_qblocks, B * nhg)](
            *q_args, **q_flags, GROUP=_GROUP, BLOCK_M=BM, BLOCK_D=BD,
            **_dot_flags(q.dtype), num_warps=warps, num_stages=tuning.GROUP_BWDQ_STAGES,
            maxnreg=_maxnreg("bwd_q_group", q.dtype),
        )
    if u_warps is not None:
        _attn_bwd_q_union_kernel[(n_qblocks, B * nhg)](
            *q_args[:8], *q_args[9:21], umap.uc, umap.slot, umap.uinfo, *q_args[21:],
            **q_flags, GROUP=_GROUP, UCAP=umap.ucap, CHUNK=union.union_chunk(),
            BLOCK_D=max(16, _np2(D)), **_dot_flags(q.dtype), num_warps=u_warps,
        )
    # Every row, or after the query-cluster or union kernel the groups they left
    # (BROKEN_ONLY, MAPPED).
    _attn_bwd_q_kernel[(n_qblocks, B * nhg)](
        *q_args[:21], umap.uinfo if umap is not None else delta, *q_args[21:], **q_flags,
        ONE_CHUNK=RM >= M, BLOCK_Q=BQ, BLOCK_M=RM, BLOCK_D=RD, num_warps=r_warps,
        maxnreg=_maxnreg("bwd_q", q.dtype), BROKEN_ONLY=q_group is not None, GROUP=_GROUP,
        TEST_M=_test_slots(M),
        MAPPED=0 if umap is None else 1 if u_warps is not None else 2,
    )
