"""The backward pass, step by step: ``_attn_backward`` plans one call (which kernels,
which modes, every buffer) and runs its steps in order:

1. the plan: the query-side kernel (backward_q._blocks), the key-side kernel
   (backward_kv._kv_group_blocks), the bias-table gradient's mode, and one zero fill for
   every counter and sum that starts at zero (``_zeroed``);
2. the deterministic d_pe_table's max |dout| and max |v| (backward_tail._dpe_fixed_amax);
3. the query side (backward_q._bwd_q): delta, dq, the blank's partial rows, the
   d_pe_table terms;
4. the key side: the reverse maps (reverse_map.py), then dk and dv (backward_kv._bwd_kv);
5. the tail (backward_tail._backward_tail): d_pe_table and dblank_k / dblank_v, summed in
   a fixed order and cast; float64's deterministic d_pe_table by a segment sum.

d_pe_table modes (``dpe_mode``): 0 none; 1 float atomics into replicas (fast); 2 ds
written out and segment-summed (deterministic float64); 3 int64 fixed point (deterministic
otherwise). The host never reads a result back: no step waits on the GPU.
"""

from __future__ import annotations

import math

import torch

from . import backward_kv, backward_q, common
from .backward_kv import _kv_group_blocks
from .backward_tail import (
    _backward_tail,
    _dpe_fixed_amax,
    _dpe_replicas,
    _pe_grad_deterministic,
    _tail_plan,
)
from .common import _acc_dtype, _cdiv, _device_guard, _lastdim_unit, _split_scale
from .reverse_map import (
    _group_map_words,
    _group_reverse_map,
    _reverse_map,
    _reverse_map_counting,
    _reverse_map_stable,
)


def _zeroed(device: torch.device, *sizes: tuple[int, torch.dtype]) -> list[torch.Tensor | None]:
    """Zero-filled 1-d buffers of (numel, dtype) each (None for numel 0), cut from one
    allocation: one fill launch for all the backward's counters and sums (each fill costs
    host time; the GPU side is nothing). One split, and a view or a slice only where a part
    needs it: each costs host time too (figures: benchmarks/TUNING.md)."""
    words = [_cdiv(n * dt.itemsize, 8) for n, dt in sizes]  # 8-byte aligned parts
    buf = torch.zeros(sum(words), dtype=torch.int64, device=device)
    parts = []
    for (n, dt), piece in zip(sizes, buf.split(words)):
        if n == 0:
            parts.append(None)
            continue
        if dt != torch.int64:
            piece = piece.view(dt)
        if piece.numel() != n:
            piece = piece[:n]
        parts.append(piece)
    return parts


def _map_plan(q_blocks, kv_group):
    """(old_group, keys) of the union map a backward of these query-side blocks and
    key-cluster blocks builds (_group_reverse_map's arguments), or None where it builds none."""
    if q_blocks[3] is None and kv_group is None:
        return None
    return q_blocks[0] is not None, kv_group is not None


def _build_map(idx, mask_u8, N, D, dtype, deterministic, compute_kv, old_group):
    """For the forward: ``(plan, _group_reverse_map's result)`` of the backward that
    follows, built now, or None where that backward builds no map or one of another
    ``old_group`` (the forward's union kernel would then read another verdict)."""
    M = idx.shape[-1]
    plan = _map_plan(backward_q._blocks(N, D, M, dtype),
                     _kv_group_blocks(D, M, dtype) if compute_kv else None)
    if plan is None or plan[0] != old_group:
        return None
    built = _group_reverse_map(idx, mask_u8, N, deterministic, old_group=plan[0],
                               keys=plan[1])
    return plan, built, _token_flags(built)


def _token_flags(built):
    """The host's copy of the group-level map's ``bad`` flags (common._HostFlags), or None
    where the map has no key side."""
    return common._HostFlags(built[3]) if built[3] is not None else None


