"""The forward pass: the per-query kernel, the group (query-cluster) kernel, the dispatch
to the Gluon float32 kernel of gluon_forward.py, and ``_attn_forward``, which picks one.

Read ``_attn_forward`` (at the bottom) first: per call it takes, in this order,
* the Gluon kernel (float32 on a GPU, Triton 3.6-3.8, D <= 64: ``_gluon_blocks``),
* else the group kernel ``_attn_fwd_cluster_kernel`` where ``common._group_blocks`` (and
  ``tuning.TUNING_GROUP``) turns it on: one program per cluster of 8 queries, their
  shared key list gathered once, scores and outputs as tl.dot products (16-bit) or as FMA
  products (float32, ``tuning.TUNING_GROUP_FMA``),
* else the per-query kernel ``_attn_fwd_kernel`` (any member_idx).
The Gluon and group kernels compute only the groups of 8 queries that share one key list;
the per-query kernel runs after them (``BROKEN_ONLY``) for the rest, each group's test
being the same in both, so that no host sync decides between them: on AFF's per-token
lists every group is left to it, on shared lists none.
All three write the output and the log-sum-exp (+inf on rows with nothing valid) that
the backward reads.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import backward, common, launch, tuning, union
from . import gluon_forward as _gluon
from .common import (
    _GROUP,
    _acc_dtype,
    _attn_blocks,
    _batch_heads,
    _cdiv,
    _chunk_logits,
    _device_guard,
    _dot_flags,
    _exp,
    _ftz,
    _gather_rows,
    _group_blocks,
    _group_slots,
    _lastdim_unit,
    _load_slots,
    _maxnreg,
    _mma,
    _np2,
    _rows_left_by_map,
    _rows_of_broken_groups,
    _scale,
    _split_scale,
    _test_slots,
    _tl_acc,
    _width,
)
from .launch import _Launch
from .union import _union_chunk


@triton.jit
def _fwd_rows(
    Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, offs_q, q_ok, row_off, idx0, pe0, ok0,
    sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh, sbkh, sbvh,
    N, M, D, scale_hi, scale_lo, lead_off,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BLANK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, FTZ: tl.constexpr, LEAD: tl.constexpr,
):
    """Head ``h`` of a row block: online softmax over chunks of BLOCK_M slots. Pointers are
    already offset to the batch. Each query gathers its own keys (any member_idx), or with
    LEAD all rows share the key list at IDX + lead_off (a group that _group_slots found
    shared): each chunk's keys and values are then gathered once as [BLOCK_M, BLOCK_D] and
    broadcast over the rows, without tl.dot (float32, where Triton's tl.dot runs on FMA
    units through shared memory)."""
    NEG_INF = float("-inf")
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qd_ok = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + h * sqh + offs_q[:, None] * sqn + offs_d[None, :], mask=qd_ok,
                other=0.0).to(ACC)
    q = q * scale_hi + q * scale_lo
    if LEAD:
        # Loaded as [rows, 1, D] rather than taken as q[:, None, :]: the 3-d load gives
        # the products a layout with the rows in each thread's registers, where the
        # expanded 2-d q led Triton to sum over D across all 32 lanes.
        q3 = tl.load(Q + h * sqh + offs_q[:, None, None] * sqn + offs_d[None, None, :],
                     mask=qd_ok[:, None, :], other=0.0).to(ACC)
        q3 = q3 * scale_hi + q3 * scale_lo
    m_i = tl.full([BLOCK_Q], NEG_INF, ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC)
    if HAS_BLANK:
        bk = tl.load(BK + h * sbkh + offs_d, mask=d_ok, other=0.0).to(ACC)
        bv = tl.load(BV + h * sbvh + offs_d, mask=d_ok, other=0.0).to(ACC)
        # The blank is the softmax's first element: running max = its logit, sum = 1.
        m_i = tl.sum(q * bk[None, :], 1)
        l_i = tl.zeros([BLOCK_Q], ACC) + 1.0
        acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC) + bv[None, :]
    for m0 in range(0, M, BLOCK_M):
        if ONE_CHUNK:
            idx, pe, ok = idx0, pe0, ok0
        else:
            idx, pe, ok, _o = _load_slots(IDX, PEIDX, MASK, row_off, q_ok, m0, M,
                                          HAS_PE, HAS_MASK, BLOCK_M)
        if LEAD:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            lead = tl.load(IDX + lead_off + offs_m, mask=offs_m < M, other=0)
            # A slot's rows are read if any query of the block uses it.
            kv_ok = ((tl.max(ok.to(tl.int32), 0) > 0)[:, None] & d_ok[None, :])[None, :, :]
            kv_off = lead[None, :, None] * skn + offs_d[None, None, :]
            kt = tl.load(K + h * skh + kv_off, mask=kv_ok, other=0.0).to(ACC)
            s = tl.sum(q3 * kt, 2)
            if HAS_PE:
                s += tl.load(PE + pe * spet + h * speh, mask=ok, other=0.0).to(ACC)
        else:
            s, _kt, kd_ok = _chunk_logits(K, PE, h, q, idx, pe, ok, offs_d, d_ok, skh, skn,
                                          spet, speh, HAS_PE, ACC)
        s = tl.where(ok, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # All-invalid so far: shift by 0 so that exp(-inf - shift) = 0, never NaN.
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = _exp(m_i - m_use, FTZ)
        p = _exp(s - m_use[:, None], FTZ)
        l_i = l_i * alpha + tl.sum(p, 1)
        if LEAD:
            vt = tl.load(V + h * svh + lead[None, :, None] * svn + offs_d[None, None, :],
                         mask=kv_ok, other=0.0).to(ACC)
        else:
            vt = _gather_rows(V, h * svh, idx, offs_d, kd_ok, svn, ACC)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt, 1)
        m_i = m_new
    _fwd_store(O, LSE, h * soh + offs_q * son, h * N + offs_q, q_ok, offs_d, qd_ok, acc, m_i,
               l_i)


@triton.jit
def _fwd_store(O, LSE, o_row, lse_row, q_ok, cols, col_ok, acc, m_i, l_i):
    """Normalised rows and their log-sum-exp: row r goes to O + o_row[r] + cols and
    LSE + lse_row[r] (offsets, so that one tile may hold rows of several heads)."""
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    # lse = +inf on empty rows makes the backward's exp(logit - lse) exactly 0.
    lse = tl.where(has, m_i + tl.log(l_safe), float("inf"))
    tl.store(O + o_row[:, None] + cols[None, :], out.to(O.dtype.element_ty), mask=col_ok)
    tl.store(LSE + lse_row, lse, mask=q_ok)


@_Launch
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, UINFO,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    spet, speh, sbkh, sbvh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BLANK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, FTZ: tl.constexpr,
    BROKEN_ONLY: tl.constexpr, GROUP: tl.constexpr, TEST_M: tl.constexpr,
    MAPPED: tl.constexpr,
):
    """Each query gathers its own keys: any member_idx. With BROKEN_ONLY it runs after a
    group kernel and takes only the rows of groups that do not share a key list (the group
    kernel took the others); with MAPPED, after the union kernel, only the rows of groups
    the union map left to it (common._rows_left_by_map)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < N
    row_off = offs_q * M
    IDX += b * N * M
    PEIDX += b * N * M
    MASK += b * N * M
    Q += b * sqb
    K += b * skb
    V += b * svb
    O += b * sob
    LSE += b * H * N
    if MAPPED:
        q_ok = _rows_left_by_map(UINFO, b, offs_q, q_ok, N, GROUP, MAPPED)
    elif BROKEN_ONLY:
        q_ok = _rows_of_broken_groups(IDX, MASK, offs_q, q_ok, M, HAS_MASK, GROUP, BLOCK_Q,
                                      TEST_M)
    if tl.max(q_ok.to(tl.int32), 0) > 0:
        # The slot metadata is shared by all heads: when one chunk covers M, read it once.
        idx0, pe0, ok0 = 0, 0, 0
        if ONE_CHUNK:
            idx0, pe0, ok0, _o = _load_slots(IDX, PEIDX, MASK, row_off, q_ok, 0, M,
                                             HAS_PE, HAS_MASK, BLOCK_M)
        for h in range(h_lo, h_hi):
            _fwd_rows(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, offs_q, q_ok,
                      row_off, idx0, pe0, ok0, sqh, sqn, skh, skn, svh, svn, soh, son, spet,
                      speh, sbkh, sbvh, N, M, D, scale_hi, scale_lo, 0, HAS_PE, HAS_MASK,
                      HAS_BLANK, ONE_CHUNK, BLOCK_Q, BLOCK_M, BLOCK_D, ACC, FTZ, False)


