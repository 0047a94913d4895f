"""Reverse neighbour maps: for each key, which (query, slot) entries name it, as CSR
(perm, ptr), built on the device for the key side of the backward and for the weighted
features' d_feat.

* ``_reverse_map``: a stable torch sort of the slot keys (deterministic; the float64 and
  weighted-feature paths, and the deterministic mode when no group-level map is built).
* ``_reverse_map_counting``: an atomic counting sort (count, scan, fill): the fast mode's
  token-level map, same lists in a run-dependent order.
* ``_reverse_map_stable``: a counting sort in slot ranges that ranks equal keys by slot:
  the deterministic mode's token-level map, only for the batches the group-level map
  flags (decided on the device, no sync).
* ``_group_reverse_map`` with union.py's map kernel: the group-level map of (query group,
  union entry) pairs per key cluster that the key-cluster backward walks, and the
  per-batch flag saying where the union map does not cover a batch.
Indices outside [0, n_keys) and masked slots land in no list.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning, union
from .common import _GROUP, _cdiv, _device_guard, _sort_key_dtype
from .launch import _Launch


def _reverse_map(member_idx: torch.Tensor, mask: torch.Tensor | None, n_keys: int):
    """Per batch, which flat slots ``i * M + s`` name each key, as CSR (perm, ptr).

    perm [B, N*M] int32: slot positions sorted by key (stable, so in slot order per key);
    ptr [B, n_keys + 1] int32: key n's entries are perm[b, ptr[b, n]:ptr[b, n + 1]].
    Masked slots get the key ``n_keys`` and so sort past every list. Sorting and
    searchsorted are deterministic, so the backward's summation order is fixed.
    """
    B, N, M = member_idx.shape
    key = member_idx.reshape(B, N * M).to(_sort_key_dtype(n_keys))
    if mask is not None:
        key = torch.where(mask.reshape(B, N * M), key, torch.full_like(key, n_keys))
    sorted_key, perm = torch.sort(key, dim=1, stable=True)
    bounds = torch.arange(n_keys + 1, device=key.device, dtype=key.dtype)
    ptr = torch.searchsorted(sorted_key, bounds.expand(B, n_keys + 1).contiguous(),
                             out_int32=True)
    return perm.to(torch.int32).contiguous(), ptr.contiguous()


@triton.jit
def _range_keys(IDX, MASK, b, offs, end, NM, NK, HAS_MASK: tl.constexpr):
    """Keys of slots ``offs`` of batch b and which of them count: below ``end``,
    unmasked, and a key in [0, NK)."""
    ok = offs < end
    key = tl.load(IDX + b * NM + offs, mask=ok, other=0)
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b * NM + offs, mask=ok, other=0) != 0)
    # Unchecked indices (check_indices=False) must not turn into stray writes.
    return key, ok & (key >= 0) & (key < NK)


@triton.jit
def _block_keys(IDX, MASK, NEED, NM, NK, HAS_MASK: tl.constexpr, HAS_NEED: tl.constexpr,
                BLOCK: tl.constexpr):
    """(batch, flat slots, their keys, which of them count) of this program's BLOCK slots.
    HAS_NEED: batches whose NEED[b] is 0 count nothing (the group-level map serves them):
    their range ends at 0, so no key or mask is loaded."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1).to(tl.int64)
    if HAS_NEED:
        end = tl.where(tl.load(NEED + b) != 0, NM, 0)
        key, ok = _range_keys(IDX, MASK, b, offs, end, NM, NK, HAS_MASK)
    else:
        key, ok = _range_keys(IDX, MASK, b, offs, NM, NM, NK, HAS_MASK)
    return b, offs, key, ok


@_Launch
@triton.jit
def _key_count_kernel(IDX, MASK, NEED, COUNT, NM, NK, HAS_MASK: tl.constexpr,
                      HAS_NEED: tl.constexpr, BLOCK: tl.constexpr):
    """COUNT[b, key] += 1 for every valid slot (integer atomics: exact in any order);
    COUNT is [B, NK + 1]."""
    b, _offs, key, ok = _block_keys(IDX, MASK, NEED, NM, NK, HAS_MASK, HAS_NEED, BLOCK)
    # Relaxed: only the totals matter, read after the kernel (triton's default, acq_rel,
    # orders every atomic against other memory traffic).
    tl.atomic_add(COUNT + b * (NK + 1) + key, 1, mask=ok, sem="relaxed")


