"""What the passes share: host helpers (sizes, block plans, head splits, devices) and the
``@triton.jit`` building blocks the forward, the backward kernels and the reverse maps
call (slot loads, row gathers, tl.dot and exp variants, the group-sharing check).

Nothing here launches a kernel. ``_head_groups`` is looked up through this module at
each launch (``common._head_groups``), so a test may replace it here to force a head
split on the CPU.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from . import launch, tuning

# Tokens per cluster in AFF, i.e. the queries that share one key list: the rows of the group
# kernels' tiles (a structural constant, not a tuning knob).
_GROUP = 8


# =========================================================================== host helpers


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a constexpr function (Triton 3.6), many times slower on the host, and
    # a training step computes about ten grids.
    return -(-a // b)


def _np2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _split_scale(scale: float) -> tuple[float, float]:
    # Triton passes Python floats as fp32 on the GPU. A hi + lo pair keeps ~48 bits of
    # the scale for float64 kernels while fp32 kernels stay in fp32 arithmetic.
    try:
        hi = struct.unpack("f", struct.pack("f", scale))[0]
    except OverflowError:  # beyond float32: the kernels see inf either way
        hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(scale) - hi


def _lastdim_unit(x: torch.Tensor) -> torch.Tensor:
    # Kernels address rows by stride and assume unit stride along the last axis; any
    # other layout (e.g. broadcast grads with stride 0) is copied once.
    return x if x.stride(-1) == 1 else x.contiguous()


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of x's shape, dtype and device, dense, its dims in memory in
    the order of x's strides (ties in logical order) with the last one unit-stride.

    The op's outputs and dq take their inputs' layout this way, so that a module whose q is
    a [B, N, H, D] buffer seen as [B, H, N, D] gets out and dq in that layout too (its
    reshape to [B, N, C] and the projection's backward then copy nothing)."""
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))
    if order and order[-1] != x.dim() - 1:
        order = list(range(x.dim()))
    buf = torch.empty([x.shape[i] for i in order], dtype=x.dtype, device=x.device)
    return buf.permute([order.index(i) for i in range(x.dim())])


