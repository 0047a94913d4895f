"""The backward's key side: dk and dv, by the per-key kernel (each key walks the
token-level reverse map of the queries that name it) and, where it is on, the
key-cluster kernel before it (each cluster of 8 keys walks the group-level map of
(query group, slot block) pairs, dense 8 x 8 score blocks on tl.dot; the per-key kernel
then takes only the batches that map cannot serve), and their launch.

``_kv_group_blocks`` decides which kernel runs (``tuning.TUNING_GROUP``), ``_bwd_kv``
launches it on the maps backward.py built (reverse_map.py). Every key's sums are plain
stores in the order of its map: dk / dv are reproducible exactly when the map is (the
deterministic mode's maps are in slot order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, launch, tuning, union
from .common import (
    _GROUP,
    _attn_blocks,
    _batch_heads,
    _cdiv,
    _dot_flags,
    _exp,
    _ftz,
    _maxnreg,
    _mma,
    _np2,
    _scale,
    _tl_acc,
    _width,
)
from .launch import _Launch


@triton.jit
def _bwd_kv_rows(
    Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, PE, h, offs_k, k_ok,
    sqh, sqn, skh, skn, svh, svn, sdoh, sdon, sdkh, sdkn, spet, speh,
    N, M, D, scale_hi, scale_lo,
    HAS_PE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, FTZ: tl.constexpr,
):
    """Head ``h`` of BLOCK_K keys, each walking its own list of (query, slot) entries in
    the token-level reverse map. Pointers are already offset to the batch."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kd_ok = k_ok[:, None] & d_ok[None, :]
    start = tl.load(PTR + offs_k, mask=k_ok, other=0)
    cnt = tl.load(PTR + offs_k + 1, mask=k_ok, other=0) - start
    n_max = tl.max(cnt, 0)
    kn = tl.load(K + h * skh + offs_k[:, None] * skn + offs_d[None, :], mask=kd_ok,
                 other=0.0).to(ACC)
    kn = kn * scale_hi + kn * scale_lo
    vn = tl.load(V + h * svh + offs_k[:, None] * svn + offs_d[None, :], mask=kd_ok,
                 other=0.0).to(ACC)
    dk = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    for e0 in range(0, n_max, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        ok = offs_e[None, :] < cnt[:, None]
        slot = tl.load(PERM + start[:, None] + offs_e[None, :], mask=ok, other=0)
        qi = slot // M
        ed_ok = ok[:, :, None] & d_ok[None, None, :]
        qt = tl.load(Q + h * sqh + qi[:, :, None] * sqn + offs_d[None, None, :],
                     mask=ed_ok, other=0.0).to(ACC)
        dot = tl.load(DO + h * sdoh + qi[:, :, None] * sdon + offs_d[None, None, :],
                      mask=ed_ok, other=0.0).to(ACC)
        lse = tl.load(LSE + h * N + qi, mask=ok, other=float("inf"))
        delta = tl.load(DELTA + h * N + qi, mask=ok, other=0.0)
        s = tl.sum(qt * kn[:, None, :], 2)
        if HAS_PE:
            pe = tl.load(PEIDX + slot, mask=ok, other=0)
            s += tl.load(PE + pe * spet + h * speh, mask=ok, other=0.0).to(ACC)
        p = tl.where(ok, _exp(s - lse, FTZ), 0.0)
        dp = tl.sum(dot * vn[:, None, :], 2)
        ds = p * (dp - delta)
        dv += tl.sum(p[:, :, None] * dot, 1)
        dk += tl.sum(ds[:, :, None] * qt, 1)
    _bwd_kv_store(DK, DV, h * sdkh + offs_k * sdkn, offs_d, kd_ok, dk, dv, scale_hi, scale_lo)


@triton.jit
def _bwd_kv_store(DK, DV, row_off, cols, ok, dk, dv, scale_hi, scale_lo):
    """Row r of dk / dv to DK / DV + row_off[r] + cols (dk still without the scale)."""
    dk = dk * scale_hi + dk * scale_lo
    out_off = row_off[:, None] + cols[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kv_batch(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, b,
                  sqb, skb, svb, sdob, sdkb, H, N, M):
    """The key-side kernels' pointers offset to batch b (dk and dv share their strides; lse
    and delta are contiguous [B, H, N]; the maps and pe_idx [B, N * M], ptr [B, N + 1])."""
    return (Q + b * sqb, K + b * skb, V + b * svb, DO + b * sdob, LSE + b * H * N,
            DELTA + b * H * N, DK + b * sdkb, DV + b * sdkb, PERM + b * N * M,
            PTR + b * (N + 1), PEIDX + b * N * M)


@_Launch
@triton.jit
def _attn_bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, PE, NEED,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn,
    spet, speh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, FTZ: tl.constexpr, HAS_NEED: tl.constexpr,
):
    """Key side: each program owns BLOCK_K keys and walks the queries that name them
    (the reverse map), so dk / dv are plain stores in a fixed order. With HAS_NEED it runs
    after the key-cluster kernel and takes only the batches NEED flags (the ones whose
    lists the group-level map cannot serve, e.g. AFF's per-token lists)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    run = 1
    if HAS_NEED:
        run = tl.load(NEED + b)
    if run != 0:
        offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < N
        Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX = _bwd_kv_batch(
            Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, b, sqb, skb, svb, sdob, sdkb, H, N,
            M)
        for h in range(h_lo, h_hi):
            _bwd_kv_rows(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, PE, h, offs_k,
                         k_ok, sqh, sqn, skh, skn, svh, svn, sdoh, sdon, sdkh, sdkn, spet, speh,
                         N, M, D, scale_hi, scale_lo, HAS_PE, BLOCK_K, BLOCK_E, BLOCK_D, ACC,
                         FTZ)


@triton.jit
def _kv_cluster_tile(
    Q, K, V, DO, LSE, DELTA, DK, DV, GPERM, SLOT, PEIDX, MASK, PE, kc, h, start, cnt, n_ent,
    sqh, sqn, skh, skn, svh, svn, sdoh, sdon, sdkh, sdkn, spet, speh,
    N, M, D, scale_hi, scale_lo,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    FTZ: tl.constexpr, ACC: tl.constexpr,
):
    """dk, dv of key cluster kc in heads h .. h + HEADS - 1 (HEADS = 1 or 2), walking its
    cnt entries of the group-level map from ``start`` (entry g * n_ent + u: union entry u
    of query group g, whose queries name kc in the slot blocks SLOT gives, -1 for none).
    The GROUP * HEADS key rows hold the
    cluster's keys in each head (row r: key r % GROUP in head h + r // GROUP). Columns are
    HEADS blocks of BLOCK_D: the query-side tiles (q, dout) hold every head's block, the
    key-side ones (k, v, and the dk, dv kept) only their row's, so each product pairs a row
    with its own head only."""
    t = tl.arange(0, GROUP * HEADS) % GROUP
    hr = tl.arange(0, GROUP * HEADS) // GROUP  # head slot of each key row
    keys = kc * GROUP + t
    key_ok = keys < N
    cols = tl.arange(0, HEADS * BLOCK_D)
    hc = cols // BLOCK_D  # head slot of each column
    dc = cols % BLOCK_D
    kd_ok = key_ok[:, None] & (hc[None, :] == hr[:, None]) & (dc < D)[None, :]
    kn = tl.load(K + (h + hr)[:, None] * skh + keys[:, None] * skn + dc[None, :], mask=kd_ok,
                 other=0.0)
    vn = tl.load(V + (h + hr)[:, None] * svh + keys[:, None] * svn + dc[None, :], mask=kd_ok,
                 other=0.0)
    dk = tl.zeros([GROUP * HEADS, HEADS * BLOCK_D], ACC)
    dv = tl.zeros([GROUP * HEADS, HEADS * BLOCK_D], ACC)
    # Column c of a chunk: query c % GROUP of the chunk's entry c // GROUP.
    c = tl.arange(0, BLOCK_G * GROUP)
    for e0 in range(0, cnt, BLOCK_G):
        e_ok = e0 + c // GROUP < cnt
        # int64 as torch.sort returns it; int32 arithmetic from here on (64-bit division
        # is emulated on the GPU: a slower kernel, benchmarks/TUNING.md).
        ent = tl.load(GPERM + start + e0 + c // GROUP, mask=e_ok, other=0).to(tl.int32)
        qi = (ent // n_ent) * GROUP + c % GROUP
        jq = tl.load(SLOT + ent * GROUP + c % GROUP, mask=e_ok, other=-1).to(tl.int32)
        q_ok = e_ok & (qi < N) & (jq >= 0)
        slot = qi * M + jq * GROUP
        ok = key_ok[:, None] & q_ok[None, :]
        off = slot[None, :] + t[:, None]
        if HAS_MASK:
            ok = ok & (tl.load(MASK + off, mask=ok, other=0) != 0)
        qd_ok = q_ok[:, None] & (dc < D)[None, :]
        qt = tl.load(Q + (h + hc)[None, :] * sqh + qi[:, None] * sqn + dc[None, :], mask=qd_ok,
                     other=0.0)
        dot = tl.load(DO + (h + hc)[None, :] * sdoh + qi[:, None] * sdon + dc[None, :],
                      mask=qd_ok, other=0.0)
        lse = tl.load(LSE + h * N + qi, mask=q_ok, other=float("inf"))[None, :]
        delta = tl.load(DELTA + h * N + qi, mask=q_ok, other=0.0)[None, :]
        if HEADS == 2:
            lse1 = tl.load(LSE + (h + 1) * N + qi, mask=q_ok, other=float("inf"))
            delta1 = tl.load(DELTA + (h + 1) * N + qi, mask=q_ok, other=0.0)
            lse = tl.where(hr[:, None] == 1, lse1[None, :], lse)
            delta = tl.where(hr[:, None] == 1, delta1[None, :], delta)
        s = _scale(_mma(kn, tl.trans(qt), UPCAST).to(ACC), scale_hi, scale_lo, SPLIT)
        if HAS_PE:
            pe = tl.load(PEIDX + off, mask=ok, other=0)
            s += tl.load(PE + pe * spet + (h + hr)[:, None] * speh, mask=ok,
                         other=0.0).to(ACC)
        p = tl.where(ok, _exp(s - lse, FTZ), 0.0)
        dp = _mma(vn, tl.trans(dot), UPCAST).to(ACC)
        ds = p * (dp - delta)
        if SPLIT:
            # hi + lo 16-bit parts keep ~16 significant bits of p and ds in the
            # tensor-core products (one cast would keep 8 for bf16).
            p_hi = p.to(dot.dtype)
            p_lo = (p - p_hi.to(ACC)).to(dot.dtype)
            dv += _mma(p_hi, dot, UPCAST) + _mma(p_lo, dot, UPCAST)
            ds_hi = ds.to(qt.dtype)
            ds_lo = (ds - ds_hi.to(ACC)).to(qt.dtype)
            dk += _mma(ds_hi, qt, UPCAST) + _mma(ds_lo, qt, UPCAST)
        else:
            dv += _mma(p.to(dot.dtype), dot, UPCAST).to(ACC)
            dk += _mma(ds.to(qt.dtype), qt, UPCAST).to(ACC)
    # Row r keeps its own head's block of columns.
    _bwd_kv_store(DK, DV, (h + hr) * sdkh + keys * sdkn, dc, kd_ok, dk, dv, scale_hi, scale_lo)


@_Launch
@triton.jit
def _attn_bwd_kv_cluster_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, GPERM, GPTR, BAD, SLOT, PEIDX, MASK, PE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn,
    spet, speh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, UCAP: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, FTZ: tl.constexpr, ACC: tl.constexpr,
):
    """Key side by key cluster: one program per GROUP consecutive keys. When every query
    group of the batch is in the union map (lists of whole key clusters, union.py), the
    group-level map lists which (query group, union entry) pairs name this cluster; each
    pair is a dense GROUP x GROUP block of scores (the group's queries that do not name
    the cluster masked), so a chunk of
    BLOCK_G pairs is flash-attention's key-side step on gathered query rows: transposed
    scores K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q, all tl.dot. Every
    query row is read once per key cluster, where the per-key walk reads it once per key.
    The program's heads go HEADS at a time through one tile (_kv_cluster_tile), an odd
    last one alone. A batch the map kernel flagged (BAD) is left to the per-key kernel
    launched after this one."""
    kc = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    n_kc = tl.num_programs(0)
    Q, K, V, DO = Q + b * sqb, K + b * skb, V + b * svb, DO + b * sdob
    LSE, DELTA = LSE + b * H * N, DELTA + b * H * N
    DK, DV = DK + b * sdkb, DV + b * sdkb
    PEIDX += b * N * M
    MASK += b * N * M
    if tl.load(BAD + b) == 0:
        GPTR += b * (n_kc + 1)
        GPERM += b * n_kc * UCAP
        SLOT += b * n_kc * UCAP * GROUP
        start = tl.load(GPTR + kc)
        cnt = tl.load(GPTR + kc + 1) - start
        for h in range(h_lo, h_hi - (HEADS - 1), HEADS):
            _kv_cluster_tile(Q, K, V, DO, LSE, DELTA, DK, DV, GPERM, SLOT, PEIDX, MASK, PE,
                             kc, h, start, cnt, UCAP, sqh, sqn, skh, skn, svh, svn, sdoh, sdon,
                             sdkh, sdkn, spet, speh, N, M, D, scale_hi, scale_lo, HAS_PE,
                             HAS_MASK, GROUP, HEADS, BLOCK_G, BLOCK_D, SPLIT, UPCAST, FTZ, ACC)
        if HEADS > 1:
            if (h_hi - h_lo) % HEADS != 0:
                _kv_cluster_tile(Q, K, V, DO, LSE, DELTA, DK, DV, GPERM, SLOT, PEIDX, MASK, PE,
                                 kc, h_hi - 1, start, cnt, UCAP, sqh, sqn, skh, skn, svh, svn,
                                 sdoh, sdon, sdkh, sdkn, spet, speh, N, M, D, scale_hi,
                                 scale_lo, HAS_PE, HAS_MASK, GROUP, 1, BLOCK_G, BLOCK_D, SPLIT,
                                 UPCAST, FTZ, ACC)


def _kv_group_blocks(D: int, M: int, dtype: torch.dtype):
    """(BLOCK_G (map entries per chunk), BLOCK_D, heads per tile, num_warps) of the
    key-cluster backward, or None for the per-key kernel: M not whole slot blocks, the
    kernel off in TUNING_GROUP, or float64 on a GPU (no float64 tl.dot there; the
    interpreter runs it).

    TUNING_GROUP holds in the interpreter too: the group kernels' programs own 8 queries or
    keys where the per-query / per-key kernels' own 64 there, so the CPU suite's large
    float32 cases would take minutes longer. Tests of these kernels in float32 / float64
    switch them on (tests/conftest.py, group_kernels_on)."""
    if not union.map_possible(M):
        return None
    if dtype == torch.float64 and not launch._INTERPRET:
        return None
    warps = tuning.TUNING_GROUP["bwd_kv", _width(dtype)]
    if not warps:
        return None
    block_d = max(16, _np2(D))
    if launch._INTERPRET:
        # Chunks of 4 entries: the CPU suite's small lists still take several chunks.
        return 4, block_d, tuning.TUNING_GROUP_HEADS["bwd_kv"], 4
    # tl.dot wants >= 16 columns, i.e. two entries of 8 queries at least.
    return (max(2, min(8, tuning.KV_GROUP_TILE // (_GROUP * block_d))), block_d,
            tuning.TUNING_GROUP_HEADS["bwd_kv"], warps)


# =========================================================================== launch


def _bwd_kv(kv_group, q, k, v, dout, lse, delta, dk, dv, perm, ptr, gperm, gptr, bad, pe_idx,
            mask_u8, pe_t, M, hi, lo, has_pe, has_mask, umap=None):
    """One launch of the key side into dk, dv: the key-cluster kernel (``kv_group`` from
    :func:`_kv_group_blocks`, with the group-level map gperm / gptr / bad) or, for None, the
    per-key kernel; both walk the token-level map perm / ptr where they need it. perm None
    (the host knows no batch is flagged): the key-cluster kernel alone."""
    B, H, N, D = q.shape
    dev = q.device
    kv_args = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        pe_t.stride(0) if has_pe else 0, pe_t.stride(1) if has_pe else 0,
    )
    BK_, BE, KBD, kv_warps = _attn_blocks(D, M, q.dtype, "bwd_kv")
    if kv_group is not None:
        BG, GBD, kv_heads, gw = kv_group
        n_kc = _cdiv(N, _GROUP)
        kv_hpg, kv_nhg = common._head_groups(n_kc, B, H, dev, kv_heads)
        _attn_bwd_kv_cluster_kernel[(n_kc, B * kv_nhg)](
            q, k, v, dout, lse, delta, dk, dv, gperm, gptr, bad, umap.slot,
            pe_idx, mask_u8, pe_t, *kv_args, H, N, M, D, hi, lo, kv_hpg, kv_nhg,
            HAS_PE=has_pe, HAS_MASK=has_mask, GROUP=_GROUP,
            HEADS=kv_heads, BLOCK_G=BG, BLOCK_D=GBD, UCAP=umap.ucap,
            **_dot_flags(q.dtype), FTZ=_ftz(q.dtype), ACC=_tl_acc(q.dtype),
            num_warps=gw, maxnreg=_maxnreg("bwd_kv_group", q.dtype),
        )
    if perm is None:
        return
    # Every key, or after the key-cluster kernel the batches it left (bad, decided on the
    # device: the token-level map is built for those batches only).
    kv_hpg, kv_nhg = common._head_groups(_cdiv(N, BK_), B, H, dev)
    _attn_bwd_kv_kernel[(_cdiv(N, BK_), B * kv_nhg)](
        q, k, v, dout, lse, delta, dk, dv, perm, ptr, pe_idx, pe_t,
        bad if kv_group is not None else ptr, *kv_args,
        H, N, M, D, hi, lo, kv_hpg, kv_nhg,
        HAS_PE=has_pe, BLOCK_K=BK_, BLOCK_E=BE, BLOCK_D=KBD,
        ACC=_tl_acc(q.dtype), FTZ=_ftz(q.dtype), num_warps=kv_warps,
        maxnreg=_maxnreg("bwd_kv", q.dtype), HAS_NEED=kv_group is not None,
    )
