"""Fused Triton backend of :mod:`cluster.ops`: cluster attention and weighted features.

Sections: helpers / forward / backward / weighted features / registration.

Cluster attention is a batched gather-GEMV (every query may have its own key list), so the
per-query kernels use elementwise-product-and-reduce tiles ``[rows, slots, BLOCK_D]``
instead of ``tl.dot``: exact float32 (no tf32), the same code for float64. In AFF the 8
tokens of a cluster share one key list made of whole key clusters. The group kernels check
that at run time and then use ``tl.dot``: the group forward and the query-cluster backward
(one program per 8 queries) gather the group's keys and values once; the key-cluster
backward (one program per 8 keys) walks a group-level reverse map of (query group, slot
block) pairs, each a dense 8 x 8 block of scores. All fall back to the per-query / per-key
code for any input that does not have that layout; ``TUNING_GROUP`` (and
``TUNING_GROUP_HEADS``) say where they are used on the GPU
(16-bit). The float32 forward takes the Gluon kernel of :mod:`cluster.gluon_forward`
(``TUNING_GLUON``; D <= 64, lists up to 256 slots, Triton >= 3.6), launched from
``_attn_forward`` here, and otherwise the group kernel's FMA path (``TUNING_GROUP_FMA``).
``TUNING_MAXNREG`` caps the registers of some kernels (launch options only).

Determinism: the forward, dq and the blank gradients never use atomics, so they are
bitwise reproducible in both modes. With ``deterministic`` False the backward takes two
shortcuts whose summation order follows the GPU's scheduling: the position-bias table
gradient is summed with float atomics, and the token-level reverse neighbour map (which
queries name each key, walked by the per-key kernel) is built by an atomic counting sort,
so dk / dv add the same terms in a run-dependent order. ``deterministic=True`` sums the
table gradient in int64 fixed point (integer atomics: exact, so any order gives the same
bits; float64 sorts and sums segments in a fixed order instead) and builds both reverse
maps in slot order: the group-level one with a stable sort, the token-level one (for the
batches the group-level map does not serve; none on AFF's inputs, and the kernels learn
which on the device: no sync) by a counting sort in slot ranges that ranks equal keys by
slot. The fast mode builds the group-level map by a counting sort too.

The kernels read ``TRITON_INTERPRET`` when they are decorated, i.e. at import: set it
before importing this module to run them on the CPU interpreter.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import struct
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime import driver as _driver

from . import gluon_forward as _gluon

__all__ = [
    "MAX_HEAD_DIM",
    "unavailable_reason",
    "cluster_attention",
    "weighted_features",
]

MAX_HEAD_DIM = 256

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# The group kernels' tl.dot operands have a cluster's 8 rows. Triton takes fewer than 16
# rows on NVIDIA GPUs (and pads mma.sync itself) from 3.5 on; 3.4 and older refuse to
# compile them.
MIN_TRITON = (3, 5)
_TRITON_RELEASE = _release(triton.__version__)

# Elements of one [rows, slots, BLOCK_D] gather tile of the weighted-feature kernels. Sized
# from ptxas register counts for sm_90 (num_warps=4, strides and D divisible by 16 as the
# JIT specialises them): 4096 keeps them at or below ~170 registers without spills; float64
# values take two registers, so they get half.
_TILE_BUDGET = 4096
_NUM_WARPS = 4

# Attention kernels: (rows per program, slots per chunk at most, elements of one gather
# tile, num_warps) per kernel and value width (4 = float32, 2 = float16/bfloat16; float64
# takes the float32 entry with half the tile). The kernels reduce over D and over slots
# across the threads of a program, so fewer warps per program mean cheaper reductions and
# more programs per SM; picked with benchmarks/tune.py on the H100 at the AFF shapes (its
# results are in benchmarks/results/tune-*.md). Read at every launch, so a tuning script
# may swap entries.
TUNING: dict[tuple[str, int], tuple[int, int, int, int]] = {
    ("fwd", 4): (16, 32, 4096, 1),
    ("fwd", 2): (8, 32, 2048, 1),
    ("bwd_q", 4): (8, 32, 1024, 1),
    ("bwd_q", 2): (8, 32, 1024, 1),
    ("bwd_kv", 4): (8, 32, 1024, 1),
    ("bwd_kv", 2): (8, 32, 1024, 1),
}
# num_warps of the group kernels (one cluster of queries, or of keys, per program, tl.dot
# tiles) per kind and value width; 0 = the per-query / per-key kernel. The group forward
# takes 16-bit forwards at affmae_stage1 on the H100 from 0.367 to 0.255 ms, but float32
# from 0.54 to >= 1.04 ms (ieee) or 0.58 (tf32x3): float32 tl.dot runs on FMA units through
# shared-memory layouts (benchmarks/tune_group.py, results/tune-group-*.log). The key-cluster
# backward takes the bf16 key side from 0.65 ms (per-key kernel, H100) + 0.19 ms (its map) to
# 0.46 + 0.05 ms (H200, kernel profiles; the two GPUs ran the other kernels within 4 % of each
# other), but a float32 step from 2.30 to >= 3.25 ms (results/tune-kv-dot-*.log). With tiles
# of 8 rows (not 16, half padding) the float32 group kernels still lose at affmae_stage1:
# forward 0.515 -> 0.61 ms, query side 0.73 -> 1.11, key side 0.80 -> 1.28; the 16-bit
# query-cluster backward now wins at M = 48 too, highres 0.51 -> 0.42 ms
# (results/tune-group-8rows-h200-2026-11-29.log). The float32 forward takes the group
# kernel without tl.dot (TUNING_GROUP_FMA). The interpreter follows this table, except
# that it keeps float32 forwards on the per-query kernel: its 8-query programs took the CPU
# suite's float32 forward tests from 37 to 156 s. The group kernels' tests switch them on in
# float32 / float64 (tests/conftest.py, group_kernels_on).
TUNING_GROUP: dict[tuple[str, int], int] = {
    ("fwd", 4): 0 if _INTERPRET else 1, ("fwd", 2): 1, ("bwd_q", 4): 0, ("bwd_q", 2): 1,
    ("bwd_kv", 4): 0, ("bwd_kv", 2): 2,
}
# Heads per tile of the group kernels (1 or 2). A cluster has 8 queries (or keys), the
# tile's rows; with 2 heads the next 8 rows are the same tokens in the next head
# (block-diagonal tiles, see _attn_fwd_cluster_kernel). Kernel times on
# the H200, bf16 (results/tune-group-*-h200-2026-11-29.log, group-kernels-before-after-*):
# the key-cluster backward with 2 heads (and 2 map entries per chunk, _KV_GROUP_TILE) takes
# affmae_stage1 from 0.46 to 0.40 ms and the other AFF shapes 12-27 % down; the forward with
# 2 heads doubles its gathered k / v tiles and slows from 0.175 to 0.43 ms (1 warp) or 0.39
# (2 warps), so it keeps 1 (results/tune-group-8rows-h200-2026-11-29.log).
TUNING_GROUP_HEADS: dict[str, int] = {"fwd": 1, "bwd_kv": 2}
# Group forwards that multiply on FMA units, as broadcast products summed over D and over
# slots, instead of tl.dot, per value width (_fwd_rows' LEAD): each key and value row is
# gathered once for the cluster's 8 queries, where the per-query kernel gathers it 8 times.
# Kernel times on the H200, float32 (results/fwd-fp32-lead-h200-2026-11-29.log), per-query
# -> FMA group: affmae_stage1 514 -> 389 us, config_3_large 88 -> 64, highres 507 -> 472,
# aff_tiny_stage1 388 -> 365, aff_tiny_stage2 196 -> 175. 2 or 4 warps are 2-5x slower
# (Triton spreads the warps over the reduced dimensions).
TUNING_GROUP_FMA: dict[tuple[str, int], bool] = {("fwd", 4): True}
# The float32 forward on Gluon's explicit layouts (gluon_forward) against the FMA group
# path above, kernel times on the H200 (results/fwd-fp32-gluon-async-h200-2026-11-30.log
# and, for its 2 x 4 layout, results/fwd-fp32-gluon-layout-h200-2026-11-30.log):
# affmae_stage1 388 -> 211 us, aff_tiny_stage1 365 -> 228, aff_tiny_stage2 175 -> 112,
# highres 473 -> 295, config_3_large 62.8 -> 41.4. "dc" / "kc": the D-chunk of its q . k
# dots and the slot chunk of its p v dots (16 each: gl.dot_fma takes K >= 16; 32 ran the
# same, within 3 %).
TUNING_GLUON: dict[str, bool] = {"fwd": True}
TUNING_GLUON_CHUNKS: dict[str, int] = {"dc": 16, "kc": 16}
# The Gluon kernel keeps 16 one-warp programs resident per SM (128 registers); grids of
# fewer than 8 per SM split their heads over more programs. config_3_large (1024 programs
# of 8 heads on 132 SMs): 60.1 us unsplit, 51.4 in 2 head groups (one full wave of 2048),
# 62.7 / 55.1 / 62.5 in 3 / 4 / 8 (results/fwd-fp32-gluon-async-h200-2026-11-30.log, on
# the lane-per-slot layout before the 2 x 4 one). With the 2 x 4 layout: 49.0 unsplit, 41.3
# in 2, 49.3 / 44.2 in 3 / 4 (results/fwd-fp32-gluon-layout-h200-2026-11-30.log).
_GLUON_PER_SM = 8
# Register cap (ptxas .maxnreg) per attention kernel ("fwd", "bwd_q", "bwd_kv", each with
# "_group" for the group kernel) and value width; absent = the compiler's choice. With
# one or two warps per program ptxas takes up to 255 registers a thread, which leaves 8
# (one warp) or 4 programs resident per SM; a cap trades spills for programs in flight.
# Kernel times on the H200 (results/tune-maxnreg-h200-2026-11-29.log): the key-cluster
# backward (2 warps) at 128 takes affmae_stage1 0.405 -> 0.369 ms, highres 0.387 -> 0.346,
# config_3_large 0.081 -> 0.064; the per-query backward at 80 (16-bit) takes highres
# 0.515 -> 0.483 and affmae_stage1's (float32, 128) 0.725 -> 0.691, the per-key one's
# float32 0.800 -> 0.744. Caps slow the group forward and query-cluster backward (one
# warp, 0.228 -> 0.277 ms at 168), so those keep the compiler's choice. The Gluon float32
# forward ("fwd_gluon") at 128: affmae_stage1 212 us against 226 at 168 (12 programs an
# SM), config_3_large 41.4 against 53.1, aff_tiny_stage2 112 against 120
# (results/fwd-fp32-gluon-layout-h200-2026-11-30.log).
TUNING_MAXNREG: dict[tuple[str, int], int] = {
    ("bwd_kv_group", 2): 128, ("bwd_q", 2): 80, ("bwd_q", 4): 128, ("bwd_kv", 4): 128,
    ("fwd_gluon", 4): 128,
}


def _maxnreg(kernel: str, dtype: torch.dtype) -> int | None:
    return TUNING_MAXNREG.get((kernel, _width(dtype)))


# Triton releases whose JIT launch path _Launch reproduces and that a GPU has checked it on
# (the GPU suite sends every launch through it). Other releases take the JIT path.
_LAUNCH_TRITON = ((3, 6),)
# Keys kept per kernel. Each shape's strides and sizes are in its keys, so a workload whose
# shapes keep changing would grow the cache without end; past this many it starts over.
_LAUNCH_KEYS = 256


class _Launch:
    """A ``@triton.jit`` kernel, launched as one (``kernel[grid](*args, **options)``), that
    skips the JIT's per-launch work once its specialization has been compiled.

    Triton's JIT path binds every argument, derives the specialization (each pointer's
    dtype and 16-byte alignment, each integer's value class), formats the options into a
    string and looks the kernel up: 15-37 us of host time per launch of these kernels on
    the H200's host, against 6-11 us for the compiled kernel's own launcher
    (results/host-time-h200-2026-11-29.log). A training step makes about seven launches,
    and at config_3_large the eager step's time is the host's.

    The key here is finer than the JIT's: each non-tensor argument by class and exact
    value, each tensor by dtype and by whether its address is a multiple of 16, the launch
    options, the device, and the two runtime knobs the JIT folds into its options. Two
    launches with one key thus have one JIT specialization, and the compiled kernel the
    JIT returned for the first runs the second, with the same arguments in the same order.
    A key not seen yet goes through the JIT, which compiles (or finds) and launches.
    The JIT path stays in use under the interpreter, on other Triton releases, while a
    launch hook or one of the kernel's pre-run hooks is set (profilers, instrumentation),
    for grids given as functions, and for kernels that read global variables (whose values
    the JIT checks at every launch).
    """

    def __init__(self, fn):
        self.fn = fn
        params = inspect.signature(fn.fn).parameters
        self.names = tuple(params)
        self.param_set = frozenset(params)
        self.defaults = tuple(p.default for p in params.values())
        self.kernels: dict = {}
        self.enabled = not _INTERPRET and _TRITON_RELEASE in _LAUNCH_TRITON

    def __getattr__(self, name):
        if name == "fn":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **options: self.run(grid, args, options)

    def run(self, grid, args, options):
        runtime = triton.knobs.runtime
        if (not self.enabled or callable(grid) or _hooked(runtime.launch_enter_hook)
                or _hooked(runtime.launch_exit_hook) or getattr(self.fn, "pre_run_hooks", None)):
            return self.fn[grid](*args, **options)
        names, defaults = self.names, self.defaults
        full = list(args)
        for i in range(len(args), len(names)):
            full.append(options[names[i]] if names[i] in options else defaults[i])
        device = _driver.active.get_current_device()
        # One flat list, not a tuple of pairs from a generator: half the host time.
        key = [device, runtime.debug, getattr(triton.knobs.compilation, "instrumentation_mode",
                                              None)]
        for item in options.items():
            if item[0] not in self.param_set:
                key.append(item)
        for a in full:
            if isinstance(a, torch.Tensor):
                key.append(a.dtype)
                key.append(a.data_ptr() % 16 == 0)
            else:
                key.append(a.__class__)
                key.append(a)
        key = tuple(key)
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **options)
            if (kernel is not None and not hasattr(kernel, "result")
                    and not self.fn.used_global_vals):
                if len(self.kernels) >= _LAUNCH_KEYS:
                    self.kernels.clear()
                self.kernels[key] = kernel
            return kernel
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                   _driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *full)
        return kernel


def _hooked(hook) -> bool:
    # Triton 3.6 keeps each launch hook as a chain of calls (empty: none); older releases
    # keep a callable or None.
    return bool(getattr(hook, "calls", hook))


def _interpreter_numpy_shim() -> None:
    """Let the interpreter run loops with runtime bounds under numpy >= 2.4.

    triton's interpreter (3.5 to 3.8 at least) turns a scalar tensor into a Python int with
    ``int(one_element_array)``, which numpy 2.4 refuses; every ``range(M)`` over a
    kernel argument then fails. Only the interpreter is touched, and only when numpy
    actually refuses the conversion.
    """
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    # Another triton layout, or already shimmed: leave the interpreter alone.
    if original is None or getattr(original, "_cluster_numpy_shim", False):
        return

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    # triton 3.6+ passes a patch scope that records attributes; 3.5 sets them directly.
    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor._cluster_numpy_shim = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if _INTERPRET:
    _interpreter_numpy_shim()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    device = torch.device(device)
    if _TRITON_RELEASE < MIN_TRITON:
        return (f"the triton backend needs triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]} "
                f"(installed: {triton.__version__})")
    if dtype not in _DTYPES:
        return f"the triton backend does not support dtype {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _INTERPRET:
        return None
    return (
        f"Triton needs a CUDA GPU, or TRITON_INTERPRET=1 set before import for the CPU "
        f"interpreter (device is {device})"
    )


# =========================================================================== helpers


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a constexpr function (Triton 3.6): ~4 us of host time per call where
    # this takes 0.2, and a training step computes about ten grids.
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


def _row_blocks(block_d: int, n_slots: int, dtype: torch.dtype):
    """(rows per program, slots per chunk) of a weighted-feature [rows, slots, block_d] tile."""
    budget = _TILE_BUDGET // (2 if dtype == torch.float64 else 1)
    rows = 16 if block_d <= 16 else 8
    if _INTERPRET:
        budget, rows = 1 << 16, 64
    slots = max(1, min(32, budget // (rows * block_d)))
    return rows, min(_np2(n_slots), slots)


def _width(dtype: torch.dtype) -> int:
    """The value width TUNING and TUNING_GROUP are keyed by (float64 uses the 4 entries)."""
    return 2 if dtype in (torch.float16, torch.bfloat16) else 4


def _chunk_slots(kind: str, dtype: torch.dtype, rows: int, block_d: int, M: int) -> int:
    """Slots per chunk of a [rows, slots, block_d] gather tile of attention kernel ``kind``:
    within its TUNING budget and slot cap, and no more than M needs."""
    _rows, max_slots, budget, _warps = TUNING[kind, _width(dtype)]
    if dtype == torch.float64:
        budget //= 2
    if _INTERPRET:
        # Slots stay <= 32 so that M > 32 still takes the multi-chunk (online softmax)
        # path on the CPU too.
        max_slots, budget = 32, 1 << 16
    return min(_np2(M), max(1, min(max_slots, budget // (rows * block_d))))


def _attn_blocks(D: int, M: int, dtype: torch.dtype, kind: str):
    """(BLOCK rows, BLOCK slots, BLOCK_D, num_warps) of attention kernel ``kind``."""
    block_d = _np2(D)
    rows, _slots, _budget, warps = TUNING[kind, _width(dtype)]
    if _INTERPRET:
        # The interpreter pays per program and per op, not per element: bigger row blocks
        # make CPU runs of the suite's large configuration affordable.
        rows = 64
    return rows, _chunk_slots(kind, dtype, rows, block_d, M), block_d, warps


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


# Fast-mode d_pe_table: every query names the same few relative offsets (its spatial
# neighbourhood), so one [T, H] table would take all B*N*M*H atomics on a few hundred
# addresses and serialize them (~0.7 ms at affmae_stage1 on the H100). Spreading them over
# replicas, summed once at the end, cuts that contention; the cap bounds the extra memory.
_DPE_REPLICA_BYTES = 16 << 20
_DPE_MAX_REPLICAS = 128


def _dpe_replicas(T: int, H: int, acc_dtype: torch.dtype) -> int:
    per_copy = T * H * acc_dtype.itemsize
    return max(1, min(_DPE_MAX_REPLICAS, _DPE_REPLICA_BYTES // max(1, per_copy)))


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


# Rows of one head per program of _dpe_amax_kernel (64 a tile): 256-1024 programs at the
# AFF shapes, enough loads in flight, and two atomics per program on two addresses.
_AMAX_ROWS = 512


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
    _dpe_amax_kernel[(_cdiv(N, _AMAX_ROWS), B * H)](
        dout, v, bv, amax.view(torch.int32), H, N, D,
        dout.stride(0), dout.stride(1), dout.stride(2), v.stride(0), v.stride(1), v.stride(2),
        bv.stride(0) if has_blank else 0, HAS_BLANK=has_blank, ROWS=_AMAX_ROWS,
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


# d_pe_table's tiles: [16 x 64] summed 128 int64 replicas in 3.6-4.0 us at config_3_large,
# affmae_stage1 and both aff_tiny shapes (H200 sweep of 48 tile / warp / stage settings,
# results/dpe-finish-sweep-h200-2026-11-29.log; [16 x 256] took 41 us, a walk of one
# replica at a time 18-20, torch's sum + division + cast 14-16).
_TAIL_PE_ROWS = 16
_TAIL_PE_BLOCK = 64
# The blank's partial rows: 4k-element tiles, at least four tiles of rows per piece (each
# program keeps a few loads in flight, ~30-260 programs at the AFF shapes), at most 512
# pieces (the last program of a chunk reads them all).
_TAIL_TILE = 4096
_TAIL_MIN_TILES = 4
_TAIL_MAX_PIECES = 512


def _tail_plan(R: int, HD: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_C, n_chunks, n_pieces, piece_rows) for column sums of [R, HD]."""
    block_c = min(_np2(HD), 128)
    block_r = _TAIL_TILE // block_c
    rows = max(_TAIL_MIN_TILES * block_r, _cdiv(R, _TAIL_MAX_PIECES))
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
        n_pe = _cdiv(TH, _TAIL_PE_BLOCK)
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
        PE_MODE=0 if dpe is None else pe_mode, ACC=_tl_acc(acc), PE_ROWS=_TAIL_PE_ROWS,
        PE_BLOCK=_TAIL_PE_BLOCK, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    return dpe_out, dbk, dbv


