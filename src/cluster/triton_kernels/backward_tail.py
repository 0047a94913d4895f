"""The backward's last reductions: the bias-table gradient and the blank gradients.

* ``_dpe_fixed_amax``: max |dout| and max |v| on the device, from which the query-side
  kernel derives the deterministic d_pe_table's fixed-point scale (no sync).
* ``_backward_tail``: one launch that sums d_pe_table's replicas (float atomics' replicas,
  or the deterministic int64 fixed point, divided by the scale) and the blank's partial
  rows into dblank_k / dblank_v, cast to the parameters' dtypes. Every sum has a fixed
  order: deterministic in both modes.
* ``_pe_grad_deterministic``: float64's deterministic d_pe_table, a segment sum of the
  ds buffer through a sorted CSR of pe_idx (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, tuning
from .common import _cdiv, _device_guard, _np2, _sort_key_dtype, _tl_acc
from .launch import _Launch


# Fast-mode d_pe_table: every query names the same few relative offsets (its spatial
# neighbourhood), so one [T, H] table would take all B*N*M*H atomics on a few hundred
# addresses and serialize them. Spreading them over replicas, summed once at the end (the
# tail kernel), cuts that contention; tuning.DPE_REPLICA_BYTES bounds the extra memory.
def _dpe_replicas(T: int, H: int, acc_dtype: torch.dtype) -> int:
    per_copy = T * H * acc_dtype.itemsize
    return max(1, min(tuning.DPE_MAX_REPLICAS,
                      tuning.DPE_REPLICA_BYTES // max(1, per_copy)))


@triton.jit
def _amax_tile(X, b, h, offs_n, offs_d, ok, sxb, sxh, sxn):
    """Bits of the largest |x| of a [rows, D] tile of x[b, h]: float32 bit patterns of
    non-negative values order as the values, with NaN above inf (so a NaN wins, as it
    does in torch's norm)."""
    x = tl.load(X + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :], mask=ok,
                other=0.0)
    return tl.max(tl.max(tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True), 1), 0)


@_Launch
@triton.jit
def _dpe_amax_kernel(DO, V, BV, AMAX, H, N, D, sdob, sdoh, sdon, svb, svh, svn, sbvh,
                     HAS_BLANK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """AMAX[0] = max |dout|, AMAX[1] = max |v| (blank_v's rows included), as float32 bits
    maxed by integer atomics into a zeroed buffer: exact in any order. Program (i, b*H+h)
    reads rows i*ROWS .. of head h of batch b."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_do = tl.zeros([], tl.int32)
    m_v = tl.zeros([], tl.int32)
    for n0 in range(pid * ROWS, tl.minimum(pid * ROWS + ROWS, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = (offs_n[:, None] < N) & d_ok[None, :]
        m_do = tl.maximum(m_do, _amax_tile(DO, b, h, offs_n, offs_d, ok, sdob, sdoh, sdon))
        m_v = tl.maximum(m_v, _amax_tile(V, b, h, offs_n, offs_d, ok, svb, svh, svn))
    if HAS_BLANK:
        if (pid == 0) & (bh == 0):
            rows = tl.arange(0, BLOCK_N)
            for h0 in range(0, H, BLOCK_N):
                ok = (h0 + rows[:, None] < H) & d_ok[None, :]
                m_v = tl.maximum(m_v, _amax_tile(BV, 0, 0, h0 + rows, offs_d, ok, 0, 0, sbvh))
    tl.atomic_max(AMAX, m_do, sem="relaxed")
    tl.atomic_max(AMAX + 1, m_v, sem="relaxed")


def _dpe_fixed_amax(dout: torch.Tensor, v: torch.Tensor, blank_v: torch.Tensor | None,
                    amax: torch.Tensor) -> None:
    """max |dout| and max |v| (blank included) into ``amax`` (2 zeroed float32, on the
    device), for the scale of the deterministic d_pe_table's fixed-point sums, which the
    query-side kernel derives (``_dpe_fixed_scale``): no sync, one launch where torch took
    three norms and a maximum. dout and v are [B, H, N, D] with unit last stride."""
    B, H, N, D = v.shape
    has_blank = blank_v is not None
    bv = blank_v if has_blank else v
    block_n = 64
    _dpe_amax_kernel[(_cdiv(N, tuning.AMAX_ROWS), B * H)](
        dout, v, bv, amax.view(torch.int32), H, N, D,
        dout.stride(0), dout.stride(1), dout.stride(2), v.stride(0), v.stride(1), v.stride(2),
        bv.stride(0) if has_blank else 0, HAS_BLANK=has_blank, ROWS=tuning.AMAX_ROWS,
        BLOCK_N=block_n, BLOCK_D=max(16, _np2(D)), num_warps=4)


@triton.jit
def _cast_to(x, ty: tl.constexpr):
    """x (float32 or float64) in ``ty``, rounded as torch's ``.to`` rounds: 16-bit types go
    through float32 (the order torch's sum-then-cast took), and bfloat16 is rounded to
    nearest even by hand, because the interpreter's own conversion truncates (the GPU's
    rounds) and the CPU suite must see the GPU's bits."""
    if (ty == tl.bfloat16) or (ty == tl.float16):
        x = x.to(tl.float32)
    if ty == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, (b >> 16) | 0x40, r)  # NaN stays NaN (rounding could make inf)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ty)