@_Launch
@triton.jit
def _attn_fwd_cluster_kernel(
    Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    spet, speh, sbkh, sbvh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BLANK: tl.constexpr,
    GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    FTZ: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, LEAD_M: tl.constexpr,
):
    """One program per GROUP consecutive queries. AFF gives all tokens of a cluster the
    same key list, so the group's keys and values are gathered once as [BLOCK_M, BLOCK_D]
    tiles and the scores and outputs are tl.dot products, instead of every query gathering
    its own copies. The tile holds the group's queries in HEADS heads at once (row r:
    query r % GROUP in head h + r // GROUP; Triton's tl.dot takes 8 rows on NVIDIA GPUs
    and pads them to the 16 of mma.sync itself, in registers no elementwise op touches).
    The columns are HEADS blocks of BLOCK_D, q is
    block-diagonal (row r nonzero in its head's block only) and k, v hold each head's rows
    in its block, so q k^T gives every row its own head's scores and p v its own head's
    output in its block. A group whose queries name different keys is left to the
    per-query kernel launched after this one (BROKEN_ONLY), so any member_idx stays
    correct. With DOT off (float32,
    TUNING_GROUP_FMA) a shared group takes _fwd_rows' LEAD path instead: one gather per
    chunk of LEAD_M slots as here, the products on FMA units."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    IDX += b * N * M
    PEIDX += b * N * M
    MASK += b * N * M
    Q += b * sqb
    K += b * skb
    V += b * svb
    O += b * sob
    LSE += b * H * N
    NEG_INF = float("-inf")
    offs_q, q_ok, pe, ok, lead, live, shared = _group_slots(
        IDX, PEIDX, MASK, pid, N, M, HAS_PE, HAS_MASK, GROUP, HEADS, BLOCK_M)
    hr = tl.arange(0, GROUP * HEADS) // GROUP  # head slot of each row
    cols = tl.arange(0, HEADS * BLOCK_D)
    hc = cols // BLOCK_D  # head slot of each column
    dc = cols % BLOCK_D
    in_head = (hc[None, :] == hr[:, None]) & (dc < D)[None, :]
    offs_g = pid * GROUP + tl.arange(0, GROUP)
    g_ok = offs_g < N
    if shared and not DOT:
        # A shared list gathered once per chunk, the products on FMA units (LEAD).
        for h in range(h_lo, h_hi):
            _fwd_rows(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, offs_g, g_ok,
                      offs_g * M, 0, 0, 0, sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh,
                      sbkh, sbvh, N, M, D, scale_hi, scale_lo, pid * GROUP * M, HAS_PE,
                      HAS_MASK, HAS_BLANK, False, GROUP, LEAD_M, BLOCK_D, ACC, FTZ, True)
    elif shared:
        for h in range(h_lo, h_hi, HEADS):
            r_ok = q_ok & (h + hr < h_hi)
            s_ok = ok & r_ok[:, None]
            rd_ok = r_ok[:, None] & in_head
            hd_ok = (dc < D) & (h + hc < h_hi)
            kv_ok = live[:, None] & hd_ok[None, :]
            # The bias and the blank's vectors first, so that their latency overlaps the
            # score product's; read after the softmax (the blank's as [rows, BLOCK_D]
            # tiles, which went through shared memory to change layout), the waits on
            # them stalled the kernel (benchmarks/TUNING.md).
            if HAS_PE:
                bias = tl.load(PE + pe * spet + (h + hr)[:, None] * speh, mask=s_ok,
                               other=0.0)
            if HAS_BLANK:
                # One row of each head's blank per column block: q is zero outside its
                # own head's block, so q . bk sums its head's terms only, and the
                # other blocks of pb * bv are never stored.
                bk = tl.load(BK + (h + hc) * sbkh + dc, mask=hd_ok, other=0.0).to(ACC)
                bv = tl.load(BV + (h + hc) * sbvh + dc, mask=hd_ok, other=0.0).to(ACC)
            q = tl.load(Q + (h + hr)[:, None] * sqh + offs_q[:, None] * sqn + dc[None, :],
                        mask=rd_ok, other=0.0)
            k = tl.load(K + (h + hc)[None, :] * skh + lead[:, None] * skn + dc[None, :],
                        mask=kv_ok, other=0.0)
            s = _scale(_mma(q, tl.trans(k), UPCAST).to(ACC), scale_hi, scale_lo, SPLIT)
            if HAS_PE:
                s += bias.to(ACC)
            s = tl.where(s_ok, s, NEG_INF)
            m_i = tl.max(s, 1)
            if HAS_BLANK:
                sb = _scale(tl.sum(q.to(ACC) * bk[None, :], 1), scale_hi, scale_lo, SPLIT)
                m_i = tl.maximum(m_i, sb)
            m_use = tl.where(m_i == NEG_INF, 0.0, m_i)
            p = _exp(s - m_use[:, None], FTZ)
            l_i = tl.sum(p, 1)
            v = tl.load(V + (h + hc)[None, :] * svh + lead[:, None] * svn + dc[None, :],
                        mask=kv_ok, other=0.0)
            if SPLIT:
                # Probabilities as hi + lo 16-bit parts: two tensor-core products keep
                # ~16 significant bits of p where one cast would keep 8 (bf16).
                p_hi = p.to(v.dtype)
                p_lo = (p - p_hi.to(ACC)).to(v.dtype)
                acc = _mma(p_hi, v, UPCAST) + _mma(p_lo, v, UPCAST)
            else:
                acc = _mma(p, v, UPCAST).to(ACC)
            if HAS_BLANK:
                pb = _exp(sb - m_use, FTZ)
                l_i += pb
                acc += pb[:, None] * bv[None, :]
            _fwd_store(O, LSE, (h + hr) * soh + offs_q * son, (h + hr) * N + offs_q, r_ok,
                       dc, rd_ok, acc, m_use, l_i)


@_Launch
@triton.jit
def _attn_fwd_union_kernel(
    Q, K, V, O, LSE, PEIDX, MASK, PE, BK, BV, UC, SLOT, UINFO,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    spet, speh, sbkh, sbvh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BLANK: tl.constexpr,
    GROUP: tl.constexpr, UCAP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, FTZ: tl.constexpr, ACC: tl.constexpr,
):
    """Forward of the groups the map gives the union kernels (UINFO >= 0): per head, an
    online softmax over chunks of CHUNK union entries (CHUNK * GROUP keys), each a dense
    [GROUP, CHUNK * GROUP] score tile."""
    g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    lin = b * tl.num_programs(0) + g
    n_u = tl.load(UINFO + lin)
    if n_u >= 0:
        NEG_INF = float("-inf")
        BLOCK_K: tl.constexpr = CHUNK * GROUP
        Q += b * sqb
        K += b * skb
        V += b * svb
        O += b * sob
        LSE += b * H * N
        PEIDX += b * N * M
        MASK += b * N * M
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
            m_i = tl.full([GROUP], NEG_INF, ACC)
            l_i = tl.zeros([GROUP], ACC)
            acc = tl.zeros([GROUP, BLOCK_D], ACC)
            if HAS_BLANK:
                bk = tl.load(BK + h * sbkh + offs_d, mask=d_ok, other=0.0).to(ACC)
                bv = tl.load(BV + h * sbvh + offs_d, mask=d_ok, other=0.0).to(ACC)
                # The blank is the softmax's first element: running max = its logit, sum 1.
                m_i = _scale(tl.sum(q.to(ACC) * bk[None, :], 1), scale_hi, scale_lo, SPLIT)
                l_i += 1.0
                acc += bv[None, :]
            for u0 in range(0, n_u, CHUNK):
                keys, k_ok, ok, pe, _off = _union_chunk(UC, SLOT, PEIDX, MASK, u0, n_u, offs_q,
                                                        q_ok, N, M, HAS_PE, HAS_MASK, GROUP,
                                                        BLOCK_K)
                kd_ok = k_ok[:, None] & d_ok[None, :]
                if HAS_PE:
                    bias = tl.load(PE + pe * spet + h * speh, mask=ok, other=0.0)
                k = tl.load(K + h * skh + keys[:, None] * skn + offs_d[None, :], mask=kd_ok,
                            other=0.0)
                s = _scale(_mma(q, tl.trans(k), UPCAST).to(ACC), scale_hi, scale_lo, SPLIT)
                if HAS_PE:
                    s += bias.to(ACC)
                s = tl.where(ok, s, NEG_INF)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # All-invalid so far: shift by 0 so that exp(-inf - shift) = 0, never NaN.
                m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
                alpha = _exp(m_i - m_use, FTZ)
                p = _exp(s - m_use[:, None], FTZ)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + h * svh + keys[:, None] * svn + offs_d[None, :], mask=kd_ok,
                            other=0.0)
                if SPLIT:
                    # p as hi + lo 16-bit parts: two tensor-core products keep ~16
                    # significant bits of p where one cast would keep 8 (bf16).
                    p_hi = p.to(v.dtype)
                    p_lo = (p - p_hi.to(ACC)).to(v.dtype)
                    pv = _mma(p_hi, v, UPCAST) + _mma(p_lo, v, UPCAST)
                else:
                    pv = _mma(p.to(v.dtype), v, UPCAST).to(ACC)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            has = l_i > 0
            l_safe = tl.where(has, l_i, 1.0)
            # lse = +inf on empty rows makes the backward's exp(logit - lse) exactly 0.
            lse = tl.where(has, m_i + tl.log(l_safe), float("inf"))
            tl.store(O + h * soh + offs_q[:, None] * son + offs_d[None, :],
                     (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=qd_ok)
            tl.store(LSE + h * N + offs_q, lse, mask=q_ok)


# The Gluon kernel, launched like the others (build_check records and compiles it too);
# None on a Triton that cannot build it.
_attn_fwd_gluon_kernel = (_Launch(_gluon._attn_fwd_gluon_kernel)
                          if _gluon.available(launch._TRITON_RELEASE) else None)


def _gluon_blocks(D: int, M: int, dtype: torch.dtype,
                  pe_span: int = 0) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_D) of the Gluon float32 forward, or None for the triton kernels:
    not float32, the interpreter (Gluon has none), a Triton outside 3.6-3.8 (a newer one
    warns: its Gluon API is not the one this kernel was built against), TUNING_GLUON
    off, a shape outside gluon_forward.blocks, or a bias table whose farthest element
    (``pe_span`` elements from its start) int32 offsets cannot reach: the kernel keeps
    bias row offsets as int32 in shared memory."""
    if dtype != torch.float32 or launch._INTERPRET:
        return None
    if not _gluon.available(launch._TRITON_RELEASE):
        if _gluon.untested_release(launch._TRITON_RELEASE):
            # Python's default filter shows a RuntimeWarning once per call site.
            warnings.warn(
                f"cluster: Triton {triton.__version__} is newer than the Gluon API the float32 "
                f"forward was built against (up to {'.'.join(map(str, _gluon.MAX_TRITON))}); "
                "it runs on the FMA group kernel instead (correct, slower)",
                RuntimeWarning, stacklevel=2)
        return None
    if not tuning.TUNING_GLUON.get("fwd", False) or pe_span >= 2**31:
        return None
    return _gluon.blocks(D, M)


