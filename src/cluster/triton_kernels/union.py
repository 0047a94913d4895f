"""Cluster unions: the fast path of AFF's per-token lists of whole clusters.

AFF gives each token its own nearest clusters, so the 8 queries of a cluster (a group)
list different key clusters, but mostly the same ones: the union over a group is about 10
to 13 clusters where each query lists 6 or 8. ``_union_map_kernel`` finds, per group,

* UC [B, G, UCAP] int32: the union's key clusters (entry u, in order of first use),
* SLOT [B, G, UCAP, GROUP] int8: for each entry and each query of the group, the slot
  block (slots 8j .. 8j + 7) naming that cluster, or -1 where the query does not name it,
* UINFO [B, G] int32: the union's size where the union kernels take the group, -1 where
  the per-query kernel does, -2 where a shared-list group kernel does (``old_group``),
* with ``keys``: the key side's group-level map (per key cluster, the (group, entry)
  pairs ``g * UCAP + u`` naming it, as _group_reverse_map's CSR) and BAD [B], raised where
  some group of the batch is not in the map.

A group is in the map when every valid slot block of every query is one whole key cluster
in order (slot 8j + t naming token 8c + t), every index in range, and the union has at
most UCAP entries. A query naming one cluster twice gets two entries (its first and its
second use), so duplicates stay duplicates. A query whose valid slots all name what the
group's first query names in its own valid slots takes that query's blocks (SLOT column 0)
without a merge of its own: shared lists cost one merge a group. The forward (forward's ``_attn_fwd_union_kernel``) and
the query side of the backward (backward_q's ``_attn_bwd_q_union_kernel``) then take a group as a
[8, CHUNK * 8] dense tile per chunk of CHUNK union entries: the chunk's keys and values
loaded once, scores and outputs as tl.dot products, each query's bias and mask read
through its slot of each entry (slots it does not list are masked). The key side walks
the same map (backward_kv._kv_cluster_tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, tuning
from .common import _GROUP, _cdiv, _np2, _width
from .launch import _Launch


def _union_cap(M: int) -> int:
    """UCAP: entries kept per group's union (a power of two, and never fewer than one
    query's M / 8 blocks, so that shared lists always fit)."""
    return max(_np2(tuning.UNION_CAP), _np2(M // _GROUP))


def union_blocks(D: int, M: int, dtype: torch.dtype, kind: str) -> int | None:
    """num_warps of the union kernel of ``kind`` ("fwd", "bwd_q"), or None where it is off:
    M not whole slot blocks or past UNION_MAX_M, D past UNION_MAX_D, TUNING_UNION off for
    this dtype, or float64 on a GPU (no float64 tl.dot there; the interpreter runs it)."""
    if not map_possible(M) or D > tuning.UNION_MAX_D:
        return None
    if dtype == torch.float64 and not launch._INTERPRET:
        return None
    return tuning.TUNING_UNION.get((kind, _width(dtype))) or None


def union_chunk() -> int:
    """Union entries a tile: UNION_CHUNK, at least 2 (tl.dot takes K >= 16, i.e. 16 keys)."""
    return max(2, tuning.UNION_CHUNK)


def map_possible(M: int) -> bool:
    """Whether _union_map can describe lists of M slots (the key side's group-level map
    needs it too)."""
    return M % _GROUP == 0 and _GROUP <= M <= tuning.UNION_MAX_M


@triton.jit
def _union_merge(idx, ok, ukey, n_u, broken, c, t, u, earlier, N, GROUP: tl.constexpr,
                 JB: tl.constexpr):
    """One query's [JB, GROUP] slot blocks (idx, ok) checked and merged into the union
    (ukey, n_u): the union and ``broken`` updated, and the block naming each entry (col)."""
    # A whole cluster in order: idx - t is one multiple of GROUP over the block's
    # valid slots, and every valid index is a key.
    oor = tl.max((ok & ((idx < 0) | (idx >= N))).to(tl.int32), 1) > 0
    base = idx.to(tl.int32) - t[None, :]
    used = tl.max(ok.to(tl.int32), 1) > 0
    hi = tl.max(tl.where(ok, base, -1), 1)
    lo = tl.min(tl.where(ok, base, 1 << 30), 1)
    bad_c = used & ((hi != lo) | (hi % GROUP != 0) | oor)
    broken = tl.maximum(broken, tl.max(bad_c.to(tl.int32), 0))
    cid = tl.where(used & ~bad_c, hi // GROUP, -1)
    # Entry keys: (cluster, how many earlier blocks of this query name it).
    same = (cid[:, None] == cid[None, :]) & (cid[:, None] >= 0)
    occ = tl.sum((same & earlier).to(tl.int32), 1)
    key = tl.where(cid >= 0, cid * JB + occ, -1)
    hit = (key[:, None] == ukey[None, :]) & (key[:, None] >= 0)
    upos = tl.max(tl.where(hit, u[None, :], -1), 1)
    new = (key >= 0) & (upos < 0)
    pos = n_u + tl.cumsum(new.to(tl.int32), 0) - 1
    put = new[:, None] & (pos[:, None] == u[None, :])
    ukey = tl.maximum(ukey, tl.max(tl.where(put, key[:, None], -1), 0))
    upos = tl.where(new, pos, upos)
    n_u += tl.sum(new.to(tl.int32), 0)
    col = tl.max(tl.where((upos[:, None] == u[None, :]) & (key >= 0)[:, None],
                          c[:, None], -1), 0)
    return ukey, n_u, broken, col


@_Launch
@triton.jit
def _union_map_kernel(IDX, MASK, UC, SLOT, UINFO, GKEY, CNT, BAD, N, M, NKC, CNT_AT, OLD_GROUP,
                      HAS_MASK: tl.constexpr, GROUP: tl.constexpr, JB: tl.constexpr,
                      UCAP: tl.constexpr, KEYS: tl.constexpr):
    """The union of group g of batch b (see the module's docstring), one query at a time:
    each query's [JB, GROUP] tile of slot blocks, checked and reduced to one entry key per
    block, then merged into the union built so far ([JB, UCAP] comparisons a query, where
    comparing all of the group's blocks with each other took [8 JB, 8 JB])."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_g = tl.num_programs(0)
    J = M // GROUP
    IDX += b * N * M
    MASK += b * N * M
    c = tl.arange(0, JB)
    t = tl.arange(0, GROUP)
    u = tl.arange(0, UCAP)
    rr = tl.arange(0, GROUP)
    in_blocks = (c < J)[:, None] & (t[None, :] < GROUP)
    tile = c[:, None] * GROUP + t[None, :]
    # Shared lists (every valid slot names what the group's first query has in that slot)
    # stay with a shared-list group kernel where one runs (OLD_GROUP).
    lead = tl.load(IDX + g * GROUP * M + tile, mask=in_blocks, other=0)
    earlier = c[None, :] < c[:, None]
    ukey = tl.full([UCAP], -1, tl.int32)
    slot = tl.full([UCAP, GROUP], -1, tl.int32)
    n_u = 0
    broken = 0
    stray = 0
    for r in tl.static_range(GROUP):
        q = g * GROUP + r
        in_tile = in_blocks & (q < N)
        off = q * M + tile
        idx = tl.load(IDX + off, mask=in_tile, other=0)
        ok = in_tile
        if HAS_MASK:
            ok = ok & (tl.load(MASK + off, mask=in_tile, other=0) != 0)
        stray = tl.maximum(stray, tl.max(tl.max((ok & (idx != lead)).to(tl.int32), 1), 0))
        if r == 0:
            lead_ok = ok
            ukey, n_u, broken, col = _union_merge(idx, ok, ukey, n_u, broken, c, t, u, earlier,
                                                  N, GROUP, JB)
            col0 = col
        else:
            # A query whose valid slots all name what the lead names in the lead's valid
            # slots has the lead's entries (shared lists: one merge a group, not eight).
            ahead = tl.max(tl.max((ok & (~lead_ok | (idx != lead))).to(tl.int32), 1), 0)
            if ahead == 0:
                col = tl.where(q < N, col0, -1)
            else:
                ukey, n_u, broken, col = _union_merge(idx, ok, ukey, n_u, broken, c, t, u,
                                                      earlier, N, GROUP, JB)
        slot = tl.where(rr[None, :] == r, col[:, None], slot)
    whole = (broken == 0) & (n_u <= UCAP)
    ucl = tl.where(ukey >= 0, ukey // JB, -1)
    lin = b * n_g + g
    tl.store(UC + lin * UCAP + u, ucl)
    tl.store(SLOT + (lin * UCAP + u)[:, None] * GROUP + rr[None, :], slot.to(tl.int8))
    old = (stray == 0) & (OLD_GROUP != 0)
    info = tl.where(old, -2, tl.where(whole, n_u, -1))
    tl.store(UINFO + lin, info)
    if KEYS:
        listed = whole & (ucl >= 0)
        tl.store(GKEY + lin * UCAP + u, tl.where(listed, ucl, NKC).to(GKEY.dtype.element_ty))
        counted = listed & (ucl < NKC)
        # Relaxed: read only by later kernels.
        tl.atomic_add(CNT + b * (NKC + 1) + CNT_AT + tl.where(counted, ucl, 0), 1,
                      mask=counted, sem="relaxed")
        tl.atomic_max(BAD + b, tl.where(whole, 0, 1), sem="relaxed")


class UnionMap:
    """The map of one call (see the module's docstring); ``gkey`` and ``cnt`` are set
    for the key side only."""

    def __init__(self, uc, slot, uinfo, ucap):
        self.uc, self.slot, self.uinfo, self.ucap = uc, slot, uinfo, ucap


def _union_map(member_idx: torch.Tensor, mask_u8: torch.Tensor | None, old_group: bool,
               gkey: torch.Tensor | None = None, cnt: torch.Tensor | None = None,
               bad: torch.Tensor | None = None, cnt_at: int = 0) -> UnionMap:
    """Launch _union_map_kernel for member_idx [B, N, M]; with gkey (and its zeroed cnt
    [B, n_groups + 1] and bad [B]) the key side's map keys too."""
    B, N, M = member_idx.shape
    G = _cdiv(N, _GROUP)
    ucap = _union_cap(M)
    dev = member_idx.device
    uc = torch.empty((B, G, ucap), dtype=torch.int32, device=dev)
    slot = torch.empty((B, G, ucap, _GROUP), dtype=torch.int8, device=dev)
    uinfo = torch.empty((B, G), dtype=torch.int32, device=dev)
    keys = gkey is not None
    jb = _np2(M // _GROUP)
    _union_map_kernel[(G, B)](
        member_idx, mask_u8 if mask_u8 is not None else member_idx, uc, slot, uinfo,
        gkey if keys else uinfo, cnt if keys else uinfo, bad if keys else uinfo, N, M, G,
        cnt_at, int(old_group), HAS_MASK=mask_u8 is not None, GROUP=_GROUP, JB=jb, UCAP=ucap,
        KEYS=keys, num_warps=tuning.UNION_MAP_WARPS,
    )
    return UnionMap(uc, slot, uinfo, ucap)


@triton.jit
def _union_chunk(UC, SLOT, PEIDX, MASK, u0, n_u, offs_q, q_ok, N, M,
                 HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Entries u0 .. of a group's union as BLOCK_K key columns (column j: token j % GROUP
    of entry u0 + j // GROUP): the keys, which are rows of K, and per query and column the
    bias-table row, the validity and the flat slot (query * M + slot)."""
    j = tl.arange(0, BLOCK_K)
    u = u0 + j // GROUP
    t = j % GROUP
    u_ok = u < n_u
    cl = tl.load(UC + u, mask=u_ok, other=0)
    keys = cl * GROUP + t
    k_ok = u_ok & (keys < N)
    r = tl.arange(0, GROUP)
    sb = tl.load(SLOT + u[None, :] * GROUP + r[:, None], mask=u_ok[None, :] & q_ok[:, None],
                 other=-1).to(tl.int32)
    listed = sb >= 0
    off = offs_q[:, None] * M + sb * GROUP + t[None, :]
    # The mask and the bias rows load side by side (each waits on SLOT only).
    pe = 0
    if HAS_PE:
        pe = tl.load(PEIDX + off, mask=listed, other=0)
    ok = listed
    if HAS_MASK:
        ok = ok & (tl.load(MASK + off, mask=listed, other=0) != 0)
    return keys, k_ok, ok, pe, off