@triton.jit
def _column_sums(SRC, start, end, cols, c_ok, stride, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr, ACC: tl.constexpr, CACHE: tl.constexpr):
    """Sums of rows [start, end) of SRC (row stride ``stride``) over columns ``cols``, in
    [BLOCK_R, BLOCK_C] tiles: BLOCK_R loads in flight per column, a fixed order."""
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + rows
        acc += tl.load(SRC + r.to(tl.int64)[:, None] * stride + cols[None, :],
                       mask=(r < end)[:, None] & c_ok[None, :], other=0,
                       cache_modifier=CACHE).to(ACC)
    return tl.sum(acc, 0)


@_Launch
@triton.jit
def _backward_tail_kernel(
    DPE, SCALE, DPE_OUT, n_rep, TH, n_pe,
    PART, SCRATCH, COUNT, DBK, DBV, R, HD, n_chunks, n_pieces, piece_rows,
    PE_MODE: tl.constexpr, ACC: tl.constexpr, PE_ROWS: tl.constexpr, PE_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The backward's last reductions and casts, in one launch.

    Programs [0, n_pe): d_pe_table [TH] = the sum of its replicas DPE [n_rep, TH], in
    DPE_OUT's dtype; PE_MODE 1: float replicas (the fast mode's atomics), 3: int64 fixed
    point, then one division in float64 by the scale the query-side kernel stored (exact
    integer sums: any order gives the same bits).
    The other programs: dblank_k / dblank_v [HD] = column sums of the query-side kernel's
    partial rows PART [2, R, HD] (slab 0: k, 1: v). Each (slab, column chunk) is cut into
    n_pieces row pieces; each piece's sum goes to SCRATCH [2, n_pieces, HD], and the
    program that finishes its chunk last (a counter in COUNT [2, n_chunks], zeroed) adds
    the pieces in piece order. Every sum has a fixed order, so the result does not depend
    on which program comes last: deterministic in both modes, no float atomics.
    """
    pid = tl.program_id(0)
    if pid < n_pe:
        offs = pid * PE_BLOCK + tl.arange(0, PE_BLOCK)
        ok = offs < TH
        if PE_MODE == 3:
            exact = _column_sums(DPE, 0, n_rep, offs, ok, TH, PE_ROWS, PE_BLOCK, tl.int64, "")
            val = exact.to(tl.float64) / tl.load(SCALE).to(tl.float64)
        else:
            val = _column_sums(DPE, 0, n_rep, offs, ok, TH, PE_ROWS, PE_BLOCK, ACC, "")
        tl.store(DPE_OUT + offs, _cast_to(val, DPE_OUT.dtype.element_ty), mask=ok)
    else:
        pid -= n_pe
        piece = pid % n_pieces
        chunk = (pid // n_pieces) % n_chunks
        slab = pid // (n_pieces * n_chunks)
        cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cols < HD
        start = piece * piece_rows
        total = _column_sums(PART + slab.to(tl.int64) * R * HD, start,
                             tl.minimum(start + piece_rows, R), cols, c_ok, HD,
                             BLOCK_R, BLOCK_C, ACC, "")
        last = n_pieces == 1
        if n_pieces > 1:
            tl.store(SCRATCH + (slab * n_pieces + piece) * HD + cols, total, mask=c_ok)
            # Every thread's store before the one atomic (a single thread's, with release
            # semantics), so the program that sees the count reach n_pieces - 1 reads all
            # pieces; its reads bypass L1, which is not coherent across SMs.
            tl.debug_barrier()
            done = tl.atomic_add(COUNT + slab * n_chunks + chunk, 1, sem="acq_rel",
                                 scope="gpu")
            last = done == n_pieces - 1
            if last:
                total = _column_sums(SCRATCH + slab * n_pieces * HD, 0, n_pieces, cols, c_ok,
                                     HD, BLOCK_R, BLOCK_C, ACC, ".cg")
        if last:
            if slab == 0:
                tl.store(DBK + cols, _cast_to(total, DBK.dtype.element_ty), mask=c_ok)
            else:
                tl.store(DBV + cols, _cast_to(total, DBV.dtype.element_ty), mask=c_ok)


def _tail_plan(R: int, HD: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_C, n_chunks, n_pieces, piece_rows) for column sums of [R, HD]."""
    block_c = min(_np2(HD), 128)
    block_r = tuning.TAIL_TILE // block_c
    rows = max(tuning.TAIL_MIN_TILES * block_r, _cdiv(R, tuning.TAIL_MAX_PIECES))
    rows = _cdiv(rows, block_r) * block_r
    return block_r, block_c, _cdiv(HD, block_c), _cdiv(R, rows), rows