@_Launch
@triton.jit
def _key_fill_kernel(IDX, MASK, NEED, CURSOR, PERM, NM, NK, HAS_MASK: tl.constexpr,
                     HAS_NEED: tl.constexpr, BLOCK: tl.constexpr):
    """PERM[b, --CURSOR[b, key]] = slot: CURSOR [B, NK + 1] starts as the inclusive
    prefix sums of the counts, so each key's list fills from its end and CURSOR ends as
    the lists' starts, i.e. the CSR's ptr."""
    b, offs, key, ok = _block_keys(IDX, MASK, NEED, NM, NK, HAS_MASK, HAS_NEED, BLOCK)
    pos = tl.atomic_add(CURSOR + b * (NK + 1) + key, -1, mask=ok, sem="relaxed") - 1
    tl.store(PERM + b * NM + pos, offs, mask=ok)


def _reverse_map_counting(member_idx: torch.Tensor, mask_u8: torch.Tensor | None,
                          n_keys: int, need: torch.Tensor | None = None,
                          count: torch.Tensor | None = None):
    """The CSR of :func:`_reverse_map` by a counting sort: same lists, but the order of
    the slots within a key's list follows the atomics, i.e. varies from run to run.

    Two passes over the B*N*M keys and no int64 or sort buffers: faster than the sort
    (benchmarks/TUNING.md), and the only large new buffer is perm.
    Masked slots are left out of every list (perm's tail past ptr[b, n_keys] is unused).
    ``need`` [B] int32: batches where it is 0 get empty lists (no work for the kernels).
    ``count``: B * (n_keys + 1) zeroed int32 to use (see backward._zeroed), else one is made.
    """
    B, N, M = member_idx.shape
    NM = N * M
    dev = member_idx.device
    # One [B, n_keys + 1] buffer holds the counts, then their inclusive sums, then (after
    # the fill counts them back down) the CSR's ptr: three host ops fewer per backward.
    if count is None:
        count = torch.zeros((B, n_keys + 1), dtype=torch.int32, device=dev)
    else:
        count = count.view(B, n_keys + 1)
    perm = torch.empty((B, NM), dtype=torch.int32, device=dev)
    has_mask = mask_u8 is not None
    masks = mask_u8 if has_mask else member_idx  # any tensor: unread without HAS_MASK
    grid = (_cdiv(NM, tuning.KEY_BLOCK), B)
    with _device_guard(member_idx):
        _key_count_kernel[grid](member_idx, masks, need if need is not None else count, count,
                                NM, n_keys, HAS_MASK=has_mask, HAS_NEED=need is not None,
                                BLOCK=tuning.KEY_BLOCK)
        count.cumsum_(1)
        _key_fill_kernel[grid](member_idx, masks, need if need is not None else count, count,
                               perm, NM, n_keys, HAS_MASK=has_mask, HAS_NEED=need is not None,
                               BLOCK=tuning.KEY_BLOCK)
    return perm, count


