"""The triton backend's float32 forward on explicit register layouts (Triton's Gluon).

Why a second kernel language: the float32 forward multiplies on FMA units (float32 tl.dot
is either inexact, tf32, or slower than FMAs here; the tf32x3 and bf16x6 variants lost:
benchmarks/TUNING.md), and plain Triton chooses where each element of a product lives.
For the group forward it spreads every key row's D columns over 8 lanes, so each q . k
sum crosses lanes and the scores change layout through shared memory before the softmax.
Here the layouts are stated: one warp per program, the 8 queries of one cluster, heads
looped. The launch and its dispatch rule (``_gluon_blocks``) are in forward.py, beside
the other forward kernels.

* scores [8 queries, 32 slots] and outputs [8 queries, BLOCK_D]: each thread holds a 2 x 4
  block (2 queries, 4 slots / columns; two such blocks of outputs when BLOCK_D = 64), the
  warp's lanes 4 x 8 of them. q . k and p v are FMA dots (``gl.dot_fma``) on that layout:
  each thread sums its block's products in its own registers, one FFMA per product, with
  operands read from shared memory. For each term of its 8 sums a 2 x 4 block reads 2 + 4
  operands; the earlier lane-per-slot layout (8 queries x 1 slot a thread) read 8 + 1,
  and its softmax sums crossed 32 lanes instead of 8 (slower: benchmarks/TUNING.md).
* the step is (head, 32-slot chunk). Its q, key and value tiles are copied from global
  memory straight into shared memory with asynchronous copies (cp.async, 16-byte
  vectors), issued one step ahead: the next step's q and keys as soon as this step's
  q . k is done, its values as soon as this step's p v is. A warp thus waits on copies
  issued a step earlier, not on each load in turn (with 12-16 warps per SM there are too
  few others to cover for it).
* per query and slot, whether the slot is valid and its bias row offset are the same for
  every head: read once per program into shared memory (with the chunk's key rows), so a
  head's step reads the bias table only.
* the shared tiles are XOR-swizzled by row (16-byte vectors) so that the rows a warp's
  lanes read at once land in different banks: 8 key rows (4 apart), 4 query or p rows (2
  apart). Unswizzled, the same kernel ran much slower (benchmarks/TUNING.md).

A group whose queries name different keys (every group of AFF's per-token lists; none of
the shared lists) is left to the per-query kernel that runs after this one, which picks
those groups by the same test.

Gluon has no CPU interpreter: the CPU suite runs the triton kernels, and the GPU suite runs
this one wherever the float32 forward does (tests/forward/test_gluon_forward.py, and every
float32 forward and gradient test). Before Triton 3.6 (MIN_TRITON) ``available()`` is
False and the float32 forward keeps the triton kernels.
"""

from __future__ import annotations

# Gluon came with Triton 3.5, whose compiler crashes (segfault) on this kernel for sm_90;
# 3.6 and 3.8 compile it. Checked on a GPU with 3.6.
MIN_TRITON = (3, 6)
# Gluon's API is experimental and moves between releases (3.9 removed
# async_copy_global_to_shared): a release after this one takes the FMA group kernel
# until this kernel has been built and run against it.
MAX_TRITON = (3, 8)
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = gl = None


def available(release: tuple[int, int]) -> bool:
    """Whether the installed Triton (``release``: its (major, minor)) runs this kernel."""
    return gluon is not None and MIN_TRITON <= release <= MAX_TRITON


def untested_release(release: tuple[int, int]) -> bool:
    """A Triton newer than every release this kernel was built against."""
    return gluon is not None and release > MAX_TRITON


# Longest key list: the per-program slot tables hold every chunk of the list in shared
# memory (1.1 KB a chunk); 256 slots (AFF's lists have 48 or 64) keep a program under 21 KB.
MAX_M = 256