def _lead_slots(block_d: int, M: int, dtype: torch.dtype) -> int:
    """Slots per chunk of the group forward's FMA path (_fwd_rows' LEAD): a [GROUP, slots,
    block_d] product within tuning.GROUP_TILE elements (half in float64), the chunk that costs
    least as padded slots plus 8 per chunk (each chunk pays a rescale and its reductions):
    32 at M = 64 and 16 at M = 48 with D = 32, the chunks that measured fastest
    (benchmarks/TUNING.md)."""
    cap = max(1, (tuning.GROUP_TILE // (2 if dtype == torch.float64 else 1))
              // (_GROUP * block_d))
    sizes = [1 << i for i in range(cap.bit_length()) if (1 << i) <= min(cap, _np2(M))]
    return min(sizes, key=lambda c: (_cdiv(M, c) * c + 8 * _cdiv(M, c), -c))


def _attn_forward(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                  keep=None):
    """(out, lse, kept). ``keep``: (deterministic, compute_kv) of the backward that follows,
    or None (no backward, or one that builds its own map). With it, where the union forward
    is on and the backward would build the same union map, the forward builds that map
    (backward._build_map), runs the union kernel on it and returns it as ``kept`` for the
    backward (else None): built for the forward alone, the map costs what the union kernel
    saves."""
    B, H, N, D = q.shape
    M = member_idx.shape[-1]
    q, k, v = _lastdim_unit(q), _lastdim_unit(k), _lastdim_unit(v)
    idx = member_idx.contiguous()
    has_pe, has_mask, has_blank = pe_table is not None, mask is not None, blank_k is not None
    pe_idx = pe_idx.contiguous() if has_pe else idx
    pe_t = pe_table if has_pe else q
    mask_u8 = mask.contiguous().view(torch.uint8) if has_mask else idx
    bk = _lastdim_unit(blank_k) if has_blank else q
    bv = _lastdim_unit(blank_v) if has_blank else q
    out = common._dense_like(q)
    lse = torch.empty((B, H, N), dtype=_acc_dtype(q.dtype), device=q.device)
    hi, lo = _split_scale(scale)
    args = (
        q, k, v, out, lse, idx, pe_idx, mask_u8, pe_t, bk, bv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pe_t.stride(0) if has_pe else 0, pe_t.stride(1) if has_pe else 0,
        bk.stride(0) if has_blank else 0, bv.stride(0) if has_blank else 0,
    )
    flags = dict(HAS_PE=has_pe, HAS_MASK=has_mask, HAS_BLANK=has_blank, ACC=_tl_acc(q.dtype))
    grouped = _group_blocks(D, M, q.dtype)
    n_groups = _cdiv(N, _GROUP)
    pe_span = ((pe_t.shape[0] - 1) * pe_t.stride(0) + (H - 1) * pe_t.stride(1)) if has_pe else 0
    gluon = _gluon_blocks(D, M, q.dtype, pe_span)
    union_warps = union.union_blocks(D, M, q.dtype, "fwd")
    kept = None
    with _device_guard(q):
        umap = None
        if union_warps is not None and keep is not None:
            # Groups sharing one list stay with the Gluon / group kernel where one runs.
            kept = backward._build_map(idx, mask_u8 if has_mask else None, N, D, q.dtype,
                                       *keep, old_group=gluon is not None or grouped is not None)
            umap = kept[1][0] if kept is not None else None
        if gluon is not None:
            hpg, nhg = common._head_groups(n_groups, B, H, q.device, per_sm=tuning.GLUON_PER_SM)
            _attn_fwd_gluon_kernel[(n_groups, B * nhg)](
                *args, H, N, M, D, hi, lo, hpg, nhg, HAS_PE=has_pe, HAS_MASK=has_mask,
                HAS_BLANK=has_blank, BLOCK_M=gluon[0], BLOCK_D=gluon[1],
                NCH=_cdiv(M, gluon[0]), DC=tuning.TUNING_GLUON_CHUNKS["dc"],
                KC=tuning.TUNING_GLUON_CHUNKS["kc"], num_warps=1,
                maxnreg=_maxnreg("fwd_gluon", q.dtype),
            )
        elif grouped is not None:
            BM, BD, heads, warps = grouped
            fma = tuning.TUNING_GROUP_FMA.get(("fwd", _width(q.dtype)), False)
            hpg, nhg = common._head_groups(n_groups, B, H, q.device, heads)
            _attn_fwd_cluster_kernel[(n_groups, B * nhg)](
                *args, H, N, M, D, hi, lo, hpg, nhg, **flags, GROUP=_GROUP,
                HEADS=heads, BLOCK_M=BM, BLOCK_D=BD, **_dot_flags(q.dtype),
                DOT=not fma, LEAD_M=_lead_slots(BD, M, q.dtype) if fma else 1,
                FTZ=_ftz(q.dtype), num_warps=warps, num_stages=tuning.GROUP_FWD_STAGES,
                maxnreg=_maxnreg("fwd_group", q.dtype),
            )
        if umap is not None:
            hpg, nhg = common._head_groups(n_groups, B, H, q.device)
            _attn_fwd_union_kernel[(n_groups, B * nhg)](
                *args[:5], *args[6:11], umap.uc, umap.slot, umap.uinfo, *args[11:],
                H, N, M, D, hi, lo, hpg, nhg, **flags, GROUP=_GROUP, UCAP=umap.ucap,
                CHUNK=union.union_chunk(), BLOCK_D=max(16, _np2(D)), **_dot_flags(q.dtype),
                FTZ=_ftz(q.dtype), num_warps=union_warps,
            )
        # The per-query kernel: every row, or after a group or union kernel the rows of
        # the groups they left (BROKEN_ONLY, MAPPED).
        BQ, BM, BD, warps = _attn_blocks(D, M, q.dtype, "fwd")
        hpg, nhg = common._head_groups(_cdiv(N, BQ), B, H, q.device)
        _attn_fwd_kernel[(_cdiv(N, BQ), B * nhg)](
            *args[:11], umap.uinfo if umap is not None else idx, *args[11:], H, N, M, D, hi,
            lo, hpg, nhg, **flags, ONE_CHUNK=BM >= M, BLOCK_Q=BQ, BLOCK_M=BM, BLOCK_D=BD,
            FTZ=_ftz(q.dtype), num_warps=warps, maxnreg=_maxnreg("fwd", q.dtype),
            BROKEN_ONLY=gluon is not None or grouped is not None, GROUP=_GROUP,
            TEST_M=_test_slots(M), MAPPED=1 if umap is not None else 0,
        )
    return out, lse, kept
