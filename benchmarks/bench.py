"""Benchmark of cluster attention: every backend x dtype x shape, forward and forward+backward.

Backends: reference (plain PyTorch through cluster.ops), reference-compile (torch.compile of
cluster.reference.cluster_attention), cuda, triton, triton-det (triton, deterministic=True),
and the peer flex: the same attention written with torch.nn.attention.flex_attention
(benchmarks/flex_peer.py; a mask_mod over each query's clusters plus the blank as key N, a
score_mod adding the relative-position bias, a block mask of --flex-block-size tiles; compiled
on CUDA, eager and forward-only on the CPU). Its records add block_mask_method, block_size,
block_mask_s (the block mask's build time, inside first_call_s), block_mask_warm_s (a rebuild),
block_sparsity_pct, block_tiles, masks_mib (membership table, positions, block mask) and
compiled; pe_grad says why pe_table got no gradient where the installed torch refuses it.
A backend that cannot run here is reported as skipped with the reason; an out-of-memory case
is recorded as "oom"; any other exception as "error" (exit status 1 after writing results).

Inputs are built as in an AFF model: synthetic token positions on a nearly full grid, Hilbert
clusters of 8 tokens, M neighbours per token (cluster.neighbors), index tensors as int32 and
the mask as bool, which is what the kernels read. --lists names the neighbour lists: "aff"
(each token's own nnc nearest clusters, AFF's) and/or "cluster" (one list per cluster, shared
by its tokens); every record carries its "lists".

Per case: median time (triton.testing.do_bench, else CUDA events), the case's memory floor
(the bytes a kernel must move at least, over the device-to-device copy bandwidth measured in
the same run), achieved GB/s over those bytes, the ratio time / floor, and the peak memory
of one step above the inputs; on a GPU also the GPU time of one step (the kernels' device
times summed under torch.profiler over a few steps) and its ratio to the floor, which do not
depend on how fast the host issues launches. The fp32 forward of each backend is compared with a float64
reference (max abs error). Forward is timed under torch.no_grad(); forward+backward includes
the backward of a fixed random dO into q, k, v, pe_table, blank_k and blank_v.

Results: <out>/<device-slug>-<YYYY-MM-DD>[-tag].json (metadata and every case), a Markdown
file of tables beside it and, when matplotlib is installed, a PNG, all three in --out
(default benchmarks/results/runs/<that stem>/); the JSON and Markdown are rewritten after
every shape and lists, so a run cut short keeps what it finished. --latest also copies the
three to benchmarks/results/latest/<device-slug>.*, the files the README links.
E.g. every fast row and the FlexAttention peer on both lists, one folder:

    python benchmarks/bench.py --shapes affmae_stage1,highres --backends triton,triton-det,cuda,flex \
        --lists aff,cluster --dtypes bf16,fp32 --tag r22 --out "$OUT" 2>&1 | tee "$OUT/r22.log"

--smoke runs one tiny fp32 case per backend and lists (on the CPU when there is no GPU, with
the Triton interpreter), checks every output and gradient against the float64 reference
(atol = rtol = 1e-4) and exits 1 on a mismatch or a crash.

Exit status: 0 all cases ran (or were skipped / oom), 1 a case failed, 2 nothing to run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Benchmark the checkout this script lives in, not whichever copy happens to be installed.
if (REPO / "src" / "cluster").is_dir():
    sys.path.insert(0, str(REPO / "src"))

# name: (B, N, C, H, M)
SHAPES = {
    "affmae_stage1": (64, 2048, 96, 3, 64),
    "aff_tiny_stage1": (64, 3136, 64, 2, 48),
    "aff_tiny_stage2": (64, 784, 128, 4, 48),
    "highres": (16, 16384, 64, 2, 48),
    "config_3_large": (32, 256, 256, 8, 64),
}
SMOKE_SHAPE = ("smoke_tiny", (1, 64, 16, 2, 16))
SWEEP_N = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
SWEEP_TOKENS = 131072
SWEEP_C, SWEEP_H, SWEEP_M = 64, 2, 48
CLUSTER_SIZE = 8

# harness name -> (cluster.ops backend, deterministic); reference-compile is handled apart
BACKENDS = {
    "reference": ("reference", False),
    "reference-compile": ("reference", False),
    "cuda": ("cuda", False),
    "triton": ("triton", False),
    "triton-det": ("triton", True),
}
# comparison rows that are not cluster.ops backends: written with other APIs
PEERS = ("flex",)
ROWS = (*BACKENDS, *PEERS)
LISTS = ("aff", "cluster")  # cluster.neighbors.build_neighborhoods(lists=...); AFF's first
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
MODES = ("fwd", "fwd+bwd")
GRAD_NAMES = ("q", "k", "v", "pe_table", "blank_k", "blank_v")
SMOKE_TOL = 1e-4


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ inputs

@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    member_idx: torch.Tensor
    pe_table: torch.Tensor
    pe_idx: torch.Tensor
    mask: torch.Tensor
    blank_k: torch.Tensor
    blank_v: torch.Tensor
    dout: torch.Tensor
    scale: float
    # what the flex peer reads besides: token positions [B, N, 2] float32 in the reordered
    # order of member_idx, the relative-position table's half-width, the lists' name
    pos: torch.Tensor | None = None
    R: int | None = None
    lists: str = "aff"

    def cast(self, dtype: torch.dtype, requires_grad: bool) -> Inputs:
        """Float tensors as fresh leaves of ``dtype``; index tensors (and pos) shared."""
        def leaf(t):
            return t.detach().to(dtype).clone().requires_grad_(requires_grad)
        return Inputs(leaf(self.q), leaf(self.k), leaf(self.v), self.member_idx, leaf(self.pe_table),
                      self.pe_idx, self.mask, leaf(self.blank_k), leaf(self.blank_v),
                      self.dout.to(dtype), self.scale, self.pos, self.R, self.lists)

    def leaves(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.pe_table, self.blank_k, self.blank_v]

    def batch_slice(self, b0: int, b1: int) -> Inputs:
        return Inputs(self.q[b0:b1], self.k[b0:b1], self.v[b0:b1], self.member_idx[b0:b1],
                      self.pe_table, self.pe_idx[b0:b1], self.mask[b0:b1], self.blank_k,
                      self.blank_v, self.dout[b0:b1], self.scale,
                      None if self.pos is None else self.pos[b0:b1], self.R, self.lists)


def grid_for(N: int) -> tuple[int, int]:
    # A nearly full grid, as at an AFF stage before much token dropping.
    h = math.ceil(math.sqrt(N))
    return h, math.ceil(N / h)


def build_inputs(dims: tuple, device: torch.device, seed: int = 0, lists: str = "aff") -> Inputs:
    """fp32 inputs of one shape; the neighbourhoods (``lists``: "aff" or "cluster") are built
    on the CPU, then moved."""
    from cluster import neighbors

    B, N, C, H, M = dims
    D = C // H
    h, w = grid_for(N)
    pos = neighbors.make_synthetic_positions(B, N, h, w, seed=seed, grid=True)
    # torch kNN: deterministic, and avoids a KeOps compile on hosts that have pykeops.
    nb = neighbors.build_neighborhoods(pos, cluster_size=CLUSTER_SIZE, nbhd_size=M, h=h, w=w,
                                       knn_method="torch", lists=lists)
    T = nb.table_width ** 2
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    return Inputs(
        q=randn(B, H, N, D), k=randn(B, H, N, D), v=randn(B, H, N, D),
        member_idx=nb.member_idx.to(device=device, dtype=torch.int32),
        pe_table=randn(T, H), pe_idx=nb.pe_idx.to(device=device, dtype=torch.int32),
        mask=nb.cluster_mask.to(device=device, dtype=torch.bool),
        blank_k=randn(H, D), blank_v=randn(H, D), dout=randn(B, H, N, D), scale=D ** -0.5,
        pos=nb.pos.to(device=device, dtype=torch.float32), R=nb.R, lists=lists,
    )


def floor_bytes(dims: tuple, dtype: torch.dtype, mode: str) -> int:
    """Bytes a kernel must move at least.

    Forward: read q, k, v and the neighbour lists (member_idx and pe_idx as int32, mask as
    1 byte), write the output. Forward+backward: the forward's bytes plus reading dO and
    writing dq, dk, dv. The backward's re-reads of q, k, v and the indices are not counted:
    the floor is a lower bound, not a target (as the spec of this harness defines it).
    pe_table and blank_* are negligible and left out.
    """
    B, N, C, H, M = dims
    act = B * H * N * (C // H) * torch.tensor([], dtype=dtype).element_size()
    idx = B * N * M * (4 + 4 + 1)
    fwd = 4 * act + idx
    return fwd if mode == "fwd" else fwd + 4 * act


# ------------------------------------------------------------------------------ backends

def backend_skip_reason(name: str, device: torch.device, dtype: torch.dtype,
                        dims: tuple | None = None, mode: str | None = None) -> str | None:
    """Why row ``name`` cannot run here (None: it can); ``mode`` for the mode-dependent ones."""
    from cluster import ops

    if name == "reference-compile":
        return compile_unavailable_reason(device)
    if name == "flex":
        import flex_peer

        head_dim = dims[2] // dims[3] if dims is not None else None
        why = flex_peer.unavailable_reason(device, head_dim, mode)
        if why is None and device.type == "cuda" and mode is None:
            why = compile_unavailable_reason(device)
        return why
    return ops.backend_unavailable_reason(BACKENDS[name][0], device, dtype)


def compile_unavailable_reason(device: torch.device) -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo
        if not dynamo.is_dynamo_supported():
            return f"torch.compile is not supported on Python {platform.python_version()}"
    except Exception as exc:
        return f"torch._dynamo is unusable: {type(exc).__name__}: {exc}"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
            if not has_triton():
                return "inductor needs triton for CUDA, and it is not usable here"
        except ImportError:
            pass
    elif not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        return "inductor on the CPU needs a C++ compiler, none found"
    return None


def make_attention(name: str, check_indices: bool, *, device: torch.device | None = None,
                   opt=None):
    """A callable ``Inputs -> out`` for harness backend ``name`` (``device``, ``opt``: the flex
    peer's compile choice and block-mask options)."""
    from cluster import ops, reference

    if name == "flex":
        import flex_peer

        return flex_peer.FlexRunner(
            compiled=device is not None and device.type == "cuda",
            block_size=getattr(opt, "flex_block_size", flex_peer.DEFAULT_BLOCK_SIZE),
            method=getattr(opt, "flex_block_mask", "kv-blocks"))
    if name == "reference-compile":
        import torch._dynamo

        # A fresh cache per shape/dtype: static shapes (no dynamic-shape recompiles) and
        # never the silent eager fallback that hitting the recompile limit causes.
        torch._dynamo.reset()
        compiled = torch.compile(reference.cluster_attention, dynamic=False)
        return lambda x: compiled(x.q, x.k, x.v, x.member_idx, x.pe_table, x.pe_idx, x.mask,
                                  x.blank_k, x.blank_v, x.scale)
    backend, det = BACKENDS[name]
    return lambda x: ops.cluster_attention(
        x.q, x.k, x.v, x.member_idx, pe_table=x.pe_table, pe_idx=x.pe_idx, mask=x.mask,
        blank_k=x.blank_k, blank_v=x.blank_v, scale=x.scale, backend=backend,
        deterministic=det, check_indices=check_indices)


def make_step(attn, x: Inputs, mode: str):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return attn(x)
    else:
        def step():
            out = attn(x)
            out.backward(x.dout)
            return out
    return step


# ------------------------------------------------------------------------------ timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_grads_none(tensors) -> None:
    for t in tensors:
        t.grad = None


def time_gpu(fn, grads, est_ms: float, opt, share: float = 1.0) -> tuple[float, int]:
    """Median ms and number of timed reps; at least ``min_reps`` unless that exceeds ``max_rep_ms``.
    ``share``: the fraction of that timed time to spend (one of several rounds)."""
    rep = max(opt.rep_ms, min(opt.min_reps * est_ms, opt.max_rep_ms)) * share
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        try:
            times = do_bench(fn, warmup=opt.warmup_ms, rep=rep, grad_to_none=grads, return_mode="all")
            return statistics.median(times), len(times)
        except (AssertionError, TypeError, ValueError):  # a triton without return_mode="all"
            return do_bench(fn, warmup=opt.warmup_ms, rep=rep, grad_to_none=grads, return_mode="median"), None
    n_warm = max(1, int(opt.warmup_ms / max(est_ms, 1e-3)))
    n_rep = max(1, int(rep / max(est_ms, 1e-3)))
    for _ in range(n_warm):
        set_grads_none(grads)
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_rep)]
    for start, end in ev:
        set_grads_none(grads)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in ev]
    return statistics.median(times), len(times)