def _attn_backward(dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k,
                   blank_v, scale, deterministic, compute_kv, compute_pe, kept=None):
    B, H, N, D = q.shape
    M = member_idx.shape[-1]
    dev = q.device
    acc = _acc_dtype(q.dtype)
    q, k, v = _lastdim_unit(q), _lastdim_unit(k), _lastdim_unit(v)
    dout, out = _lastdim_unit(dout), _lastdim_unit(out)
    lse = lse.contiguous()
    idx = member_idx.contiguous()
    has_pe, has_mask, has_blank = pe_table is not None, mask is not None, blank_k is not None
    pe_idx = pe_idx.contiguous() if has_pe else idx
    pe_t = pe_table if has_pe else q
    mask_b = mask.contiguous() if has_mask else None
    mask_u8 = mask_b.view(torch.uint8) if has_mask else idx
    bk = _lastdim_unit(blank_k) if has_blank else q
    bv = _lastdim_unit(blank_v) if has_blank else q
    # 1. The plan: which query-side and key-side kernels run, and every buffer they share.
    q_blocks = backward_q._blocks(N, D, M, q.dtype)
    n_qblocks = q_blocks[2]
    hi, lo = _split_scale(scale)
    hpg, nhg = common._head_groups(n_qblocks, B, H, dev)

    # dq in q's layout, as the forward laid out out: the query-side kernels store dq with
    # out's strides (an out of another layout, e.g. a caller's copy, is copied to it once).
    dq = common._dense_like(q)
    if out.stride() != dq.stride():
        out = common._dense_like(q).copy_(out)
    delta = torch.empty((B, H, N), dtype=acc, device=dev)
    kv_group = _kv_group_blocks(D, M, q.dtype) if compute_kv else None
    # The forward's map (_build_map), where it built the one this call would.
    map_plan = _map_plan(q_blocks, kv_group)
    if kept is not None and (map_plan is None or kept[0] != map_plan):
        kept = None
    dpe_mode = 0
    n_rep = 1
    dpe = dsbuf = dpe_scale = None
    amax_do = amax_v = delta
    log2_c = 0.0
    T = pe_table.shape[0] if has_pe else 0
    n_sums, sum_dtype = 0, acc
    if has_pe and compute_pe:
        if deterministic and q.dtype == torch.float64:
            dpe_mode = 2
            dsbuf = torch.empty((B * N * M, H), dtype=acc, device=dev)
        else:
            dpe_mode = 3 if deterministic else 1
            sum_dtype = torch.int64 if deterministic else acc
            n_rep = _dpe_replicas(T, H, sum_dtype)
            n_sums = n_rep * T * H
    # Everything that starts at zero, in one buffer: d_pe_table's replicas, the group-level
    # map's counts and flags, the fast mode's token-level counts, and the deterministic
    # d_pe_table's max |dout| and max |v| (atomic maxima from 0) and scale.
    fixed = dpe_mode == 3
    R = B * n_qblocks
    plan = _tail_plan(R, H * D) if has_blank else (1, 1, 0, 0, 0)
    n_chunks, n_pieces = plan[2], plan[3]
    zeroed = _zeroed(dev, (n_sums, sum_dtype),
                     (_group_map_words(B, N) if kv_group is not None and kept is None else 0,
                      torch.int32),
                     (B * (N + 1) if compute_kv and not deterministic else 0, torch.int32),
                     (3 if fixed else 0, torch.float32),
                     (2 * n_chunks if n_pieces > 1 else 0, torch.int32))
    if n_sums:
        dpe = zeroed[0].view(n_rep, T, H)
    if fixed:
        amax = zeroed[3]
        amax_do, amax_v, dpe_scale = amax[0:1], amax[1:2], amax[2:3]
        log2_c = math.log2(4.0 * D * B * H * N)
    part = scratch = None
    if has_blank:
        # The query-side kernel's partial rows of dblank_k and dblank_v, and the tail's
        # per-piece sums, from one allocation.
        n_part = R * H * D
        n_scratch = 2 * n_pieces * H * D if n_pieces > 1 else 0
        dbk_part, dbv_part, scratch = torch.empty(
            2 * n_part + n_scratch, dtype=acc, device=dev).split((n_part, n_part, n_scratch))
        part = dbk_part  # dbv_part follows it: the tail reads them as one [2, R, H*D]
    else:
        dbk_part = dbv_part = delta
    with _device_guard(q):
        # 2. The deterministic d_pe_table's scale inputs: max |dout| and max |v|.
        if fixed:
            _dpe_fixed_amax(dout, v, bv if has_blank else None, amax[0:2])
        # The union map (union.py) for the query side's union kernel and the key side's
        # group-level map, from one launch.
        umap = flags = None
        umap_keys = (None, None, None)
        if kept is not None:
            (umap, *umap_keys), flags = kept[1], kept[2]
        elif map_plan is not None:
            built = _group_reverse_map(
                idx, mask_u8 if has_mask else None, N, deterministic, zeroed[1],
                old_group=map_plan[0], keys=map_plan[1])
            umap, *umap_keys = built
            flags = _token_flags(built)
        # 3. The query side: delta, dq, the blank's partial rows, d_pe_table's terms.
        backward_q._bwd_q(q_blocks, hpg, nhg, q, k, v, out, dout, lse, delta, dq, idx, pe_idx,
                          mask_u8, pe_t, bk, bv, dpe, dsbuf, amax_do, amax_v, dpe_scale,
                          dbk_part, dbv_part, T, n_rep, hi, lo, log2_c, has_pe, dpe_mode,
                          has_mask, has_blank, umap)

        # 4. The key side: the reverse maps, then dk and dv.
        if compute_kv:
            # dk and dv in k's layout (one stride set for both), as dq takes q's: where k
            # and v are the halves of the module's [B, N, H, 2, D] buffer, its unbind's
            # backward stacks grads laid out as it writes them.
            dk = common._dense_like(k)
            dv = torch.empty_like(dk, dtype=v.dtype)
            masks = mask_u8 if has_mask else None
            gperm = gptr = bad = None
            if kv_group is not None:
                gperm, gptr, bad = umap_keys
            # Token-level maps only for the batches the group-level map flags (none on AFF's
            # inputs). Where the host's copy of the flags has landed and none is set, no
            # token-level map (a [B, N * M] int32 buffer: 32 MiB at affmae_stage1) and no
            # per-key kernel; where the flags are unknown (copy still in flight, a CUDA
            # graph's capture), the device decides: the map is built for the flagged
            # batches only. Results are the same either way.
            tokens = kv_group is None or flags is None or flags.any() is not False
            if not tokens:
                perm = ptr = None
            elif not deterministic:
                perm, ptr = _reverse_map_counting(idx, masks, N, need=bad, count=zeroed[2])
            elif kv_group is None:
                perm, ptr = _reverse_map(idx, mask_b, N)
            else:
                perm, ptr = _reverse_map_stable(idx, masks, N, need=bad)
            backward_kv._bwd_kv(kv_group, q, k, v, dout, lse, delta, dk, dv, perm, ptr, gperm,
                                gptr, bad, pe_idx, mask_u8, pe_t, M, hi, lo, has_pe, has_mask,
                                umap)
        else:
            dk = q.new_empty(0, dtype=k.dtype)
            dv = q.new_empty(0, dtype=v.dtype)

        # 5. The tail: d_pe_table and the blank gradients, summed and cast.
        dpe_out, dbk, dbv = _backward_tail(
            dpe if dpe_mode in (1, 3) else None, dpe_mode, dpe_scale,
            pe_table.dtype if has_pe else None, part, scratch, zeroed[4], plan, R, H, D,
            blank_k.dtype if has_blank else None, blank_v.dtype if has_blank else None, acc)
        if dpe_mode == 2:
            dpe_out = _pe_grad_deterministic(dsbuf, pe_idx, mask_b, T, H, acc).to(pe_table.dtype)
    # (a custom op's returns must not alias one another: one empty tensor each)
    return (dq, dk, dv, dpe_out if dpe_out is not None else q.new_empty(0),
            dbk if dbk is not None else q.new_empty(0),
            dbv if dbv is not None else q.new_empty(0))