def blocks(D: int, M: int) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_D) of the kernel, or None where it does not apply: slots come in
    chunks of 32 (longer lists loop over chunks, up to MAX_M slots) and D is at most 64
    (AFF's heads have D = 32). Chunks of 64 slots were slower (benchmarks/TUNING.md)."""
    if D > 64 or M < 1 or M > MAX_M:
        return None
    return 32, (32 if D <= 32 else 64)


# GPU-only code (Gluon has no CPU interpreter), out of the CPU suite's coverage figure; the
# GPU suite runs it (tests/forward/test_gluon_forward.py).
if gluon is not None:  # pragma: no cover
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as _cp

    @gluon.jit
    def _exp_ftz(x):
        # ex2.approx.ftz: see common._exp.
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f",
                                         [x * 1.4426950408889634], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _slots_to_smem(IDX, PEIDX, MASK, lead_off, sel, g_s, m0, M, spet, lead_dst, okpe_dst,
                       HAS_PE: gl.constexpr, HAS_MASK: gl.constexpr, BLOCK_M: gl.constexpr,
                       LS: gl.constexpr):
        """Chunk m0's key rows into lead_dst, -1 for a slot that no selected query uses
        (its row is never read: a masked slot's index may be anything); per query and
        slot, the bias row offset (pe_idx * its stride; 0 without a bias) or -1 where the
        slot is not valid, into okpe_dst. The same for every head: loaded once."""
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, LS))
        ok = gl.expand_dims(sel, 1) & gl.expand_dims(offs_m < M, 0)
        off = gl.expand_dims(g_s * M, 1) + gl.expand_dims(offs_m, 0)
        if HAS_MASK:
            ok = ok & (gl.load(MASK + off, mask=ok, other=0) != 0)
        live = gl.max(ok.to(gl.int32), axis=0) > 0
        lead = gl.load(IDX + lead_off + offs_m, mask=live, other=0)
        lead_dst.store(gl.where(live, lead, -1).to(gl.int32))
        if HAS_PE:
            val = (gl.load(PEIDX + off, mask=ok, other=0) * spet).to(gl.int32)
        else:
            val = gl.zeros([8, BLOCK_M], gl.int32, LS)
        okpe_dst.store(gl.where(ok, val, -1))

    @gluon.jit
    def _copy_rows(dst, base, stride, lead_smem, D, BLOCK_D: gl.constexpr,
                   LT: gl.constexpr):
        """Asynchronous copy of the rows named in lead_smem (base + row * stride, D
        columns) into dst; rows -1 and columns past D are zero-filled, not read."""
        rows = lead_smem.load(gl.SliceLayout(1, LT))
        d_t = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, LT))
        _cp.async_copy_global_to_shared(
            dst, base + gl.expand_dims(rows.to(gl.int64) * stride, 1) + gl.expand_dims(d_t, 0),
            mask=gl.expand_dims(rows >= 0, 1) & gl.expand_dims(d_t < D, 0))

    @gluon.jit
    def _copy_q(q_smem, qh, sqn, pid, N, D, BLOCK_D: gl.constexpr, LT: gl.constexpr):
        """Asynchronous copy of the group's 8 query rows; rows past N zero-filled."""
        g_t = pid * 8 + gl.arange(0, 8, layout=gl.SliceLayout(1, LT))
        d_t = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, LT))
        _cp.async_copy_global_to_shared(
            q_smem, qh + gl.expand_dims(g_t, 1) * sqn + gl.expand_dims(d_t, 0),
            mask=gl.expand_dims(g_t < N, 1) & gl.expand_dims(d_t < D, 0))

    @gluon.jit
    def _attend(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h_lo, h_hi, pid, lead_off,
                sel, sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh, sbkh, sbvh,
                N, M, D, scale_hi, scale_lo, p_smem, lead_smem, okpe_smem, q_smem, k_smem,
                v_smem, HAS_PE: gl.constexpr, HAS_MASK: gl.constexpr,
                HAS_BLANK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr,
                NCH: gl.constexpr, DC: gl.constexpr, KC: gl.constexpr, LS: gl.constexpr,
                LT: gl.constexpr):
        """Heads h_lo .. h_hi of the group's queries against the key list at
        IDX + lead_off, for the rows in ``sel``: online softmax over NCH chunks of BLOCK_M
        slots. Steps are (head, chunk) pairs; the next step's q, key and value tiles are
        copied asynchronously while this one computes (q and keys once its q . k is done,
        values once its p v is), so each step waits on copies issued a step earlier."""
        G: gl.constexpr = 8
        ROW_S: gl.constexpr = gl.SliceLayout(1, LS)
        COL_S: gl.constexpr = gl.SliceLayout(0, LS)
        QOP: gl.constexpr = gl.DotOperandLayout(0, LS, 0)
        KOP: gl.constexpr = gl.DotOperandLayout(1, LS, 0)
        NEG_INF: gl.constexpr = float("-inf")
        rows = gl.arange(0, G, layout=ROW_S)
        g_s = pid * G + rows
        d_o = gl.arange(0, BLOCK_D, layout=COL_S)
        od_ok = gl.expand_dims(sel & (g_s < N), 1) & gl.expand_dims(d_o < D, 0)
        for ci in gl.static_range(NCH):
            _slots_to_smem(IDX, PEIDX, MASK, lead_off, sel, g_s, ci * BLOCK_M, M, spet,
                           lead_smem.index(ci), okpe_smem.index(ci), HAS_PE, HAS_MASK,
                           BLOCK_M, LS)
        # Copy group 1: step (h_lo, 0)'s q and keys; group 2: its values.
        _copy_q(q_smem, Q + h_lo * sqh, sqn, pid, N, D, BLOCK_D, LT)
        _copy_rows(k_smem, K + h_lo * skh, skn, lead_smem.index(0), D, BLOCK_D, LT)
        _cp.commit_group()
        _copy_rows(v_smem, V + h_lo * svh, svn, lead_smem.index(0), D, BLOCK_D, LT)
        _cp.commit_group()
        for h in range(h_lo, h_hi):
            m_i = gl.full([G], NEG_INF, gl.float32, ROW_S)
            l_i = gl.zeros([G], gl.float32, ROW_S)
            acc = gl.zeros([G, BLOCK_D], gl.float32, LS)
            sb = gl.zeros([G], gl.float32, ROW_S)
            if HAS_BLANK:
                bk = gl.load(BK + h * sbkh + d_o, mask=d_o < D, other=0.0)
            for c in range(0, NCH):
                okpe = okpe_smem.index(c).load(LS)
                ok = okpe >= 0
                if HAS_PE:
                    # Issued before the wait, so that their latencies overlap.
                    bias = gl.load(PE + okpe + h * speh, mask=ok, other=0.0)
                _cp.wait_group(1)
                s = gl.zeros([G, BLOCK_M], gl.float32, LS)
                for d0 in gl.static_range(0, BLOCK_D, DC):
                    s = gl.dot_fma(q_smem.slice(d0, DC, dim=1).load(QOP),
                                   k_smem.slice(d0, DC, dim=1).permute([1, 0]).load(KOP), s)
                if HAS_BLANK:
                    # A head's chunks share its q: the blank logit, taken while q is in
                    # shared memory, is folded in after the last chunk.
                    if c == 0:
                        sb = gl.sum(q_smem.load(LS) * gl.expand_dims(bk, 0), axis=1)
                # q and the keys are read: copy the next step's.
                last = c + 1 == NCH
                nh = gl.where(last, h + 1, h)
                nc = gl.where(last, 0, c + 1)
                if nh < h_hi:
                    if last:
                        _copy_q(q_smem, Q + nh * sqh, sqn, pid, N, D, BLOCK_D, LT)
                    _copy_rows(k_smem, K + nh * skh, skn, lead_smem.index(nc), D, BLOCK_D,
                               LT)
                _cp.commit_group()
                s = s * scale_hi + s * scale_lo
                if HAS_PE:
                    s += bias
                s = gl.where(ok, s, NEG_INF)
                m_new = gl.maximum(m_i, gl.max(s, axis=1))
                # All-invalid so far: shift by 0 so that exp(-inf - shift) = 0, never NaN.
                m_use = gl.where(m_new == NEG_INF, 0.0, m_new)
                alpha = _exp_ftz(m_i - m_use)
                p = _exp_ftz(s - gl.expand_dims(m_use, 1))
                l_i = l_i * alpha + gl.sum(p, axis=1)
                p_smem.store(p)
                acc = acc * gl.expand_dims(alpha, 1)
                m_i = m_new
                _cp.wait_group(1)
                for k0 in gl.static_range(0, BLOCK_M, KC):
                    acc = gl.dot_fma(p_smem.slice(k0, KC, dim=1).load(QOP),
                                     v_smem.slice(k0, KC, dim=0).load(KOP), acc)
                if nh < h_hi:
                    _copy_rows(v_smem, V + nh * svh, svn, lead_smem.index(nc), D, BLOCK_D,
                               LT)
                _cp.commit_group()
            if HAS_BLANK:
                # The blank as one more element of the softmax.
                sb = sb * scale_hi + sb * scale_lo
                bv = gl.load(BV + h * sbvh + d_o, mask=d_o < D, other=0.0)
                m_new = gl.maximum(m_i, sb)
                alpha = _exp_ftz(m_i - m_new)
                pb = _exp_ftz(sb - m_new)
                l_i = l_i * alpha + pb
                acc = acc * gl.expand_dims(alpha, 1) + gl.expand_dims(pb, 1) * gl.expand_dims(bv, 0)
                m_i = m_new
            has = l_i > 0
            l_safe = gl.where(has, l_i, 1.0)
            out = acc / gl.expand_dims(l_safe, 1)
            # lse = +inf on empty rows makes the backward's exp(logit - lse) exactly 0.
            lse = gl.where(has, m_i + gl.log(l_safe), float("inf"))
            gl.store(O + h * soh + gl.expand_dims(g_s, 1) * son + gl.expand_dims(d_o, 0), out,
                     mask=od_ok)
            gl.store(LSE + h * N + g_s, lse, mask=sel & (g_s < N))

    # H is not specialized: with H, the heads per program and the head groups all 1 and a
    # single chunk, Triton 3.6 folds the head loop away and then fails an assertion
    # lowering the kernel to LLVM (a compiler bug, not traced further); a runtime H keeps
    # the loop.
    @gluon.jit(do_not_specialize=["H"])
    def _attn_fwd_gluon_kernel(
        Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
        spet, speh, sbkh, sbvh,
        H, N, M, D, scale_hi, scale_lo, HPG, NHG,
        HAS_PE: gl.constexpr, HAS_MASK: gl.constexpr, HAS_BLANK: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr, NCH: gl.constexpr, DC: gl.constexpr,
        KC: gl.constexpr,
    ):
        G: gl.constexpr = 8
        # Scores [G, BLOCK_M] and outputs [G, BLOCK_D]: 2 queries x 4 slots (columns) a
        # thread, lanes 4 x 8. q . k and p v are FMA dots on it: each thread sums its
        # block's products in its own registers, one FFMA per product.
        LS: gl.constexpr = gl.BlockedLayout([2, 4], [4, 8], [1, 1], [1, 0])
        # Tiles copied from global memory: 16-byte vectors, a row's 128 bytes from
        # neighbouring lanes.
        LT: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // BLOCK_D, BLOCK_D // 4], [1, 1],
                                            [1, 0])
        ROW_S: gl.constexpr = gl.SliceLayout(1, LS)
        COL_S: gl.constexpr = gl.SliceLayout(0, LS)

        pid = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = (pid_bh // NHG).to(gl.int64)
        h_lo = (pid_bh % NHG) * HPG
        h_hi = gl.minimum(h_lo + HPG, H)
        IDX += b * N * M
        PEIDX += b * N * M
        MASK += b * N * M
        Q += b * sqb
        K += b * skb
        V += b * svb
        O += b * sob
        LSE += b * H * N
        rows = gl.arange(0, G, layout=ROW_S)
        g_s = pid * G + rows
        q_ok = g_s < N
        m_s = gl.arange(0, BLOCK_M, layout=COL_S)
        # Does every valid slot of every query name the first query's key in that slot?
        # (_attend then reads the rows again for its slot tables: one merged pass was
        # slower, benchmarks/TUNING.md.)
        stray = 0
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + m_s
            ok = gl.expand_dims(q_ok, 1) & gl.expand_dims(offs_m < M, 0)
            off = gl.expand_dims(g_s * M, 1) + gl.expand_dims(offs_m, 0)
            idx = gl.load(IDX + off, mask=ok, other=0)
            if HAS_MASK:
                ok = ok & (gl.load(MASK + off, mask=ok, other=0) != 0)
            lead = gl.load(IDX + pid * G * M + offs_m, mask=offs_m < M, other=0)
            stray += gl.max(gl.max((ok & (idx != gl.expand_dims(lead, 0))).to(gl.int32),
                                   axis=1), axis=0)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        # q and p are read 4 rows at a time (rows 2 apart: a lane's 2 queries), keys 8
        # rows at a time (4 apart: a lane's 4 slots). A row's 16-byte vectors are XOR-ed
        # with (row // 2) % 4, key rows' with (row // 4) % 8: those rows fall in
        # different banks.
        rows2: gl.constexpr = gl.SwizzledSharedLayout(4, 2, 4, [1, 0])
        p_smem = gl.allocate_shared_memory(gl.float32, [G, BLOCK_M], rows2)
        # Per chunk (the leading dimension: one buffer per chunk, the layout of one).
        lead_smem = gl.allocate_shared_memory(gl.int32, [NCH, BLOCK_M],
                                              gl.SwizzledSharedLayout(1, 1, 1, [0]))
        okpe_smem = gl.allocate_shared_memory(gl.int32, [NCH, G, BLOCK_M], plain)
        rows4: gl.constexpr = gl.SwizzledSharedLayout(4, 4, 8, [1, 0])
        q_smem = gl.allocate_shared_memory(gl.float32, [G, BLOCK_D], rows2)
        k_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_D], rows4)
        # Values are read a row at a time (8 lanes cover a row's 32 columns): no swizzle.
        v_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_D], plain)
        if stray == 0:
            _attend(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h_lo, h_hi, pid,
                    pid * G * M, q_ok, sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh,
                    sbkh, sbvh, N, M, D, scale_hi, scale_lo, p_smem, lead_smem, okpe_smem,
                    q_smem, k_smem, v_smem, HAS_PE, HAS_MASK, HAS_BLANK, BLOCK_M, BLOCK_D,
                    NCH, DC, KC, LS, LT)
        # A group whose queries have lists of their own is left to the per-query kernel
        # that _attn_forward launches after this one (the same test picks those groups).