class _HostFlags:
    """A small device tensor's values for the host, copied behind the work queued so far.

    The copy goes to pinned memory with an event after it; ``any()`` never waits: where
    the event has not completed it answers None (unknown), as it does while a CUDA graph is
    captured (the graph would replay the capture's decision). A wait would hold the host
    back to the GPU in a tight loop of steps (measured: 0.25 ms of wall time a step at
    affmae_stage1). In a model's backward the forward's copy has long landed. On the CPU
    the values are the tensor itself."""

    def __init__(self, x: torch.Tensor):
        self._host, self._event = None, None
        if x.device.type != "cuda":
            self._host = x
        elif not torch.cuda.is_current_stream_capturing():
            self._host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self._host.copy_(x, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def any(self) -> bool | None:
        if self._host is None:
            return None
        if self._event is not None and not self._event.query():
            return None
        return bool(self._host.any())


def _width(dtype: torch.dtype) -> int:
    """The value width TUNING and TUNING_GROUP are keyed by (float64 uses the 4 entries)."""
    return 2 if dtype in (torch.float16, torch.bfloat16) else 4


def _chunk_slots(kind: str, dtype: torch.dtype, rows: int, block_d: int, M: int) -> int:
    """Slots per chunk of a [rows, slots, block_d] gather tile of attention kernel ``kind``:
    within its TUNING budget and slot cap, and no more than M needs."""
    _rows, max_slots, budget, _warps = tuning.TUNING[kind, _width(dtype)]
    if dtype == torch.float64:
        budget //= 2
    if launch._INTERPRET:
        # Slots stay <= 32 so that M > 32 still takes the multi-chunk (online softmax)
        # path on the CPU too.
        max_slots, budget = 32, 1 << 16
    return min(_np2(M), max(1, min(max_slots, budget // (rows * block_d))))


def _attn_blocks(D: int, M: int, dtype: torch.dtype, kind: str):
    """(BLOCK rows, BLOCK slots, BLOCK_D, num_warps) of attention kernel ``kind``."""
    block_d = _np2(D)
    rows, _slots, _budget, warps = tuning.TUNING[kind, _width(dtype)]
    if launch._INTERPRET:
        # The interpreter pays per program and per op, not per element: bigger row blocks
        # make CPU runs of the suite's large configuration affordable.
        rows = 64
    return rows, _chunk_slots(kind, dtype, rows, block_d, M), block_d, warps


def _test_slots(M: int) -> int:
    """Slots per chunk of _rows_of_broken_groups: the whole list in one load where it fits
    (a per-query kernel after a group kernel mostly only tests, and a loop of small chunks
    waits on memory once per chunk)."""
    return min(_np2(M), 256)


def _maxnreg(kernel: str, dtype: torch.dtype) -> int | None:
    return tuning.TUNING_MAXNREG.get((kernel, _width(dtype)))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _head_groups(n_blocks: int, B: int, H: int, device: torch.device,
                 step: int = 1, per_sm: int = 4) -> tuple[int, int]:
    """(heads per program, head groups): split the head loop only when the
    (row block, batch) grid alone would give streaming multiprocessors fewer than
    ``per_sm`` programs each. ``step``: heads per iteration of the program's loop; each
    program gets a multiple of it."""
    if device.type != "cuda":
        return H, 1
    target = per_sm * _sm_count(device)
    have = n_blocks * B
    if have >= target:
        return H, 1
    hpg = _cdiv(H, min(H, _cdiv(target, have)))
    hpg = _cdiv(hpg, step) * step
    return hpg, _cdiv(H, hpg)


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensors'. Entering
    # torch.cuda.device costs host time on every launch, so only when it must switch.
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _sort_key_dtype(n_keys: int) -> torch.dtype:
    # A radix sort makes one pass per key byte: 16-bit keys (sentinel n_keys included)
    # halve the passes of the deterministic backward's sorts.
    return torch.int16 if n_keys < torch.iinfo(torch.int16).max else torch.int32


def _ftz(dtype: torch.dtype) -> bool:
    # _exp's FTZ path is PTX (inline asm): never in the interpreter, and float32 only.
    # The query-side backward kernels keep tl.exp: FTZ made them slower where it made the
    # forward faster (benchmarks/TUNING.md).
    return not launch._INTERPRET and dtype != torch.float64


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(SPLIT=dtype in (torch.float16, torch.bfloat16),
                UPCAST=launch._INTERPRET and dtype == torch.bfloat16)


def _group_blocks(D: int, M: int, dtype: torch.dtype, kind: str = "fwd"):
    """(BLOCK_M, BLOCK_D, heads per tile, num_warps) of the group
    forward (kind "fwd") or query-cluster backward ("bwd_q"), or None for the per-query
    kernel: key list too long for one tile, the group kernel off in TUNING_GROUP for this
    dtype, or float64 on a GPU
    (Triton has no float64 tl.dot there; the interpreter runs it, which is how the suite
    checks the group kernels in float64)."""
    block_m, block_d = max(16, _np2(M)), max(16, _np2(D))
    if block_m * block_d > tuning.GROUP_TILE // (2 if dtype == torch.float64 else 1):
        return None
    if dtype == torch.float64 and not launch._INTERPRET:
        return None
    warps = tuning.TUNING_GROUP[kind, _width(dtype)]
    if not warps:
        return None
    heads = tuning.TUNING_GROUP_HEADS.get(kind, 1)
    if block_m * block_d * heads > tuning.GROUP_TILE // (2 if dtype == torch.float64 else 1):
        heads = 1  # the k / v tiles hold every head's columns
    return block_m, block_d, heads, warps


# =========================================================================== jit building blocks


@triton.jit
def _batch_heads(pid_bh, NHG, HPG, H):
    """Batch and head range [h_lo, h_hi) of grid axis 1, which enumerates (batch, head
    group): small problems split the heads over several programs (_head_groups)."""
    b = (pid_bh // NHG).to(tl.int64)
    h_lo = (pid_bh % NHG) * HPG
    return b, h_lo, tl.minimum(h_lo + HPG, H)


@triton.jit
def _load_slots(IDX, PEIDX, MASK, row_off, q_ok, m0, M,
                HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Key indices, bias-table rows and validity of slots m0..m0+BLOCK_M of a row block."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    ok = q_ok[:, None] & (offs_m[None, :] < M)
    off = row_off[:, None] + offs_m[None, :]
    idx = tl.load(IDX + off, mask=ok, other=0)
    if HAS_MASK:
        ok = ok & (tl.load(MASK + off, mask=ok, other=0) != 0)
    if HAS_PE:
        pe = tl.load(PEIDX + off, mask=ok, other=0)
    else:
        pe = idx
    return idx, pe, ok, off


@triton.jit
def _gather_rows(X, base, idx, offs_d, kd_ok, sxn, ACC: tl.constexpr):
    """Rows ``idx`` [rows, slots] of one head of X (``base`` = its offset) as a
    [rows, slots, BLOCK_D] tile in ACC."""
    return tl.load(X + base + idx[:, :, None] * sxn + offs_d[None, None, :], mask=kd_ok,
                   other=0.0).to(ACC)


@triton.jit
def _chunk_logits(K, PE, h, q, idx, pe, ok, offs_d, d_ok, skh, skn, spet, speh,
                  HAS_PE: tl.constexpr, ACC: tl.constexpr):
    """Per-query path: the chunk's key tile, q . k plus the position bias, and the tile's
    mask (which also masks the chunk's value gather)."""
    kd_ok = ok[:, :, None] & d_ok[None, None, :]
    kt = _gather_rows(K, h * skh, idx, offs_d, kd_ok, skn, ACC)
    s = tl.sum(q[:, None, :] * kt, 2)
    if HAS_PE:
        s += tl.load(PE + pe * spet + h * speh, mask=ok, other=0.0).to(ACC)
    return s, kt, kd_ok


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    """a @ b with a float32 (or float64) result; ieee keeps float32 exact (no tf32) and
    16-bit products are exact in float32. UPCAST: Triton's CPU interpreter multiplies
    bfloat16 operands as their raw 16-bit integers, so there they go through float32
    (the same values, exactly)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _exp(x, FTZ: tl.constexpr):
    """exp(x). FTZ (float32 on a GPU): one ex2.approx.ftz per element, where tl.exp's
    ex2.approx also rounds subnormal results (3 more instructions per element on sm_90).
    The two differ only where exp(x) < 2^-126, which FTZ flushes to 0: a probability
    that small adds nothing a float32 sum can hold beside the row's largest term (1)."""
    if FTZ:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f",
                                         [x * 1.4426950408889634], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.exp(x)


@triton.jit
def _scale(x, scale_hi, scale_lo, ONE_PART: tl.constexpr):
    """x * scale with the scale as a hi + lo pair (float64 kernels need its lo part, fp32
    ones gain ~2^-24 of it); ONE_PART (16-bit operands): hi alone, as the 16-bit
    operands and output carry 2^-9 of rounding."""
    if ONE_PART:
        return x * scale_hi
    return x * scale_hi + x * scale_lo


@triton.jit
def _group_slots(IDX, PEIDX, MASK, pid, N, M, HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr,
                 GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Slots of the GROUP queries from pid * GROUP, the group's lead key list (its first
    query's), and whether the group shares it: every valid slot of every query names the
    lead's key in that slot. The tile has GROUP * HEADS rows: row r is query r % GROUP of
    the group, in head slot r // GROUP."""
    rows = tl.arange(0, GROUP * HEADS)
    offs_q = pid * GROUP + rows % GROUP
    q_ok = offs_q < N
    row_off = offs_q * M
    idx, pe, ok, _off = _load_slots(IDX, PEIDX, MASK, row_off, q_ok, 0, M, HAS_PE, HAS_MASK,
                                   BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    lead = tl.load(IDX + pid * GROUP * M + offs_m, mask=offs_m < M, other=0)
    stray = tl.max(tl.max((ok & (idx != lead[None, :])).to(tl.int32), 1), 0)
    # A slot's key row is read if any query of the group uses the slot.
    live = tl.max(ok.to(tl.int32), 0) > 0
    return offs_q, q_ok, pe, ok, lead, live, stray == 0


@triton.jit
def _rows_of_broken_groups(IDX, MASK, offs_q, q_ok, M, HAS_MASK: tl.constexpr,
                           GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which rows of a block of BLOCK_Q queries (a multiple of GROUP, starting at a multiple
    of GROUP) belong to a group that does not share one key list: _group_slots' test,
    BLOCK_M slots at a time, so that a group kernel and a per-query kernel launched after it
    split the groups between them exactly (the group kernel takes the shared ones)."""
    lead_row = (offs_q // GROUP) * GROUP * M
    stray = tl.zeros([BLOCK_Q], tl.int32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = q_ok[:, None] & (offs_m[None, :] < M)
        off = offs_q[:, None] * M + offs_m[None, :]
        idx = tl.load(IDX + off, mask=in_m, other=0)
        ok = in_m
        if HAS_MASK:
            ok = ok & (tl.load(MASK + off, mask=in_m, other=0) != 0)
        lead = tl.load(IDX + lead_row[:, None] + offs_m[None, :], mask=in_m, other=0)
        stray = tl.maximum(stray, tl.max((ok & (idx != lead)).to(tl.int32), 1))
    per_group = tl.max(tl.reshape(stray, (BLOCK_Q // GROUP, GROUP)), 1)
    rows = tl.reshape(tl.broadcast_to(per_group[:, None], (BLOCK_Q // GROUP, GROUP)), (BLOCK_Q,))
    return q_ok & (rows > 0)


@triton.jit
def _rows_left_by_map(UINFO, b, offs_q, q_ok, N, GROUP: tl.constexpr, MAPPED: tl.constexpr):
    """Which rows of a block of queries the union map (union.py) leaves to the per-query
    kernels: MAPPED 1 (a union kernel ran) the groups of UINFO -1, MAPPED 2 (none ran)
    every group but those a shared-list group kernel took (UINFO -2)."""
    lin = b * tl.cdiv(N, GROUP) + offs_q // GROUP
    info = tl.load(UINFO + lin, mask=q_ok, other=0)
    if MAPPED == 1:
        return q_ok & (info == -1)
    return q_ok & (info != -2)