def _sort_key_dtype(n_keys: int) -> torch.dtype:
    # A radix sort makes one pass per key byte: 16-bit keys (sentinel n_keys included)
    # halve the passes of the deterministic backward's sorts.
    return torch.int16 if n_keys < torch.iinfo(torch.int16).max else torch.int32


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


_KEY_BLOCK = 1024


def _zeroed(device: torch.device, *sizes: tuple[int, torch.dtype]) -> list[torch.Tensor | None]:
    """Zero-filled 1-d buffers of (numel, dtype) each (None for numel 0), cut from one
    allocation: one fill launch for all the backward's counters and sums (each fill is
    ~10-40 us of host time on the H200's host; the GPU side is nothing). One split, and a
    view or a slice only where a part needs it: each costs 2-3 us of host time, and cutting
    every part with two slices and a view took 50 us per backward where this takes 20 (CPU
    tensors on the 2-core machine; views cost the host the same for CUDA tensors)."""
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


def _reverse_map_counting(member_idx: torch.Tensor, mask_u8: torch.Tensor | None,
                          n_keys: int, need: torch.Tensor | None = None,
                          count: torch.Tensor | None = None):
    """The CSR of :func:`_reverse_map` by a counting sort: same lists, but the order of
    the slots within a key's list follows the atomics, i.e. varies from run to run.

    Two passes over the B*N*M keys and no int64 or sort buffers: 0.23 ms against ~0.5 ms
    for the sort at affmae_stage1 on the H100, and the only large new buffer is perm.
    Masked slots are left out of every list (perm's tail past ptr[b, n_keys] is unused).
    ``need`` [B] int32: batches where it is 0 get empty lists (no work for the kernels).
    ``count``: B * (n_keys + 1) zeroed int32 to use (see _zeroed), else one is made.
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
    grid = (_cdiv(NM, _KEY_BLOCK), B)
    with _device_guard(member_idx):
        _key_count_kernel[grid](member_idx, masks, need if need is not None else count, count,
                                NM, n_keys, HAS_MASK=has_mask, HAS_NEED=need is not None,
                                BLOCK=_KEY_BLOCK)
        count.cumsum_(1)
        _key_fill_kernel[grid](member_idx, masks, need if need is not None else count, count,
                               perm, NM, n_keys, HAS_MASK=has_mask, HAS_NEED=need is not None,
                               BLOCK=_KEY_BLOCK)
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
            # a chain of dependent loads and barriers (~1.5 us a chunk on the H200).
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


# The deterministic token-level map's ranges: about _RANGE_PROGRAMS programs in all, ranges
# of at least _RANGE_MIN slots, and [B, P, N + 1] int32 counts of at most 16 MiB. The fill
# walks 32 slots at a time with one warp. Measured on the H200 with random indices (every
# batch needing the map; results/range-map-h200-2026-11-29.log): 0.49 ms at affmae_stage1
# (the stable sort 0.49), 0.06 ms at config_3_large (0.11-0.27), 2.4 ms at highres (0.70,
# 15 ranges of 52k slots each: the cap).
_RANGE_PROGRAMS = 1024
_RANGE_MIN = 1024
_RANGE_COUNT_WORDS = 1 << 22
_RANGE_BLOCK = 32


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
    P = max(1, min(_cdiv(_RANGE_PROGRAMS, B), _cdiv(NM, _RANGE_MIN),
                   _RANGE_COUNT_WORDS // (B * (n_keys + 1))))
    span = _cdiv(_cdiv(NM, P), _RANGE_BLOCK) * _RANGE_BLOCK
    P = _cdiv(NM, span)
    cnt = torch.empty((B, P, n_keys + 1), dtype=torch.int32, device=dev)
    ptr = torch.empty((B, n_keys + 1), dtype=torch.int32, device=dev)
    perm = torch.empty((B, NM), dtype=torch.int32, device=dev)
    has_mask = mask_u8 is not None
    masks = mask_u8 if has_mask else member_idx  # any tensor: unread without HAS_MASK
    with _device_guard(member_idx):
        _range_count_kernel[(P, B)](member_idx, masks, need, cnt, NM, n_keys, span,
                                    HAS_MASK=has_mask, BLOCK=_KEY_BLOCK)
        _range_scan_kernel[(B,)](need, cnt, ptr, n_keys, P, BLOCK=_KEY_BLOCK)
        _range_fill_kernel[(P, B)](member_idx, masks, need, cnt, perm, NM, n_keys, span,
                                   HAS_MASK=has_mask, BLOCK=_RANGE_BLOCK, num_warps=1)
    return perm, ptr


def _group_map_words(B: int, N: int) -> int:
    """int32 elements of the zeroed buffer :func:`_group_reverse_map` takes."""
    return B * (_cdiv(N, _GROUP) + 1) + B


def _group_reverse_map(member_idx: torch.Tensor, mask_u8: torch.Tensor | None, n_keys: int,
                       deterministic: bool = True, zeroed: torch.Tensor | None = None):
    """The group-level reverse map of _group_key_kernel, as CSR: gperm [B, G * J] lists,
    per key cluster, the (query group g, slot block j) pairs ``g * J + j`` that name it,
    gptr [B, n_clusters + 1] int32; bad [B] int32, nonzero where batch b needs the
    token-level map instead. G * J is N * M / 64 entries.

    deterministic: a stable sort of the keys lists each cluster's pairs in order (gperm
    int64 as the sort returns it: a cast would be one more launch; the kernel reads it
    into int32). Otherwise a counting sort (_key_fill_kernel) lists the same pairs in the
    order its atomics take (gperm int32): one launch where the sort takes several, and
    ~0.1 ms less host time per step on the H200's host.
    ``zeroed``: _group_map_words(B, N) zeroed int32 to use (see _zeroed), else one is made."""
    B, N, M = member_idx.shape
    n_groups = _cdiv(N, _GROUP)
    dev = member_idx.device
    n_entries = n_groups * (M // _GROUP)
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
        _group_key_kernel[(n_groups, B)](
            member_idx, mask_u8 if mask_u8 is not None else member_idx, gkey, gptr, bad, N,
            M, n_groups, int(deterministic), HAS_MASK=mask_u8 is not None, GROUP=_GROUP,
            BLOCK_M=_np2(M), num_warps=_NUM_WARPS,
        )
        gptr.cumsum_(1)
        if deterministic:
            gperm = torch.sort(gkey, dim=1, stable=True)[1]
        else:
            gperm = torch.empty((B, n_entries), dtype=torch.int32, device=dev)
            # Unused blocks hold the key n_groups, which _block_keys leaves out.
            _key_fill_kernel[(_cdiv(n_entries, _KEY_BLOCK), B)](
                gkey, gkey, gkey, gptr, gperm, n_entries, n_groups, HAS_MASK=False,
                HAS_NEED=False, BLOCK=_KEY_BLOCK)
    return gperm, gptr, bad


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


# =========================================================================== forward


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
    Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    spet, speh, sbkh, sbvh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BLANK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, FTZ: tl.constexpr,
):
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

    # The slot metadata is shared by all heads: when one chunk covers M, read it once.
    idx0, pe0, ok0 = 0, 0, 0
    if ONE_CHUNK:
        idx0, pe0, ok0, _o = _load_slots(IDX, PEIDX, MASK, row_off, q_ok, 0, M,
                                         HAS_PE, HAS_MASK, BLOCK_M)
    for h in range(h_lo, h_hi):
        _fwd_rows(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, offs_q, q_ok, row_off,
                  idx0, pe0, ok0, sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh,
                  sbkh, sbvh, N, M, D, scale_hi, scale_lo, 0, HAS_PE, HAS_MASK, HAS_BLANK,
                  ONE_CHUNK, BLOCK_Q, BLOCK_M, BLOCK_D, ACC, FTZ, False)


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


@_Launch
@triton.jit
def _attn_fwd_cluster_kernel(
    Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    spet, speh, sbkh, sbvh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BLANK: tl.constexpr,
    GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, GEN_M: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
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
    output in its block. A group whose queries name different keys falls back to the
    per-query path (_fwd_rows), so any member_idx stays correct. With DOT off (float32,
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
            # them were 8 % of the H200's stall samples at config_3_large
            # (results/fwd-early-loads-h200-2026-11-29.log).
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
    else:
        for h in range(h_lo, h_hi):
            _fwd_rows(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, offs_g, g_ok,
                      offs_g * M, 0, 0, 0, sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh,
                      sbkh, sbvh, N, M, D, scale_hi, scale_lo, 0, HAS_PE, HAS_MASK,
                      HAS_BLANK, False, GROUP, GEN_M, BLOCK_D, ACC, FTZ, False)


# Tokens per cluster in AFF, i.e. the queries that share one key list. Key lists whose
# [BLOCK_M, BLOCK_D] tile would exceed _GROUP_TILE elements take the per-query kernels.
_GROUP = 8
_GROUP_TILE = 8192
# Software-pipeline depth of the group forward's head loop (Triton copies the q / k / v
# tiles of later heads into shared memory while this head computes). Kernel times on the
# H200, bf16, with the early bias / blank loads: 2 stages against the default 3 take
# config_3_large 23.5 -> 23.2 us, aff_tiny_stage2 71.0 -> 68.6, affmae_stage1 149.7 ->
# 142.0, highres 225.2 -> 208.1; 4 stages are slower, and so is 1 (no copies ahead; tried
# with the previous loads only) (results/fwd-early-loads-h200-2026-11-29.log).
_GROUP_FWD_STAGES = 2
# The same for the query-cluster backward: 2 stages against 3 take its kernel time per
# bf16 step at affmae_stage1 from 337 to 311 us, highres 418 -> 391, config_3_large
# 71.4 -> 70.4; 1 stage is slower (results/bwd-q-stages-h200-2026-11-29.log).
_GROUP_BWDQ_STAGES = 2


def _ftz(dtype: torch.dtype) -> bool:
    # _exp's FTZ path is PTX (inline asm): never in the interpreter, and float32 only.
    # The query-side backward kernels keep tl.exp: with FTZ (and _scale's one part) the
    # query-cluster one ran 3.5 % slower, the per-query one 1.3 % (H200, A / B on one
    # machine, results/ftz-ab-h200-2026-11-29.log), where the forward ran 4 % faster.
    return not _INTERPRET and dtype != torch.float64


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(SPLIT=dtype in (torch.float16, torch.bfloat16),
                UPCAST=_INTERPRET and dtype == torch.bfloat16)


def _group_blocks(D: int, M: int, dtype: torch.dtype, kind: str = "fwd"):
    """(BLOCK_M, BLOCK_D, heads per tile, fallback slots per chunk, num_warps) of the group
    forward (kind "fwd") or query-cluster backward ("bwd_q"), or None for the per-query
    kernel: key list too long for one tile, the group kernel off in TUNING_GROUP for this
    dtype, or float64 on a GPU
    (Triton has no float64 tl.dot there; the interpreter runs it, which is how the suite
    checks the group kernels in float64)."""
    block_m, block_d = max(16, _np2(M)), max(16, _np2(D))
    if block_m * block_d > _GROUP_TILE // (2 if dtype == torch.float64 else 1):
        return None
    if dtype == torch.float64 and not _INTERPRET:
        return None
    warps = TUNING_GROUP[kind, _width(dtype)]
    if not warps:
        return None
    heads = TUNING_GROUP_HEADS.get(kind, 1)
    if block_m * block_d * heads > _GROUP_TILE // (2 if dtype == torch.float64 else 1):
        heads = 1  # the k / v tiles hold every head's columns
    return block_m, block_d, heads, _chunk_slots(kind, dtype, _GROUP, block_d, M), warps


# The Gluon kernel, launched like the others (build_check records and compiles it too);
# None on a Triton that cannot build it.
_attn_fwd_gluon_kernel = (_Launch(_gluon._attn_fwd_gluon_kernel)
                          if _gluon.available(_TRITON_RELEASE) else None)


def _gluon_blocks(D: int, M: int, dtype: torch.dtype,
                  pe_span: int = 0) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_D) of the Gluon float32 forward, or None for the triton kernels:
    not float32, the interpreter (Gluon has none), a Triton outside 3.6-3.8 (a newer one
    warns: its Gluon API is not the one this kernel was built against), TUNING_GLUON
    off, a shape outside gluon_forward.blocks, or a bias table whose farthest element
    (``pe_span`` elements from its start) int32 offsets cannot reach: the kernel keeps
    bias row offsets as int32 in shared memory."""
    if dtype != torch.float32 or _INTERPRET:
        return None
    if not _gluon.available(_TRITON_RELEASE):
        if _gluon.untested_release(_TRITON_RELEASE):
            # Python's default filter shows a RuntimeWarning once per call site.
            warnings.warn(
                f"cluster: Triton {triton.__version__} is newer than the Gluon API the float32 "
                f"forward was built against (up to {'.'.join(map(str, _gluon.MAX_TRITON))}); "
                "it runs on the FMA group kernel instead (correct, slower)",
                RuntimeWarning, stacklevel=2)
        return None
    if not TUNING_GLUON.get("fwd", False) or pe_span >= 2**31:
        return None
    return _gluon.blocks(D, M)