def time_cpu(fn, grads, reps: int, device) -> tuple[float, int]:
    times = []
    for _ in range(reps):
        set_grads_none(grads)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def copy_bandwidth(device: torch.device, opt) -> float:
    """Device-to-device copy bandwidth in bytes/s (a copy reads and writes: 2 x bytes)."""
    nbytes = int(opt.copy_gib * 2**30) if device.type == "cuda" else 64 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    if device.type == "cuda":
        ms, _ = time_gpu(lambda: dst.copy_(src), None, 1.0, opt)
    else:
        ms, _ = time_cpu(lambda: dst.copy_(src), [], 5, device)
    return 2 * nbytes / (ms * 1e-3)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ one case

def _floor_ms(ctx, rec: dict) -> float:
    return rec["floor_bytes"] / ctx["bandwidth"] * 1e3


def _set_time(ctx, rec: dict, ms: float, reps) -> None:
    rec.update(status="ok", time_ms=ms, reps=reps, floor_ms=_floor_ms(ctx, rec),
               gbps=rec["floor_bytes"] / (ms * 1e-3) / 1e9, x_floor=ms / _floor_ms(ctx, rec))


def _time_step(ctx, step, grads, est_ms, rounds: int = 1) -> tuple[float, int | None]:
    """(median ms, reps) of ``step``: its share of the timed time when it is one of
    ``rounds`` rounds (the GPU's do_bench, or --smoke-reps split over the rounds on the CPU)."""
    device, opt = ctx["device"], ctx["opt"]
    if device.type == "cuda":
        return time_gpu(step, grads, est_ms, opt, share=1.0 / rounds)
    return time_cpu(step, grads, max(1, -(-opt.smoke_reps // rounds)), device)


def _set_failure(rec: dict, exc: BaseException) -> None:
    if is_oom(exc):
        rec.update(status="oom", reason=str(exc).splitlines()[0][:300])
    else:
        rec.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:2000]}")
        traceback.print_exc()


def measure(ctx, name: str, attn, x: Inputs, mode: str, rec: dict, keep: bool, timers=None):
    """Fill ``rec`` with the timing of one step; return (out, grads) of the last run if ``keep``.
    With ``timers`` (a list: --rounds > 1) the timing is left to :func:`time_rounds`: the
    record gets status "pending" and its step joins ``timers``."""
    device, opt = ctx["device"], ctx["opt"]
    step = make_step(attn, x, mode)
    grads = x.leaves() if mode == "fwd+bwd" else []
    result = None
    try:
        if hasattr(attn, "new_case"):  # the flex peer: its masks are built in the first call
            attn.new_case()
        set_grads_none(grads)
        t0 = time.perf_counter()
        out = step()  # compiles / autotunes
        sync(device)
        rec["first_call_s"] = round(time.perf_counter() - t0, 4)
        if hasattr(attn, "after_first_call"):
            rec.update(attn.after_first_call(x))
        missing = [n for n, t in zip(GRAD_NAMES, grads) if t.grad is None]
        if missing:
            rec["no_grad_into"] = missing
        if keep:  # the first call's results: a wrong first call is as wrong as any
            result = (out.detach(), {n: None if t.grad is None else t.grad.detach()
                                     for n, t in zip(GRAD_NAMES, grads)})
        del out
        est_ms = None
        if device.type == "cuda":
            set_grads_none(grads)
            t0 = time.perf_counter()
            step()
            sync(device)
            est_ms = (time.perf_counter() - t0) * 1e3
        if timers is not None:
            timers.append((rec, step, grads, est_ms))
            rec["status"] = "pending"
        else:
            _set_time(ctx, rec, *_time_step(ctx, step, grads, est_ms))
        if device.type == "cuda":
            rec["sm_clock_mhz"] = sm_clock_mhz(device)
            rec["peak_mib"] = peak_mib(step, grads, device)
            if opt.gpu_time:
                rec["gpu_ms"] = gpu_ms(step, grads, device)
                if rec["gpu_ms"] is not None:
                    rec["gpu_x_floor"] = rec["gpu_ms"] / _floor_ms(ctx, rec)
    except Exception as exc:
        _set_failure(rec, exc)
    finally:
        set_grads_none(grads)
        free_memory(device)
    return result


def time_rounds(ctx, timers) -> None:
    """Time the cases ``measure`` left pending (one shape and dtype) in --rounds rounds, the
    backends taking turns: the eager steps of the small shapes are host-bound, and a slow
    phase of the host would otherwise land on whichever case ran then. A case's time is the
    median of its rounds' medians (``round_ms`` keeps them)."""
    opt = ctx["opt"]
    per_round = {id(rec): [] for rec, *_ in timers}
    reps = {id(rec): [] for rec, *_ in timers}
    for _ in range(opt.rounds):
        for rec, step, grads, est_ms in timers:
            if rec["status"] != "pending":
                continue
            try:
                ms, n = _time_step(ctx, step, grads, est_ms, opt.rounds)
            except Exception as exc:
                _set_failure(rec, exc)
                continue
            finally:
                set_grads_none(grads)
            per_round[id(rec)].append(ms)
            reps[id(rec)].append(n)
    for rec, *_ in timers:
        if rec["status"] == "pending":
            times, ns = per_round[id(rec)], reps[id(rec)]
            _set_time(ctx, rec, statistics.median(times), None if None in ns else sum(ns))
            rec["round_ms"] = [round(t, 4) for t in times]
    timers.clear()
    free_memory(ctx["device"])


GPU_TIME_STEPS = 10


def gpu_ms(step, grads, device) -> float | None:
    """GPU time of one step: every kernel's (and memset's / copy's) device time, summed
    over GPU_TIME_STEPS profiled steps and divided by them. With only CUDA activities
    recorded no CPU-side op is counted beside its kernels. None (with a log line) where
    the profiler fails: the case keeps its other figures."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(GPU_TIME_STEPS):
                set_grads_none(grads)
                step()
            sync(device)
        total_us = 0.0
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", None)
            total_us += ev.cuda_time_total if us is None else us
        return total_us / 1e3 / GPU_TIME_STEPS if total_us > 0 else None
    except Exception as exc:
        log(f"    GPU time not measured: {type(exc).__name__}: {str(exc)[:200]}")
        return None


def sm_clock_mhz(device: torch.device) -> int | None:
    """The GPU's current SM clock through NVML, None where NVML is absent: a case timed
    after a throttling stretch (power, heat) shows a lower clock beside its time."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except Exception:
        return None


def peak_mib(step, grads, device) -> float:
    """Memory allocated during one step above what was allocated before it (inputs etc.)."""
    set_grads_none(grads)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def progress(rec: dict) -> None:
    head = (f"  {rec['shape']:>16} {rec['backend']:>17} {rec.get('lists') or '-':>7} "
            f"{rec['dtype']:>8} {rec['mode']:>7}:")
    if rec["status"] != "ok":
        log(f"{head} {rec['status']} ({rec.get('reason')})")
        return
    peak = f"  peak {rec['peak_mib']:.0f} MiB" if rec.get("peak_mib") is not None else ""
    err = rec.get("max_abs_err_vs_fp64")
    err = f"  err {err:.1e}" if isinstance(err, float) else ""
    check = f"  check {rec['smoke_check']}" if "smoke_check" in rec else ""
    clock = f", SM {rec['sm_clock_mhz']} MHz" if rec.get("sm_clock_mhz") else ""
    gpu = (f"  GPU {rec['gpu_ms']:.3f} ms x{rec['gpu_x_floor']:.2f}"
           if rec.get("gpu_ms") is not None else "")
    flex = (f"  block mask {rec['block_mask_s']:.3f} s (warm {rec['block_mask_warm_s']:.3f} s, "
            f"{rec['block_sparsity_pct']:.1f}% sparse)" if rec.get("block_mask_s") is not None else "")
    log(f"{head} {rec['time_ms']:9.3f} ms  {rec['gbps']:7.1f} GB/s  x{rec['x_floor']:5.2f} floor"
        f"  ({rec['reps']} reps, first call {rec['first_call_s']:.2f} s{clock}){gpu}{peak}{err}"
        f"{flex}{check}")


# ------------------------------------------------------------------------------ float64 reference

def reference64(x: Inputs, with_grads: bool, budget_bytes: float):
    """float64 output (and grads) of the reference, in batch chunks within ``budget_bytes``.

    Returns None when even one batch element would not fit the budget.
    """
    from cluster import reference

    B, H, N, D = x.q.shape
    M = x.member_idx.shape[-1]
    # The reference materialises [B, H, N, M, D] gathers of k and v plus one product.
    per_b = H * N * M * D * 8 * 3 * (2 if with_grads else 1)
    chunk = int(budget_bytes // per_b)
    if chunk < 1:
        return None
    outs, grads = [], {n: [] for n in GRAD_NAMES}
    for b0 in range(0, B, chunk):
        xs = x.batch_slice(b0, min(B, b0 + chunk)).cast(torch.float64, with_grads)
        with torch.set_grad_enabled(with_grads):
            out = reference.cluster_attention(xs.q, xs.k, xs.v, xs.member_idx, xs.pe_table,
                                              xs.pe_idx, xs.mask, xs.blank_k, xs.blank_v, xs.scale)
            if with_grads:
                out.backward(xs.dout)
                for n, t in zip(GRAD_NAMES, xs.leaves()):
                    grads[n].append(t.grad)
        outs.append(out.detach())
    if with_grads:
        # Chunks of per-batch tensors concatenate; parameters' grads add up.
        grads = {n: torch.cat(g) if n in ("q", "k", "v") else sum(g) for n, g in grads.items()}
    return torch.cat(outs), grads


# ------------------------------------------------------------------------------ runs

def base_record(kind, shape, dims, backend, dtype_name, mode, lists: str = "aff") -> dict:
    B, N, C, H, M = dims
    return {"kind": kind, "shape": shape, "B": B, "N": N, "C": C, "H": H, "M": M, "D": C // H,
            "backend": backend, "lists": lists, "dtype": dtype_name, "mode": mode, "status": None,
            "reason": None,
            "time_ms": None, "reps": None, "floor_ms": None, "gbps": None, "x_floor": None,
            "peak_mib": None, "first_call_s": None, "gpu_ms": None, "gpu_x_floor": None,
            "floor_bytes": floor_bytes(dims, DTYPES[dtype_name], mode)}


def run_shape(ctx, kind: str, shape: str, dims: tuple, dtype_names, oom_at=None,
              lists_names=None) -> list[dict]:
    """Every lists x backend x dtype x mode on one shape (``lists_names``: default
    ctx["lists"]); ``oom_at`` (sweep) skips cases past an OOM."""
    records = []
    for lists in lists_names or ctx["lists"]:
        records += _run_lists(ctx, kind, shape, dims, dtype_names, oom_at, lists)
        if kind == "shape" and ctx.get("save"):
            ctx["save"](records)  # a run cut short keeps every finished lists
    return records


def _run_lists(ctx, kind, shape, dims, dtype_names, oom_at, lists) -> list[dict]:
    device, opt = ctx["device"], ctx["opt"]
    t0 = time.perf_counter()
    base = build_inputs(dims, device, seed=opt.seed, lists=lists)
    log(f"[{shape}, {lists} lists] B,N,C,H,M = {dims}, T = {base.pe_table.shape[0]} "
        f"(inputs built in {time.perf_counter() - t0:.1f} s)")
    smoke = kind == "smoke"
    ref_cache = []

    def ref():
        # float64 reference, computed once, when the first case needs it; a str says why not
        if not ref_cache:
            try:
                r = reference64(base, smoke, opt.ref_budget_gb * 1e9)
            except Exception as exc:
                r = f"float64 reference failed: {type(exc).__name__}: {str(exc)[:300]}"
                free_memory(device)
            ref_cache.append(r if r is not None else "float64 reference over --ref-budget-gb")
        return ref_cache[0]

    records = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        x = base.cast(dtype, requires_grad=True)
        timers = [] if opt.rounds > 1 else None
        for name in ctx["backends"]:
            why = backend_skip_reason(name, device, dtype, dims)
            attn = make_attention(name, opt.check_indices, device=device, opt=opt) if why is None else None
            results = {}
            for mode in MODES:
                rec = base_record(kind, shape, dims, name, dtype_name, mode, lists)
                records.append(rec)
                why_mode = why or backend_skip_reason(name, device, dtype, dims, mode)
                if why_mode is None and oom_at is not None and (name, lists, mode) in oom_at:
                    rec.update(status="skipped",
                               reason=f"out of memory at N={oom_at[(name, lists, mode)]}")
                elif why_mode is not None:
                    rec.update(status="skipped", reason=why_mode)
                else:
                    keep = smoke or (mode == "fwd" and dtype == torch.float32 and opt.errors)
                    results[mode] = measure(ctx, name, attn, x, mode, rec, keep, timers)
                    _note_oom(rec, oom_at)
                    if keep and results[mode] is not None and mode == "fwd":
                        add_error(rec, results[mode][0], ref())
                if smoke and rec["status"] in ("ok", "pending"):
                    check_smoke(rec, results[mode], ref())
                if rec["status"] != "pending":
                    progress(rec)
            del attn, results
        if timers:
            pending = [rec for rec, *_ in timers]
            time_rounds(ctx, timers)
            for rec in pending:
                _note_oom(rec, oom_at)  # an OOM in the rounds stops the sweep too
                progress(rec)
        del x, timers
        free_memory(device)
    return records


def _note_oom(rec: dict, oom_at: dict | None) -> None:
    """The sweep's record of where each (backend, lists, mode) first ran out of memory."""
    if rec["status"] == "oom" and oom_at is not None:
        oom_at.setdefault((rec["backend"], rec.get("lists"), rec["mode"]), rec["N"])


def add_error(rec: dict, out: torch.Tensor, ref) -> None:
    if isinstance(ref, str):
        rec["max_abs_err_vs_fp64"] = f"skipped ({ref})"
    else:
        rec["max_abs_err_vs_fp64"] = (out.double() - ref[0]).abs().max().item()


def check_smoke(rec: dict, result, ref) -> None:
    """The step's output (and gradients) against float64, atol = rtol = SMOKE_TOL; a mismatch is an error."""
    if isinstance(ref, str):
        rec.update(status="error", smoke_check=ref, reason=ref)
        return
    out, grads = result
    pairs = [("out", out, ref[0])] + [("d" + n, grads[n], ref[1][n]) for n in grads]
    bad = []
    for label, got, want in pairs:
        if got is None:
            if not (label == "dpe_table" and rec.get("pe_grad")):  # the flex peer says why
                bad.append(f"{label} missing (no gradient)")
            continue
        if got.shape != want.shape:
            bad.append(f"{label} shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            continue
        err = (got.double() - want).abs()
        if not bool((err <= SMOKE_TOL + SMOKE_TOL * want.abs()).all()):
            bad.append(f"{label} max abs err {err.max().item():.2e}")
    rec["smoke_check"] = "ok" if not bad else "; ".join(bad)
    if bad:
        rec.update(status="error", reason="mismatch vs float64 reference: " + "; ".join(bad))


def run_sweep(ctx) -> list[dict]:
    opt = ctx["opt"]
    oom_at: dict = {}
    records = []
    for N in opt.sweep_n:
        dims = (max(1, SWEEP_TOKENS // N), N, SWEEP_C, SWEEP_H, SWEEP_M)
        # on AFF's lists (the first of --lists) only
        recs = run_shape(ctx, "sweep", f"sweep_N{N}", dims, [opt.sweep_dtype], oom_at,
                         ctx["lists"][:1])
        for r in recs:
            if r["status"] == "ok":
                r["ms_per_1k_tokens"] = r["time_ms"] / (r["B"] * r["N"] / 1000)
        records += recs
        ctx["save"](records)
    return records


# ------------------------------------------------------------------------------ reports

def git_state() -> tuple[str, bool | None]:
    """(commit, has uncommitted changes) of the checkout; ("unknown", None) without git.

    CLUSTER_GIT_COMMIT overrides both, for hosts that get a copy of the tree whose .git
    is not current (the commit is then taken as given and clean).
    """
    if os.environ.get("CLUSTER_GIT_COMMIT"):
        return os.environ["CLUSTER_GIT_COMMIT"], False
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except Exception:
        return "unknown", None
    return commit, dirty


def metadata(device: torch.device, bandwidth: float, opt) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = "absent"
    commit, dirty = git_state()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})")
    return {"device": name, "torch": torch.__version__, "triton": triton_v,
            "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": commit,
            "git_dirty": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "copy_bandwidth_gbps": bandwidth / 1e9, "cpu_affinity": _affinity(),
            "args": {k: v for k, v in vars(opt).items()}}


def _affinity() -> str:
    """The CPU cores the process may run on, e.g. "3" or "0-15"."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return "unknown"
    if cores == list(range(cores[0], cores[-1] + 1)) and len(cores) > 1:
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def copy_latest(out_dir: Path, stem: str, kind: str, latest: Path | None = None) -> list[Path]:
    """Copy a run's .json / .md / .png to latest/<kind>.* (what the README links)."""
    latest = latest or RESULTS / "latest"
    latest.mkdir(parents=True, exist_ok=True)
    copied = []
    for ext in (".json", ".md", ".png"):
        src = out_dir / f"{stem}{ext}"
        if src.exists():
            copied.append(Path(shutil.copyfile(src, latest / f"{kind}{ext}")))
    log("copied to " + ", ".join(str(c) for c in copied))
    return copied


def device_slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cell(rec, key, fmt) -> str:
    if rec is None:
        return "–"
    if rec["status"] != "ok":
        return rec["status"]
    val = rec.get(key)
    return format(val, fmt) if isinstance(val, (int, float)) else (val or "–")


def _gpu_cell(rec) -> str:
    if rec is None or rec["status"] != "ok" or rec.get("gpu_ms") is None:
        return "–"
    return f"{rec['gpu_ms']:.3f} ({rec['gpu_x_floor']:.2f})"


def _rounds_note(meta: dict) -> str:
    rounds = meta.get("args", {}).get("rounds", 1)
    return f" · each case timed in {rounds} rounds, backends taking turns" if rounds > 1 else ""


def to_markdown(meta: dict, records: list[dict]) -> str:
    lines = [f"# Cluster attention benchmark — {meta['device']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · CUDA {meta['cuda']} · "
             f"python {meta['python']} · commit `{meta['git_commit'][:12]}`"
             f"{' (dirty)' if meta.get('git_dirty') else ''} · host CPU cores "
             f"{meta.get('cpu_affinity', 'unknown')}"
             f"{' (pinned: --pin-cpu)' if meta.get('args', {}).get('pin_cpu') is not None else ''}"
             f"{_rounds_note(meta)}", "",
             f"Copy bandwidth (device-to-device, read + write): **{meta['copy_bandwidth_gbps']:.0f} GB/s**. "
             "Floor = bytes of q, k, v, out (+ dO, dq, dk, dv for fwd+bwd) and of member_idx, pe_idx "
             "(int32), mask (1 B) at that bandwidth; GB/s = those bytes / time; x floor = time / floor. "
             "GPU = the kernels' device time per step (torch.profiler), and its x floor: the step "
             "without the host's time to issue it. "
             "Peak = memory allocated during one step above the inputs. err = max abs error of the "
             "fp32 forward against float64. lists: the neighbour lists, `aff` = each token's own "
             "nearest clusters (AFF's), `cluster` = one list per cluster shared by its tokens. "
             "`flex` is a peer, not a backend of the op: the same attention through "
             "torch.nn.attention.flex_attention (benchmarks/flex_peer.py).", ""]
    index = {_key(r): r for r in records}
    shapes = list(dict.fromkeys(r["shape"] for r in records if r["kind"] != "sweep"))
    for shape in shapes:
        rows = [r for r in records if r["shape"] == shape]
        r0 = rows[0]
        lines += [f"## {shape} (B={r0['B']}, N={r0['N']}, C={r0['C']}, H={r0['H']}, M={r0['M']}, D={r0['D']})", "",
                  "| backend | lists | dtype | fwd ms | fwd GB/s | fwd x floor | fwd GPU ms (x floor) | "
                  "fwd+bwd ms | fwd+bwd GB/s | fwd+bwd x floor | fwd+bwd GPU ms (x floor) | "
                  "peak MiB (fwd+bwd) | fp32 err |", "|---|---|---|" + "---:|" * 10]
        for backend, lists, dtype in dict.fromkeys((r["backend"], _lists(r), r["dtype"]) for r in rows):
            f = index.get((shape, backend, lists, dtype, "fwd"))
            b = index.get((shape, backend, lists, dtype, "fwd+bwd"))
            err = f.get("max_abs_err_vs_fp64") if f else None
            err = f"{err:.1e}" if isinstance(err, float) else ("skipped" if err else "–")
            lines.append(f"| {backend} | {lists} | {dtype} | {_cell(f, 'time_ms', '.3f')} | "
                         f"{_cell(f, 'gbps', '.0f')} | "
                         f"{_cell(f, 'x_floor', '.2f')} | {_gpu_cell(f)} | {_cell(b, 'time_ms', '.3f')} | "
                         f"{_cell(b, 'gbps', '.0f')} | {_cell(b, 'x_floor', '.2f')} | {_gpu_cell(b)} | "
                         f"{_cell(b, 'peak_mib', '.0f')} | {err} |")
        lines += [""] + notes(rows) + flex_notes(rows) + [""]
    sweep = [r for r in records if r["kind"] == "sweep"]
    if sweep:
        ns = list(dict.fromkeys(r["N"] for r in sweep))
        for mode in MODES:
            lines += [f"## Scaling sweep, {mode}, {sweep[0]['dtype']}: ms per 1k tokens "
                      f"(B x N = {SWEEP_TOKENS}, C={SWEEP_C}, H={SWEEP_H}, M={SWEEP_M})", "",
                      "| backend | lists | " + " | ".join(f"N={n}" for n in ns) + " |",
                      "|---|---|" + "---:|" * len(ns)]
            for backend, lists in dict.fromkeys((r["backend"], _lists(r)) for r in sweep):
                cells = [_cell(index.get((f"sweep_N{n}", backend, lists, sweep[0]["dtype"], mode)),
                               "ms_per_1k_tokens", ".4f") for n in ns]
                lines.append(f"| {backend} | {lists} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += notes(sweep) + flex_notes(sweep) + [""]
    return "\n".join(lines)


def _lists(rec: dict) -> str:
    """A record's lists; "–" for records written before the benchmark named them."""
    return rec.get("lists") or "–"


def _key(rec: dict) -> tuple:
    return (rec["shape"], rec["backend"], _lists(rec), rec["dtype"], rec["mode"])


def row_label(rec: dict) -> str:
    """A row's name in plots: backend and lists, e.g. "triton (aff)"."""
    return f"{rec['backend']} ({_lists(rec)})"


def notes(rows: list[dict]) -> list[str]:
    """One line per distinct (backend, lists, dtype, status, reason) that did not run."""
    seen = dict.fromkeys((r["backend"], _lists(r), r["dtype"], r["status"], r["reason"])
                         for r in rows if r["status"] != "ok")
    return [f"- {b} ({li}) {d}: {s} — {why}" for b, li, d, s, why in seen]


def flex_notes(rows: list[dict]) -> list[str]:
    """The flex peer's block mask per case that ran, and any gradient it could not give."""
    out = []
    for r in rows:
        if r["status"] != "ok" or r.get("block_mask_s") is None:
            continue
        tiles = r.get("block_tiles") or {}
        line = (f"- {r['backend']} ({_lists(r)}) {r['dtype']} {r['mode']}: block mask "
                f"{r.get('block_mask_method')} {r.get('block_size')}x{r.get('block_size')}, built in "
                f"{r['block_mask_s']:.3f} s (warm {r.get('block_mask_warm_s', 0):.3f} s), "
                f"{r.get('block_sparsity_pct', 0):.1f}% of tiles skipped ({tiles.get('partial')} "
                f"partial, {tiles.get('full')} full of {tiles.get('all')}), masks "
                f"{r.get('masks_mib')} MiB; first call {r['first_call_s']:.2f} s "
                f"({'compiled' if r.get('compiled') else 'eager'})")
        if r.get("pe_grad"):
            line += f"; {r['pe_grad']}"
        if r.get("no_grad_into"):
            line += f"; no gradient into {', '.join(r['no_grad_into'])}"
        out.append(line)
    return out


def plot(records: list[dict], png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    ok = [r for r in records if r["status"] == "ok"]
    sweep = [r for r in ok if r["kind"] == "sweep"]
    bars = [r for r in ok if r["kind"] == "shape" and r["mode"] == "fwd+bwd"]
    panels = [p for p in (sweep, bars) if p]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    axes = list(axes[0])
    if sweep:
        ax = axes.pop(0)
        for i, name in enumerate(dict.fromkeys(row_label(r) for r in sweep)):
            for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
                pts = sorted((r["N"], r["ms_per_1k_tokens"]) for r in sweep
                             if row_label(r) == name and r["mode"] == mode)
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", marker="o", label=f"{name} {mode}")
        ax.set(xscale="log", yscale="log", xlabel="N (tokens per image; B x N fixed)",
               ylabel="ms per 1k tokens", title=f"Scaling, {sweep[0]['dtype']} (flat = linear in N)")
        ax.legend(fontsize=7)
    if bars:
        ax = axes.pop(0)
        dtypes = list(dict.fromkeys(r["dtype"] for r in bars))
        dtype = "float16" if "float16" in dtypes else dtypes[0]
        bars = [r for r in bars if r["dtype"] == dtype]
        shapes = list(dict.fromkeys(r["shape"] for r in bars))
        names = list(dict.fromkeys(row_label(r) for r in bars))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + i * width for j, s in enumerate(shapes)
                  for r in bars if r["shape"] == s and row_label(r) == name]
            ys = [r["time_ms"] for s in shapes for r in bars if r["shape"] == s and row_label(r) == name]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20, fontsize=8)
        ax.set(yscale="log", ylabel="ms", title=f"forward+backward, {dtype}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    log(f"wrote {png}")


# ------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(ROWS),
                   help="comma-separated subset of %(default)s (flex: the FlexAttention peer)")
    p.add_argument("--lists", default=",".join(LISTS),
                   help="neighbour lists, comma-separated subset of %(default)s: aff = each token's "
                        "own nearest clusters (AFF's), cluster = one list per cluster; the sweep "
                        "runs on the first")
    p.add_argument("--flex-block-size", type=int, default=64,
                   help="the flex peer's BlockMask tile, a multiple of the cluster size 8 "
                        "(default %(default)s)")
    p.add_argument("--flex-block-mask", choices=("kv-blocks", "create"), default="kv-blocks",
                   help="how the flex peer builds its BlockMask: kv-blocks = from each query "
                        "block's cluster blocks (BlockMask.from_kv_blocks, cheap), create = "
                        "create_block_mask evaluated eagerly, one image at a time; the same "
                        "mask (default %(default)s)")
    p.add_argument("--dtypes", default="float32,float16,bfloat16",
                   help="comma-separated (fp32/fp16/bf16 accepted); default %(default)s")
    p.add_argument("--shapes", default="all",
                   help=f"comma-separated names, 'all' or 'none' (e.g. with --sweep); names: {', '.join(SHAPES)}")
    p.add_argument("--sweep", action="store_true",
                   help=f"also run the scaling sweep: N in {SWEEP_N}, B = max(1, {SWEEP_TOKENS} // N), "
                        f"C={SWEEP_C}, H={SWEEP_H}, M={SWEEP_M}; a backend stops at its first OOM")
    p.add_argument("--sweep-n", default=",".join(map(str, SWEEP_N)), help="N values of the sweep")
    p.add_argument("--sweep-dtype", default="float16", help="dtype of the sweep (default %(default)s)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/runs/<device>-<date>[-tag]; "
                        "a new temporary folder for --smoke)")
    p.add_argument("--latest", action="store_true",
                   help="also copy the result files to benchmarks/results/latest/<device>.* "
                        "(a full run that replaces the one the README shows)")
    p.add_argument("--tag", default="", help="appended to the result file names, so runs of one day do not overwrite")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per case (default %(default)s)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed time per case at least (default %(default)s)")
    p.add_argument("--min-reps", type=int, default=20,
                   help="timed repetitions at least, unless that takes over --max-rep-ms (default %(default)s)")
    p.add_argument("--max-rep-ms", type=float, default=3000.0,
                   help="cap on the timed time per case (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each case in this many rounds, the backends of one shape and dtype "
                        "taking turns round by round, so that a slow phase of a host-bound run lands "
                        "on all of them rather than on one row; a case's time is the median of its "
                        "rounds' medians (default %(default)s: each case timed in one go)")
    p.add_argument("--copy-gib", type=float, default=1.0, help="size of the bandwidth probe copy (default %(default)s)")
    p.add_argument("--ref-budget-gb", type=float, default=8.0,
                   help="memory budget of the float64 reference (run in batch chunks); over it the error "
                        "is recorded as skipped (default %(default)s)")
    p.add_argument("--no-gpu-time", dest="gpu_time", action="store_false",
                   help="skip the profiled GPU time of each case (GPU only)")
    p.add_argument("--no-errors", dest="errors", action="store_false",
                   help="skip the fp32-vs-float64 error measurement")
    p.add_argument("--check-indices", action="store_true",
                   help="let cluster.ops range-check the indices on every call (a device sync and two "
                        "reductions over B*N*M; off by default so the kernels are timed)")
    p.add_argument("--pin-cpu", type=int, default=None, metavar="CORE",
                   help="run the whole process (the autograd engine's threads included) on this one CPU "
                        "core: the eager small shapes are host-bound, and a process that migrates between "
                        "cores issues the step up to 2x slower on a many-core host (recorded in the results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help=f"one tiny fp32 case {SMOKE_SHAPE[1]} per backend, checked against float64; "
                        "CPU (Triton interpreter) when there is no GPU")
    p.add_argument("--smoke-reps", type=int, default=3,
                   help="timed reps of a smoke case on the CPU (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device of --smoke (the full run needs CUDA); default %(default)s")
    opt = p.parse_args(argv)
    opt.backends = list(dict.fromkeys(b for b in opt.backends.split(",") if b))
    opt.lists = list(dict.fromkeys(x for x in opt.lists.split(",") if x))
    opt.dtypes = [DTYPE_ALIASES.get(d, d) for d in opt.dtypes.split(",") if d]
    opt.sweep_dtype = DTYPE_ALIASES.get(opt.sweep_dtype, opt.sweep_dtype)
    opt.shapes = (list(SHAPES) if opt.shapes == "all" else [] if opt.shapes == "none"
                  else [s for s in opt.shapes.split(",") if s])
    opt.sweep_n = [int(n) for n in opt.sweep_n.split(",") if n]
    for what, given, known in (("backend", opt.backends, ROWS), ("dtype", opt.dtypes + [opt.sweep_dtype], DTYPES),
                               ("shape", opt.shapes, SHAPES), ("lists", opt.lists, LISTS)):
        unknown = [g for g in given if g not in known]
        if unknown:
            p.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    if not opt.lists:
        p.error(f"--lists: name at least one of {', '.join(LISTS)}")
    if opt.flex_block_size < 8 or opt.flex_block_size % 8:
        p.error(f"--flex-block-size: expected a multiple of 8, got {opt.flex_block_size}")
    return opt


def pick_device(opt) -> torch.device | None:
    has_cuda = torch.cuda.is_available()
    if not opt.smoke:
        return torch.device("cuda") if has_cuda else None
    if opt.device == "cuda" and not has_cuda:
        return None
    return torch.device("cuda" if opt.device != "cpu" and has_cuda else "cpu")


def main(argv=None) -> int:
    opt = parse_args(argv)
    device = pick_device(opt)
    if device is None:
        log("no CUDA device: the benchmark needs a GPU (use --smoke for the CPU check)")
        return 2
    if device.type == "cpu":
        # The Triton kernels choose interpreter or compiler when they are decorated, i.e. at
        # import, so this must precede the first import of cluster.triton_kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if opt.pin_cpu is not None:
        # Before any CUDA work: threads started later (the autograd engine's) inherit it.
        os.sched_setaffinity(0, {opt.pin_cpu})
    t_start = time.perf_counter()
    bandwidth = copy_bandwidth(device, opt)
    meta = metadata(device, bandwidth, opt)
    log(f"device {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s · CPU cores {meta['cpu_affinity']}")

    stem = f"{device_slug(meta['device'])}-{datetime.now().strftime('%Y-%m-%d')}" + (f"-{opt.tag}" if opt.tag else "")
    stem += "-smoke" if opt.smoke else ""
    out_dir = Path(opt.out) if opt.out else (Path(tempfile.mkdtemp(prefix="cluster-bench-smoke-"))
                                               if opt.smoke else RESULTS / "runs" / stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_records: list[dict] = []

    def save(extra=()):
        recs = all_records + list(extra)
        (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "cases": recs}, indent=1))
        (out_dir / f"{stem}.md").write_text(to_markdown(meta, recs))

    ctx = {"device": device, "opt": opt, "bandwidth": bandwidth, "backends": opt.backends,
           "lists": opt.lists, "save": save}
    if opt.smoke:
        all_records += run_shape(ctx, "smoke", SMOKE_SHAPE[0], SMOKE_SHAPE[1], ["float32"])
    else:
        for shape in opt.shapes:
            all_records += run_shape(ctx, "shape", shape, SHAPES[shape], opt.dtypes)
            save()
        if opt.sweep:
            all_records += run_sweep(ctx)
    save()
    plot(all_records, out_dir / f"{stem}.png")
    log(f"wrote {out_dir / stem}.json and .md ({time.perf_counter() - t_start:.1f} s)")
    if opt.latest:
        copy_latest(out_dir, stem, device_slug(meta["device"]))

    failed = [r for r in all_records if r["status"] == "error"]
    for r in failed:
        log(f"FAILED {r['shape']} {r['backend']} ({r['lists']}) {r['dtype']} {r['mode']}: "
            f"{r['reason'][:500]}")
    if not any(r["status"] == "ok" for r in all_records):
        log("nothing ran")
        return 2 if not failed else 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