@_Launch
@triton.jit
def _range_count_kernel(IDX, MASK, NEED, CNT, NM, NK, RANGE, HAS_MASK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """CNT[b, p, key] = how many valid slots of range p (slots p*RANGE ..) of batch b name
    key, for batches whose NEED[b] is set. The program zeroes its own row first: no fill
    launch, and nothing is written for the batches that need no map (all of them on AFF's
    inputs)."""
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tl.load(NEED + b) != 0:
        row = CNT + (b * tl.num_programs(0) + p) * (NK + 1)
        for k0 in range(0, NK + 1, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            tl.store(row + offs, tl.zeros([BLOCK], tl.int32), mask=offs < NK + 1)
        tl.debug_barrier()  # the zeros land before any thread's atomics
        start = p * RANGE
        end = tl.minimum(start + RANGE, NM)
        for s0 in range(start, end, BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            key, ok = _range_keys(IDX, MASK, b, offs, end, NM, NK, HAS_MASK)
            tl.atomic_add(row + key, 1, mask=ok, sem="relaxed")


@_Launch
@triton.jit
def _range_scan_kernel(NEED, CNT, PTR, NK, P, BLOCK: tl.constexpr):
    """Batch b's counts CNT[b, p, key] become where range p's first slot naming key goes in
    perm (key's list start + the counts of the ranges before p), and PTR[b, key] the
    lists' starts (PTR[b, NK]: the number of valid slots)."""
    b = tl.program_id(0).to(tl.int64)
    if tl.load(NEED + b) != 0:
        CNT += b * P * (NK + 1)
        carry = tl.zeros([], tl.int32)
        for k0 in range(0, NK + 1, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            ok = offs < NK + 1
            total = tl.zeros([BLOCK], tl.int32)
            for p in range(P):
                total += tl.load(CNT + p * (NK + 1) + offs, mask=ok, other=0)
            run = carry + tl.cumsum(total, 0) - total
            tl.store(PTR + b * (NK + 1) + offs, run, mask=ok)
            for p in range(P):
                c = tl.load(CNT + p * (NK + 1) + offs, mask=ok, other=0)
                tl.store(CNT + p * (NK + 1) + offs, run, mask=ok)
                run += c
            carry += tl.sum(total, 0)


@_Launch
@triton.jit
def _range_fill_kernel(IDX, MASK, NEED, CNT, PERM, NM, NK, RANGE, HAS_MASK: tl.constexpr,
                       BLOCK: tl.constexpr):
    """PERM[b, CNT[b, p, key] + rank] = slot, walking range p in slot order: rank counts
    the chunk's earlier slots naming the same key, and the chunk's last such slot moves
    the cursor CNT[b, p, key] past them. Each key's list ends up in slot order (what the
    stable sort gives) whatever the programs' timing."""
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tl.load(NEED + b) != 0:
        row = CNT + (b * tl.num_programs(0) + p) * (NK + 1)
        start = p * RANGE
        end = tl.minimum(start + RANGE, NM)
        i = tl.arange(0, BLOCK)
        offs = start + i
        key, ok = _range_keys(IDX, MASK, b, offs, end, NM, NK, HAS_MASK)
        for _s0 in range(start, end, BLOCK):
            # The next chunk's keys load while this one waits on its cursors: the walk is
            # a chain of dependent loads and barriers.
            nxt = offs + BLOCK
            key_n, ok_n = _range_keys(IDX, MASK, b, nxt, end, NM, NK, HAS_MASK)
            same = (key[:, None] == key[None, :]) & ok[:, None] & ok[None, :]
            rank = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), 1)
            later = tl.sum((same & (i[None, :] > i[:, None])).to(tl.int32), 1)
            pos = tl.load(row + key, mask=ok, other=0) + rank
            tl.store(PERM + b * NM + pos, offs, mask=ok)
            tl.debug_barrier()  # every thread has read its cursor before one moves it
            tl.store(row + key, pos + 1, mask=ok & (later == 0))
            tl.debug_barrier()  # the moved cursors are what the next chunk reads
            offs, key, ok = nxt, key_n, ok_n


def _reverse_map_stable(member_idx: torch.Tensor, mask_u8: torch.Tensor | None,
                        n_keys: int, need: torch.Tensor):
    """The CSR of :func:`_reverse_map` (each key's list in slot order, so the same every
    run) for the batches where ``need`` [B] int32 is nonzero, by a counting sort in P
    ranges per batch (count, scan, fill: three launches) instead of a sort of all B*N*M
    slots. The host never reads ``need``, so the deterministic backward needs no device
    sync; on AFF's inputs (need all 0) the three kernels return at once.
    Other batches' lists are left unwritten (their ptr rows are garbage)."""
    B, N, M = member_idx.shape
    NM = N * M
    dev = member_idx.device
    P = max(1, min(_cdiv(tuning.RANGE_PROGRAMS, B), _cdiv(NM, tuning.RANGE_MIN),
                   tuning.RANGE_COUNT_WORDS // (B * (n_keys + 1))))
    span = _cdiv(_cdiv(NM, P), tuning.RANGE_BLOCK) * tuning.RANGE_BLOCK
    P = _cdiv(NM, span)
    cnt = torch.empty((B, P, n_keys + 1), dtype=torch.int32, device=dev)
    ptr = torch.empty((B, n_keys + 1), dtype=torch.int32, device=dev)
    perm = torch.empty((B, NM), dtype=torch.int32, device=dev)
    has_mask = mask_u8 is not None
    masks = mask_u8 if has_mask else member_idx  # any tensor: unread without HAS_MASK
    with _device_guard(member_idx):
        _range_count_kernel[(P, B)](member_idx, masks, need, cnt, NM, n_keys, span,
                                    HAS_MASK=has_mask, BLOCK=tuning.KEY_BLOCK)
        _range_scan_kernel[(B,)](need, cnt, ptr, n_keys, P, BLOCK=tuning.KEY_BLOCK)
        _range_fill_kernel[(P, B)](member_idx, masks, need, cnt, perm, NM, n_keys, span,
                                   HAS_MASK=has_mask, BLOCK=tuning.RANGE_BLOCK, num_warps=1)
    return perm, ptr


def _group_map_words(B: int, N: int) -> int:
    """int32 elements of the zeroed buffer :func:`_group_reverse_map` takes."""
    return B * (_cdiv(N, _GROUP) + 1) + B


def _group_reverse_map(member_idx: torch.Tensor, mask_u8: torch.Tensor | None, n_keys: int,
                       deterministic: bool = True, zeroed: torch.Tensor | None = None,
                       old_group: bool = False, keys: bool = True):
    """The union map (union._union_map; ``old_group``: a shared-list query-side kernel runs
    too) and, with ``keys``, the key side's group-level map as CSR: gperm [B, G * UCAP]
    lists, per key cluster, the (query group g, union entry u) pairs ``g * UCAP + u`` that
    name it, gptr [B, n_clusters + 1] int32; bad [B] int32, nonzero where batch b needs the
    token-level map instead (some group not in the union map). Returns (map, gperm, gptr,
    bad), the last three None without ``keys``.

    deterministic: a stable sort of the keys lists each cluster's pairs in order (gperm
    int64 as the sort returns it: a cast would be one more launch; the kernel reads it
    into int32). Otherwise a counting sort (_key_fill_kernel) lists the same pairs in the
    order its atomics take (gperm int32): one launch where the sort takes several, and
    less host time per step.
    ``zeroed``: _group_map_words(B, N) zeroed int32 to use (see backward._zeroed), else one is made."""
    B, N, M = member_idx.shape
    n_groups = _cdiv(N, _GROUP)
    dev = member_idx.device
    if not keys:
        with _device_guard(member_idx):
            return union._union_map(member_idx, mask_u8, old_group), None, None, None
    n_entries = n_groups * union._union_cap(M)
    gkey = torch.empty((B, n_entries), dtype=_sort_key_dtype(n_groups), device=dev)
    # One zeroed buffer for the per-cluster counts (then, summed in place, gptr) and the
    # flags: where a sort of the keys + searchsorted took three more launches per step.
    counts = zeroed if zeroed is not None else torch.zeros(
        _group_map_words(B, N), dtype=torch.int32, device=dev)
    gptr = counts[:B * (n_groups + 1)].view(B, n_groups + 1)
    bad = counts[B * (n_groups + 1):]
    with _device_guard(member_idx):
        # Cluster c's count goes to gptr[b, c + 1] for the sort (whose exclusive sums are
        # then the lists' starts), to gptr[b, c] for the fill (which counts the inclusive
        # sums back down to the starts).
        umap = union._union_map(member_idx, mask_u8, old_group, gkey, gptr, bad,
                                int(deterministic))
        gptr.cumsum_(1)
        if deterministic:
            gperm = torch.sort(gkey, dim=1, stable=True)[1]
        else:
            gperm = torch.empty((B, n_entries), dtype=torch.int32, device=dev)
            # Unused entries hold the key n_groups, which _block_keys leaves out.
            _key_fill_kernel[(_cdiv(n_entries, tuning.KEY_BLOCK), B)](
                gkey, gkey, gkey, gptr, gperm, n_entries, n_groups, HAS_MASK=False,
                HAS_NEED=False, BLOCK=tuning.KEY_BLOCK)
    return umap, gperm, gptr, bad