def _lead_slots(block_d: int, M: int, dtype: torch.dtype) -> int:
    """Slots per chunk of the group forward's FMA path (_fwd_rows' LEAD): a [GROUP, slots,
    block_d] product within _GROUP_TILE elements (half in float64), the chunk that costs
    least as padded slots plus 8 per chunk (each chunk pays a rescale and its reductions):
    32 at M = 64 and 16 at M = 48 with D = 32, the fastest on the H200
    (results/fwd-fp32-lead-h200-2026-11-29.log)."""
    cap = max(1, (_GROUP_TILE // (2 if dtype == torch.float64 else 1)) // (_GROUP * block_d))
    sizes = [1 << i for i in range(cap.bit_length()) if (1 << i) <= min(cap, _np2(M))]
    return min(sizes, key=lambda c: (_cdiv(M, c) * c + 8 * _cdiv(M, c), -c))


# Elements of the key-cluster backward's [BLOCK_G * GROUP, BLOCK_D] query tiles (per head):
# 2 map entries at D = 32. Kernel times on the H200, bf16, with 2 heads per tile and 2 warps:
# affmae_stage1 0.40 ms against 0.56 for 4 entries; with 1 head, 4 entries and 2 warps
# (the previous setting) 0.46 (results/tune-group-bwd_kv-h200-2026-11-29.log).
_KV_GROUP_TILE = 512


def _kv_group_blocks(D: int, M: int, dtype: torch.dtype):
    """(BLOCK_G (map entries per chunk), BLOCK_D, heads per tile, num_warps) of the
    key-cluster backward, or None for the per-key kernel: M not whole slot blocks, the
    kernel off in TUNING_GROUP, or float64 on a GPU (no float64 tl.dot there; the
    interpreter runs it).

    TUNING_GROUP holds in the interpreter too: the group kernels' programs own 8 queries or
    keys where the per-query / per-key kernels' own 64 there, so the CPU suite's large
    float32 cases would take minutes longer. Tests of these kernels in float32 / float64
    switch them on (tests/conftest.py, group_kernels_on)."""
    if M % _GROUP or M < _GROUP:
        return None
    if dtype == torch.float64 and not _INTERPRET:
        return None
    warps = TUNING_GROUP["bwd_kv", _width(dtype)]
    if not warps:
        return None
    block_d = max(16, _np2(D))
    if _INTERPRET:
        # Chunks of 4 entries: the CPU suite's small lists still take several chunks.
        return 4, block_d, TUNING_GROUP_HEADS["bwd_kv"], 4
    # tl.dot wants >= 16 columns, i.e. two entries of 8 queries at least.
    return (max(2, min(8, _KV_GROUP_TILE // (_GROUP * block_d))), block_d,
            TUNING_GROUP_HEADS["bwd_kv"], warps)


def _attn_forward(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale):
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
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
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
    with _device_guard(q):
        if gluon is not None:
            hpg, nhg = _head_groups(n_groups, B, H, q.device, per_sm=_GLUON_PER_SM)
            _attn_fwd_gluon_kernel[(n_groups, B * nhg)](
                *args, H, N, M, D, hi, lo, hpg, nhg, HAS_PE=has_pe, HAS_MASK=has_mask,
                HAS_BLANK=has_blank, BLOCK_M=gluon[0], BLOCK_D=gluon[1],
                NCH=_cdiv(M, gluon[0]), DC=TUNING_GLUON_CHUNKS["dc"],
                KC=TUNING_GLUON_CHUNKS["kc"], num_warps=1,
                maxnreg=_maxnreg("fwd_gluon", q.dtype),
            )
        elif grouped is not None:
            BM, BD, heads, GM, warps = grouped
            fma = TUNING_GROUP_FMA.get(("fwd", _width(q.dtype)), False)
            hpg, nhg = _head_groups(n_groups, B, H, q.device, heads)
            _attn_fwd_cluster_kernel[(n_groups, B * nhg)](
                *args, H, N, M, D, hi, lo, hpg, nhg, **flags, GROUP=_GROUP,
                HEADS=heads, BLOCK_M=BM, BLOCK_D=BD, GEN_M=GM, **_dot_flags(q.dtype),
                DOT=not fma, LEAD_M=_lead_slots(BD, M, q.dtype) if fma else 1,
                FTZ=_ftz(q.dtype), num_warps=warps, num_stages=_GROUP_FWD_STAGES,
                maxnreg=_maxnreg("fwd_group", q.dtype),
            )
        else:
            BQ, BM, BD, warps = _attn_blocks(D, M, q.dtype, "fwd")
            hpg, nhg = _head_groups(_cdiv(N, BQ), B, H, q.device)
            _attn_fwd_kernel[(_cdiv(N, BQ), B * nhg)](
                *args, H, N, M, D, hi, lo, hpg, nhg, **flags, ONE_CHUNK=BM >= M,
                BLOCK_Q=BQ, BLOCK_M=BM, BLOCK_D=BD, FTZ=_ftz(q.dtype), num_warps=warps,
                maxnreg=_maxnreg("fwd", q.dtype),
            )
    return out, lse


# =========================================================================== backward


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
    tl.store(DQ + h * N * D + offs_q[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_ok)


@triton.jit
def _bwd_q_batch(Q, K, V, O, DO, DQ, LSE, DELTA, IDX, PEIDX, MASK, DSBUF, b,
                 sqb, skb, svb, sob, sdob, H, N, M, D):
    """The query-side kernels' pointers offset to batch b."""
    return (Q + b * sqb, K + b * skb, V + b * svb, O + b * sob, DO + b * sdob,
            DQ + b * H * N * D, LSE + b * H * N, DELTA + b * H * N, IDX + b * N * M,
            PEIDX + b * N * M, MASK + b * N * M, DSBUF + b * N * M * H)


@_Launch
@triton.jit
def _attn_bwd_q_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV,
    DPE, DSBUF, AMAX_DO, AMAX_V, DPE_SCALE, DBK_PART, DBV_PART,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    spet, speh, sbkh, sbvh,
    H, N, M, D, T, R, scale_hi, scale_lo, HPG, NHG, log2_c,
    HAS_PE: tl.constexpr, DPE_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BLANK: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Query side: Delta, dq, the blank's partial sums and the bias-table gradient.

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
    idx0, pe0, ok0, off0 = 0, 0, 0, 0
    if ONE_CHUNK:
        idx0, pe0, ok0, off0 = _load_slots(IDX, PEIDX, MASK, row_off, q_ok, 0, M,
                                           HAS_PE, HAS_MASK, BLOCK_M)
    dpe_scale = _dpe_step_scale(AMAX_DO, AMAX_V, DPE_SCALE, log2_c, (pid == 0) & (pid_bh == 0),
                                DPE_MODE)
    for h in range(h_lo, h_hi):
        _bwd_q_rows(Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV, DPE, DSBUF,
                    DBK_PART, DBV_PART, h, lin, rep, dpe_scale, offs_q, q_ok, row_off, idx0,
                    pe0, ok0, off0, sqh, sqn, skh, skn, svh, svn, soh, son, sdoh, sdon, spet,
                    speh, sbkh, sbvh, H, N, M, D, T, scale_hi, scale_lo, HAS_PE, DPE_MODE,
                    HAS_MASK, HAS_BLANK, ONE_CHUNK, BLOCK_M, BLOCK_D, ACC)


@_Launch
@triton.jit
def _attn_bwd_q_cluster_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV,
    DPE, DSBUF, AMAX_DO, AMAX_V, DPE_SCALE, DBK_PART, DBV_PART,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    spet, speh, sbkh, sbvh,
    H, N, M, D, T, R, scale_hi, scale_lo, HPG, NHG, log2_c,
    HAS_PE: tl.constexpr, DPE_MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BLANK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, GEN_M: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):
    """Query side by query cluster, one program per GROUP queries: _attn_bwd_q_kernel's
    work, but a group sharing its key list (AFF's layout) gathers the keys and values once
    and takes the scores, dp = dout v^T and dq += ds k as tl.dot products of GROUP rows,
    as _attn_fwd_cluster_kernel does; a group that does not
    share falls back to the per-query path."""
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
            tl.store(DQ + h * N * D + offs_q[:, None] * D + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=qd_ok)
    else:
        offs_g = pid * GROUP + tl.arange(0, GROUP)
        g_ok = offs_g < N
        for h in range(h_lo, h_hi):
            _bwd_q_rows(Q, K, V, O, DO, LSE, DELTA, DQ, IDX, PEIDX, MASK, PE, BK, BV, DPE,
                        DSBUF, DBK_PART, DBV_PART, h, lin, rep, dpe_scale, offs_g, g_ok,
                        offs_g * M, 0, 0, 0, 0, sqh, sqn, skh, skn, svh, svn, soh, son, sdoh,
                        sdon, spet, speh, sbkh, sbvh, H, N, M, D, T, scale_hi, scale_lo,
                        HAS_PE, DPE_MODE, HAS_MASK, HAS_BLANK, False, GEN_M, BLOCK_D, ACC)


@triton.jit
def _bwd_kv_rows(
    Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, PE, h, offs_k, k_ok,
    sqh, sqn, skh, skn, svh, svn, sdoh, sdon, spet, speh,
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
    _bwd_kv_store(DK, DV, h * N * D + offs_k * D, offs_d, kd_ok, dk, dv, scale_hi, scale_lo)


@triton.jit
def _bwd_kv_store(DK, DV, row_off, cols, ok, dk, dv, scale_hi, scale_lo):
    """Row r of dk / dv to DK / DV + row_off[r] + cols (dk still without the scale)."""
    dk = dk * scale_hi + dk * scale_lo
    out_off = row_off[:, None] + cols[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kv_batch(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, b,
                  sqb, skb, svb, sdob, H, N, M, D):
    """The key-side kernels' pointers offset to batch b (dk, dv, lse and delta are
    contiguous [B, H, N(, D)]; the maps and pe_idx [B, N * M], ptr [B, N + 1])."""
    return (Q + b * sqb, K + b * skb, V + b * svb, DO + b * sdob, LSE + b * H * N,
            DELTA + b * H * N, DK + b * H * N * D, DV + b * H * N * D, PERM + b * N * M,
            PTR + b * (N + 1), PEIDX + b * N * M)


@_Launch
@triton.jit
def _attn_bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, PE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    spet, speh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, FTZ: tl.constexpr,
):
    """Key side: each program owns BLOCK_K keys and walks the queries that name them
    (the reverse map), so dk / dv are plain stores in a fixed order."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < N
    Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX = _bwd_kv_batch(
        Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, b, sqb, skb, svb, sdob, H, N, M, D)
    for h in range(h_lo, h_hi):
        _bwd_kv_rows(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, PE, h, offs_k, k_ok,
                     sqh, sqn, skh, skn, svh, svn, sdoh, sdon, spet, speh, N, M, D,
                     scale_hi, scale_lo, HAS_PE, BLOCK_K, BLOCK_E, BLOCK_D, ACC, FTZ)


@_Launch
@triton.jit
def _group_key_kernel(IDX, MASK, GKEY, CNT, BAD, N, M, NKC, CNT_AT, HAS_MASK: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Group-level reverse-map keys: GKEY[b, g * J + j] = the key cluster that slot block j
    (slots j*GROUP .. j*GROUP + GROUP-1) of query group g names, or NKC when no query of the
    group uses that block; CNT[b, c + CNT_AT] counts the used blocks naming key cluster c
    (CNT_AT is 1 or 0: see _group_reverse_map). BAD[b] is raised when some group of batch
    b does not share one key list, or a used block is not one whole key cluster in order
    (slot t of the block naming token cluster * GROUP + t): then batch b needs the
    token-level map."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    J: tl.constexpr = BLOCK_M // GROUP
    IDX += b * N * M
    MASK += b * N * M
    _q, _q_ok, _pe, _ok, lead, live, shared = _group_slots(
        IDX, IDX, MASK, g, N, M, False, HAS_MASK, GROUP, 1, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    t = offs_m % GROUP
    in_range = (lead >= 0) & (lead < N)
    misplaced = live & (((lead % GROUP) != t) | ~in_range)
    c = lead // GROUP
    c_hi = tl.max(tl.reshape(tl.where(live, c, -1), (J, GROUP)), 1)
    c_lo = tl.min(tl.reshape(tl.where(live, c, NKC), (J, GROUP)), 1)
    used = c_hi >= 0
    split = used & (c_hi != c_lo)
    bad = (shared == 0) | (tl.max(misplaced.to(tl.int32), 0) > 0) | \
        (tl.max(split.to(tl.int32), 0) > 0)
    offs_j = tl.arange(0, J)
    n_blocks = M // GROUP
    tl.store(GKEY + (b * tl.num_programs(0) + g) * n_blocks + offs_j,
             tl.where(used, c_hi, NKC).to(GKEY.dtype.element_ty), mask=offs_j < n_blocks)
    # Counted only where c_hi names a key cluster: an index out of range (which flags the
    # batch) must not become an address.
    counted = used & (c_hi < NKC) & (offs_j < n_blocks)
    tl.atomic_add(CNT + b * (NKC + 1) + CNT_AT + tl.where(counted, c_hi, 0), 1, mask=counted,
                  sem="relaxed")
    # Relaxed: read only by later kernels.
    tl.atomic_max(BAD + b, bad.to(tl.int32), sem="relaxed")


@triton.jit
def _kv_cluster_tile(
    Q, K, V, DO, LSE, DELTA, DK, DV, GPERM, PEIDX, MASK, PE, kc, h, start, cnt, n_blocks,
    sqh, sqn, skh, skn, svh, svn, sdoh, sdon, spet, speh,
    N, M, D, scale_hi, scale_lo,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    FTZ: tl.constexpr, ACC: tl.constexpr,
):
    """dk, dv of key cluster kc in heads h .. h + HEADS - 1 (HEADS = 1 or 2), walking its
    cnt entries of the group-level map from ``start``. The GROUP * HEADS key rows hold the
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
        # is emulated on the GPU: 0.63 vs 0.45 ms for this kernel).
        ent = tl.load(GPERM + start + e0 + c // GROUP, mask=e_ok, other=0).to(tl.int32)
        qi = (ent // n_blocks) * GROUP + c % GROUP
        q_ok = e_ok & (qi < N)
        slot = qi * M + (ent % n_blocks) * GROUP
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
    _bwd_kv_store(DK, DV, (h + hr) * N * D + keys * D, dc, kd_ok, dk, dv, scale_hi, scale_lo)


@_Launch
@triton.jit
def _attn_bwd_kv_cluster_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, GPERM, GPTR, BAD, PEIDX, MASK, PE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    spet, speh,
    H, N, M, D, scale_hi, scale_lo, HPG, NHG,
    HAS_PE: tl.constexpr, HAS_MASK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, FTZ: tl.constexpr, ACC: tl.constexpr,
):
    """Key side by key cluster: one program per GROUP consecutive keys. When every query
    group of the batch shares its list and names whole key clusters (AFF's layout, checked
    by _group_key_kernel), the group-level map lists which (query group, slot block) pairs
    name this cluster; each pair is a dense GROUP x GROUP block of scores, so a chunk of
    BLOCK_G pairs is flash-attention's key-side step on gathered query rows: transposed
    scores K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q, all tl.dot. Every
    query row is read once per key cluster, where the per-key walk reads it once per key.
    The program's heads go HEADS at a time through one tile (_kv_cluster_tile), an odd
    last one alone. Otherwise the program walks the token-level map."""
    kc = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h_lo, h_hi = _batch_heads(pid_bh, NHG, HPG, H)
    n_kc = tl.num_programs(0)
    Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX = _bwd_kv_batch(
        Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, b, sqb, skb, svb, sdob, H, N, M, D)
    MASK += b * N * M
    if tl.load(BAD + b) == 0:
        n_blocks = M // GROUP
        GPTR += b * (n_kc + 1)
        GPERM += b * tl.cdiv(N, GROUP) * n_blocks
        start = tl.load(GPTR + kc)
        cnt = tl.load(GPTR + kc + 1) - start
        for h in range(h_lo, h_hi - (HEADS - 1), HEADS):
            _kv_cluster_tile(Q, K, V, DO, LSE, DELTA, DK, DV, GPERM, PEIDX, MASK, PE, kc, h,
                             start, cnt, n_blocks, sqh, sqn, skh, skn, svh, svn, sdoh, sdon,
                             spet, speh, N, M, D, scale_hi, scale_lo, HAS_PE, HAS_MASK, GROUP,
                             HEADS, BLOCK_G, BLOCK_D, SPLIT, UPCAST, FTZ, ACC)
        if HEADS > 1:
            if (h_hi - h_lo) % HEADS != 0:
                _kv_cluster_tile(Q, K, V, DO, LSE, DELTA, DK, DV, GPERM, PEIDX, MASK, PE, kc,
                                 h_hi - 1, start, cnt, n_blocks, sqh, sqn, skh, skn, svh, svn,
                                 sdoh, sdon, spet, speh, N, M, D, scale_hi, scale_lo, HAS_PE,
                                 HAS_MASK, GROUP, 1, BLOCK_G, BLOCK_D, SPLIT, UPCAST, FTZ,
                                 ACC)
    else:
        offs_k = kc * GROUP + tl.arange(0, GROUP)
        k_ok = offs_k < N
        for h in range(h_lo, h_hi):
            _bwd_kv_rows(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, PTR, PEIDX, PE, h, offs_k,
                         k_ok, sqh, sqn, skh, skn, svh, svn, sdoh, sdon, spet, speh, N, M, D,
                         scale_hi, scale_lo, HAS_PE, GROUP, BLOCK_E, BLOCK_D, ACC, FTZ)


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


# Deterministic d_pe_table: a few table rows (the central offsets) collect most of the
# B*N*M entries, so one program per row would leave the GPU waiting on those few; each row
# is cut into up to 32 pieces, summed afterwards in a fixed order, as long as the grid
# stays within ~256k programs (large tables, e.g. 261k rows at N=64k, get one piece: mostly
# empty programs would cost more than the imbalance).
_SEGMENT_PIECES = 32
_SEGMENT_PROGRAMS = 1 << 18


def _pe_grad_deterministic(ds_buf, pe_idx, mask, T, H, acc_dtype):
    """Sum ds [B*N*M, H] per table row through a CSR of pe_idx (no atomics)."""
    key = pe_idx.reshape(-1).to(_sort_key_dtype(T))
    if mask is not None:
        key = torch.where(mask.reshape(-1), key, torch.full_like(key, T))
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(T + 1, device=key.device, dtype=key.dtype)
    ptr = torch.searchsorted(sorted_key, bounds, out_int32=True)
    pieces = 2 if _INTERPRET else max(1, min(_SEGMENT_PIECES, _SEGMENT_PROGRAMS // T))
    out = torch.empty((pieces, T, H), dtype=acc_dtype, device=ds_buf.device)
    with _device_guard(ds_buf):
        _segment_sum_kernel[(T, pieces)](
            ds_buf, perm, ptr, out, H, T, BLOCK_E=64, BLOCK_C=_np2(H),
            ACC=_tl_acc(acc_dtype), num_warps=_NUM_WARPS,
        )
    return out.sum(0)


def _attn_backward(dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k,
                   blank_v, scale, deterministic, compute_kv, compute_pe):
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
    q_group = _group_blocks(D, M, q.dtype, "bwd_q")
    if q_group is not None:
        BM, BD, _heads, GM, warps = q_group
        n_qblocks = _cdiv(N, _GROUP)
    else:
        BQ, BM, BD, warps = _attn_blocks(D, M, q.dtype, "bwd_q")
        n_qblocks = _cdiv(N, BQ)
    hi, lo = _split_scale(scale)
    hpg, nhg = _head_groups(n_qblocks, B, H, dev)

    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    delta = torch.empty((B, H, N), dtype=acc, device=dev)
    kv_group = _kv_group_blocks(D, M, q.dtype) if compute_kv else None
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
                     (_group_map_words(B, N) if kv_group is not None else 0, torch.int32),
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
        if fixed:
            _dpe_fixed_amax(dout, v, bv if has_blank else None, amax[0:2])
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
                       BLOCK_M=BM, BLOCK_D=BD, ACC=_tl_acc(q.dtype), num_warps=warps)
        if q_group is not None:
            _attn_bwd_q_cluster_kernel[(n_qblocks, B * nhg)](
                *q_args, **q_flags, GROUP=_GROUP, GEN_M=GM,
                **_dot_flags(q.dtype), num_stages=_GROUP_BWDQ_STAGES,
                maxnreg=_maxnreg("bwd_q_group", q.dtype),
            )
        else:
            _attn_bwd_q_kernel[(n_qblocks, B * nhg)](
                *q_args, **q_flags, ONE_CHUNK=BM >= M, BLOCK_Q=BQ,
                maxnreg=_maxnreg("bwd_q", q.dtype),
            )

        if compute_kv:
            dk = torch.empty((B, H, N, D), dtype=k.dtype, device=dev)
            dv = torch.empty((B, H, N, D), dtype=v.dtype, device=dev)
            masks = mask_u8 if has_mask else None
            bad = None
            if kv_group is not None:
                gperm, gptr, bad = _group_reverse_map(idx, masks, N, deterministic, zeroed[1])
            # Token-level maps only for the batches the group-level map flags (none on AFF's
            # inputs), decided on the device: a sync here would leave the GPU idle while the
            # host issues the rest, in every layer's backward.
            if not deterministic:
                perm, ptr = _reverse_map_counting(idx, masks, N, need=bad, count=zeroed[2])
            elif kv_group is None:
                perm, ptr = _reverse_map(idx, mask_b, N)
            else:
                perm, ptr = _reverse_map_stable(idx, masks, N, need=bad)
            kv_args = (
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                pe_t.stride(0) if has_pe else 0, pe_t.stride(1) if has_pe else 0,
            )
            BK_, BE, KBD, kv_warps = _attn_blocks(D, M, q.dtype, "bwd_kv")
            if kv_group is not None:
                BG, GBD, kv_heads, gw = kv_group
                n_kc = _cdiv(N, _GROUP)
                kv_hpg, kv_nhg = _head_groups(n_kc, B, H, dev, kv_heads)
                _attn_bwd_kv_cluster_kernel[(n_kc, B * kv_nhg)](
                    q, k, v, dout, lse, delta, dk, dv, perm, ptr, gperm, gptr, bad,
                    pe_idx, mask_u8, pe_t, *kv_args, H, N, M, D, hi, lo, kv_hpg, kv_nhg,
                    HAS_PE=has_pe, HAS_MASK=has_mask, GROUP=_GROUP,
                    HEADS=kv_heads, BLOCK_G=BG, BLOCK_E=BE, BLOCK_D=GBD,
                    **_dot_flags(q.dtype), FTZ=_ftz(q.dtype), ACC=_tl_acc(q.dtype),
                    num_warps=gw, maxnreg=_maxnreg("bwd_kv_group", q.dtype),
                )
            else:
                kv_hpg, kv_nhg = _head_groups(_cdiv(N, BK_), B, H, dev)
                _attn_bwd_kv_kernel[(_cdiv(N, BK_), B * kv_nhg)](
                    q, k, v, dout, lse, delta, dk, dv, perm, ptr, pe_idx, pe_t, *kv_args,
                    H, N, M, D, hi, lo, kv_hpg, kv_nhg,
                    HAS_PE=has_pe, BLOCK_K=BK_, BLOCK_E=BE, BLOCK_D=KBD,
                    ACC=_tl_acc(q.dtype), FTZ=_ftz(q.dtype), num_warps=kv_warps,
                    maxnreg=_maxnreg("bwd_kv", q.dtype),
                )
        else:
            dk = q.new_empty(0, dtype=k.dtype)
            dv = q.new_empty(0, dtype=v.dtype)

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


# =========================================================================== weighted features


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
            num_warps=_NUM_WARPS,
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
                BLOCK_Q=BQ, BLOCK_M=BM, BLOCK_C=BC, ACC=acc, num_warps=_NUM_WARPS,
            )
        if need_f:
            df = torch.empty((B, Nf, C), dtype=feat.dtype, device=feat.device)
            perm, ptr = _reverse_map(idx, None, Nf)
            _wf_bwd_f_kernel[(_cdiv(Nf, BQ), _cdiv(C, BC), B)](
                dout, weights, df, perm, ptr, dout.stride(0), dout.stride(1), dout.stride(2),
                weights.stride(0), weights.stride(1), weights.stride(2), weights.stride(3),
                N, Nf, M, W, C, BLOCK_K=BQ, BLOCK_E=BM, BLOCK_C=BC, ACC=acc,
                num_warps=_NUM_WARPS,
            )
    return dw, df


# =========================================================================== registration
#
# Custom ops keep torch.compile from tracing into Triton launches (and the host-side
# sorts of the backward): dynamo sees one opaque op per direction, with fake
# implementations giving output metadata, and autograd goes through register_autograd.
# Absent optional gradients come back as empty tensors because custom ops cannot
# return None.

Tensor = torch.Tensor


@torch.library.custom_op("cluster_triton::attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, member_idx: Tensor, pe_table: Tensor | None,
    pe_idx: Tensor | None, mask: Tensor | None, blank_k: Tensor | None,
    blank_v: Tensor | None, scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    return _attn_forward(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale)


@_attn_fwd_op.register_fake
def _attn_fwd_fake(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                   deterministic):
    B, H, N, D = q.shape
    return (q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=_acc_dtype(q.dtype)))


@torch.library.custom_op("cluster_triton::attn_bwd", mutates_args=())
def _attn_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    member_idx: Tensor, pe_table: Tensor | None, pe_idx: Tensor | None, mask: Tensor | None,
    blank_k: Tensor | None, blank_v: Tensor | None, scale: float, deterministic: bool,
    compute_kv: bool, compute_pe: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _attn_backward(dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask,
                          blank_k, blank_v, scale, deterministic, compute_kv, compute_pe)


@_attn_bwd_op.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k,
                   blank_v, scale, deterministic, compute_kv, compute_pe):
    B, H, N, D = q.shape
    dq = q.new_empty((B, H, N, D))
    if compute_kv:
        dk, dv = k.new_empty((B, H, N, D)), v.new_empty((B, H, N, D))
    else:
        dk, dv = q.new_empty(0, dtype=k.dtype), q.new_empty(0, dtype=v.dtype)
    if pe_table is not None and compute_pe:
        dpe = pe_table.new_empty(pe_table.shape)
    else:
        dpe = q.new_empty(0)
    if blank_k is not None:
        dbk, dbv = blank_k.new_empty((H, D)), blank_v.new_empty((H, D))
    else:
        dbk, dbv = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dpe, dbk, dbv


def _save_attn_context(ctx, inputs, out, lse):
    """What either autograd path keeps for :func:`_attn_backward_autograd`."""
    q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale, deterministic = inputs
    ctx.save_for_backward(q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k,
                          blank_v)
    ctx.scale = scale
    ctx.deterministic = deterministic


def _attn_setup_context(ctx, inputs, output):
    out, lse = output
    _save_attn_context(ctx, inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def _attn_backward_autograd(ctx, dout, _dlse, backward=_attn_bwd_op):
    q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k, blank_v = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv, dpe, dbk, dbv = backward(
        dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k, blank_v,
        ctx.scale, ctx.deterministic, bool(need[1] or need[2]), bool(need[4]),
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        None,
        dpe if (pe_table is not None and need[4]) else None,
        None,
        None,
        dbk if (blank_k is not None and need[7]) else None,
        dbv if (blank_v is not None and need[8]) else None,
        None,
        None,
    )


_attn_fwd_op.register_autograd(_attn_backward_autograd, setup_context=_attn_setup_context)


@torch.library.custom_op("cluster_triton::wf_fwd", mutates_args=())
def _wf_fwd_op(weights: Tensor, feat: Tensor, member_idx: Tensor) -> Tensor:
    return _wf_forward(weights, feat, member_idx)


@_wf_fwd_op.register_fake
def _wf_fwd_fake(weights, feat, member_idx):
    B, N, M, W = weights.shape
    return feat.new_empty((B, N, W, feat.shape[-1]))


@torch.library.custom_op("cluster_triton::wf_bwd", mutates_args=())
def _wf_bwd_op(dout: Tensor, weights: Tensor, feat: Tensor, member_idx: Tensor,
               need_w: bool, need_f: bool) -> tuple[Tensor, Tensor]:
    return _wf_backward(dout, weights, feat, member_idx, need_w, need_f)


@_wf_bwd_op.register_fake
def _wf_bwd_fake(dout, weights, feat, member_idx, need_w, need_f):
    dw = weights.new_empty(weights.shape) if need_w else weights.new_empty(0)
    df = feat.new_empty(feat.shape) if need_f else feat.new_empty(0)
    return dw, df


def _wf_setup_context(ctx, inputs, output):
    weights, feat, member_idx = inputs
    ctx.save_for_backward(weights, feat, member_idx)


def _wf_backward_autograd(ctx, dout):
    weights, feat, member_idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    dw, df = _wf_bwd_op(dout, weights, feat, member_idx, bool(need[0]), bool(need[1]))
    return (dw if need[0] else None, df if need[1] else None, None)


_wf_fwd_op.register_autograd(_wf_backward_autograd, setup_context=_wf_setup_context)


class _AttnFunction(torch.autograd.Function):
    """Eager twin of the custom op: the same forward, context and backward, without the
    custom-op layer, which costs about 1 ms of host time per training step on the H100
    host (torch 2.11) — more than the whole GPU time of the smaller AFF shapes."""

    @staticmethod
    def forward(ctx, q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                deterministic):
        inputs = (q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                  deterministic)
        out, lse = _attn_forward(*inputs[:10])
        _save_attn_context(ctx, inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _attn_backward_autograd(ctx, dout, None, backward=_attn_backward)


def cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                      deterministic):
    """Fused cluster attention; arguments already validated by :func:`cluster.ops.check_inputs`.

    torch.compile traces the custom op (one opaque node per direction, fake tensors for
    shapes); eager calls take the autograd.Function, same kernels, less host overhead.
    """
    args = (q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, float(scale),
            bool(deterministic))
    if torch.compiler.is_compiling():
        return _attn_fwd_op(*args)[0]
    return _AttnFunction.apply(*args)


def weighted_features(weights, feat, member_idx):
    """Fused ``out[b,i,w,c] = sum_j weights[b,i,j,w] * feat[b, member_idx[b,i,j], c]``."""
    return _wf_fwd_op(weights, feat, member_idx)