def _backward_tail(dpe, pe_mode, dpe_scale, pe_dtype, part, scratch, count, plan, R, H, D,
                   bk_dtype, bv_dtype, acc):
    """d_pe_table (``pe_mode`` 1 or 3: from its replicas ``dpe`` [n_rep, T, H], else None)
    and dblank_k / dblank_v [H, D] (``part``: the first of 2 * R * H * D contiguous partial
    sums, else None; ``scratch`` and ``count`` as _tail_plan's ``plan`` needs) in the
    parameters' dtypes, by one launch of _backward_tail_kernel where torch took three sums
    and up to three casts (the deterministic mode: a launch, a cast and four ops)."""
    dpe_out = dbk = dbv = None
    if dpe is None and part is None:
        return dpe_out, dbk, dbv
    dev = (dpe if dpe is not None else part).device
    n_rep = TH = n_pe = HD = n_blank = 0
    if dpe is not None:
        n_rep, T = dpe.shape[0], dpe.shape[1]
        TH = T * H
        n_pe = _cdiv(TH, tuning.TAIL_PE_BLOCK)
        dpe_out = torch.empty((T, H), dtype=pe_dtype, device=dev)
    block_r, block_c, n_chunks, n_pieces, piece_rows = plan
    if part is not None:
        HD = H * D
        dbk = torch.empty((H, D), dtype=bk_dtype, device=dev)
        dbv = torch.empty((H, D), dtype=bv_dtype, device=dev)
        n_blank = 2 * n_chunks * n_pieces
    if n_pe + n_blank == 0:  # an empty table or H * D == 0: nothing to sum
        return dpe_out, dbk, dbv
    some = dpe_out if dpe_out is not None else dbk  # for the pointers a launch does not use
    _backward_tail_kernel[(n_pe + n_blank,)](
        some if dpe is None else dpe, some if dpe_scale is None else dpe_scale,
        some if dpe_out is None else dpe_out, n_rep, TH, n_pe,
        some if part is None else part, some if scratch is None else scratch,
        some if count is None else count, some if dbk is None else dbk,
        some if dbv is None else dbv, R, HD, n_chunks, n_pieces, piece_rows,
        PE_MODE=0 if dpe is None else pe_mode, ACC=_tl_acc(acc),
        PE_ROWS=tuning.TAIL_PE_ROWS, PE_BLOCK=tuning.TAIL_PE_BLOCK, BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=tuning.NUM_WARPS)
    return dpe_out, dbk, dbv


@_Launch
@triton.jit
def _segment_sum_kernel(SRC, PERM, PTR, OUT, C, R,
                        BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """OUT[j, r, :C] = sum of SRC[PERM[e], :C] over piece j of row r's entries
    [PTR[r], PTR[r+1]), split into num_programs(1) equal pieces: fixed order and fixed
    split, so the result does not depend on scheduling."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n_pieces = tl.num_programs(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    row_start = tl.load(PTR + r)
    row_end = tl.load(PTR + r + 1)
    piece = tl.cdiv(row_end - row_start, n_pieces)
    start = row_start + j * piece
    end = tl.minimum(start + piece, row_end)
    acc = tl.zeros([BLOCK_E, BLOCK_C], ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        ok = offs_e < end
        row = tl.load(PERM + offs_e, mask=ok, other=0).to(tl.int64)
        acc += tl.load(SRC + row[:, None] * C + offs_c[None, :],
                       mask=ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
    tl.store(OUT + (j * R + r) * C + offs_c, tl.sum(acc, 0), mask=c_ok)


# Deterministic float64 d_pe_table: a few table rows (the central offsets) collect most of
# the B*N*M entries, so one program per row would leave the GPU waiting on those few; each
# row is cut into up to tuning.SEGMENT_PIECES pieces, summed afterwards in a fixed order, as
# long as the grid stays within tuning.SEGMENT_PROGRAMS programs (large tables get one
# piece: mostly empty programs would cost more than the imbalance).
def _pe_grad_deterministic(ds_buf, pe_idx, mask, T, H, acc_dtype):
    """Sum ds [B*N*M, H] per table row through a CSR of pe_idx (no atomics)."""
    key = pe_idx.reshape(-1).to(_sort_key_dtype(T))
    if mask is not None:
        key = torch.where(mask.reshape(-1), key, torch.full_like(key, T))
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(T + 1, device=key.device, dtype=key.dtype)
    ptr = torch.searchsorted(sorted_key, bounds, out_int32=True)
    pieces = 2 if launch._INTERPRET else max(
        1, min(tuning.SEGMENT_PIECES, tuning.SEGMENT_PROGRAMS // T))
    out = torch.empty((pieces, T, H), dtype=acc_dtype, device=ds_buf.device)
    with _device_guard(ds_buf):
        _segment_sum_kernel[(T, pieces)](
            ds_buf, perm, ptr, out, H, T, BLOCK_E=64, BLOCK_C=_np2(H),
            ACC=_tl_acc(acc_dtype), num_warps=tuning.NUM_WARPS,
        )
    return out.sum(0)
