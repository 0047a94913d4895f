"""The triton backend's float32 forward on explicit register layouts (Triton's Gluon).

Why a second kernel language: the float32 forward multiplies on FMA units (float32 tl.dot
is either inexact, tf32, or slower than FMAs here: tf32x3 and bf16x6 products measured in
results/fwd-fp32-gluon-h200-2026-11-30.log), and plain Triton chooses where each element of
a product lives. For the group forward it spreads every key row's D columns over 8 lanes,
so each q . k sum crosses lanes (3 shuffle levels per partial sum) and the scores change
layout through shared memory before the softmax (results/fwd-fp32-lead-h200-2026-11-29.log).
Here the layouts are stated (one warp per program, 8 queries, heads looped):

* scores [8 queries, BLOCK_M slots]: lane l owns slots l and l + 32, for all 8 queries, so
  q . k sums a D-chunk inside one thread. The chunk's key rows come from shared memory:
  the group's [BLOCK_M, BLOCK_D] key tile is loaded coalesced (a 128-byte row is one line
  of one load) and stored with its 16-byte vectors XOR-swizzled by row, so 32 lanes read
  32 rows' same columns without bank conflicts. Loaded straight into this layout, every
  lane touched a different line for every chunk: 8 times the L1 traffic, and 25 % slower.
  q's chunk, the same for every lane, is a shared-memory broadcast.
* the softmax's reductions over slots cross lanes once per row (max and sum).
* outputs [8 queries, BLOCK_D]: lane l owns column l (of each 32), so p . v sums a chunk of
  slots inside one thread; the probabilities go through shared memory (transposed: a
  slot's 8 values are 32 contiguous bytes, read by every lane at once) and each value row
  is one coalesced load.

A group whose queries name different keys (never in AFF, possible with any member_idx)
runs the same code once per query, each as the group's lead with only its own row
selected: 8 times the work for such groups, the per-query kernels' cost.

Gluon has no CPU interpreter: the CPU suite runs the triton kernels, and the GPU suite runs
this one wherever the float32 forward does (tests/forward/test_gluon_forward.py, and every
float32 forward and gradient test on large enough grids). Before Triton 3.6 (MIN_TRITON)
``available()`` is False and the float32 forward keeps the triton kernels.
"""

from __future__ import annotations

# Gluon came with Triton 3.5, whose compiler crashes (segfault) on this kernel for sm_90;
# 3.6 and 3.8 compile it. Checked on a GPU with 3.6.
MIN_TRITON = (3, 6)
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = gl = None


def available(release: tuple[int, int]) -> bool:
    """Whether the installed Triton (``release``: its (major, minor)) runs this kernel."""
    return gluon is not None and release >= MIN_TRITON


def blocks(D: int, M: int) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_D) of the kernel, or None where it does not apply: the layouts give
    each of the 32 lanes whole slots and whole columns, so slots come in chunks of 32 or 64
    (longer lists loop over chunks) and D is at most 64 (AFF's heads have D = 32)."""
    if D > 64 or M < 1:
        return None
    block_m = 32 if M <= 32 else 64
    block_d = 32 if D <= 32 else 64
    return block_m, block_d


# GPU-only code (Gluon has no CPU interpreter), out of the CPU suite's coverage figure; the
# GPU suite runs it (tests/forward/test_gluon_forward.py).
if gluon is not None:  # pragma: no cover

    @gluon.jit
    def _exp_ftz(x):
        # ex2.approx.ftz: see triton_kernels._exp.
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f",
                                         [x * 1.4426950408889634], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _attend(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, pid, lead_off, sel,
                sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh, sbkh, sbvh,
                N, M, D, scale_hi, scale_lo, p_smem, lead_smem, q_smem, k_smem,
                HAS_PE: gl.constexpr, HAS_MASK: gl.constexpr, HAS_BLANK: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr, DC: gl.constexpr,
                KC: gl.constexpr, L3K: gl.constexpr, L3V: gl.constexpr):
        """Head h of the group's queries against the key list at IDX + lead_off, for the
        rows in ``sel``: online softmax over chunks of BLOCK_M slots."""
        G: gl.constexpr = 8
        LS: gl.constexpr = gl.SliceLayout(2, L3K)
        LP: gl.constexpr = gl.SliceLayout(2, L3V)
        LO: gl.constexpr = gl.SliceLayout(1, L3V)
        ROW_S: gl.constexpr = gl.SliceLayout(1, LS)
        COL_S: gl.constexpr = gl.SliceLayout(0, LS)
        ROW_O: gl.constexpr = gl.SliceLayout(1, LO)
        COL_O: gl.constexpr = gl.SliceLayout(0, LO)
        NEG_INF: gl.constexpr = float("-inf")
        rows = gl.arange(0, G, layout=ROW_S)
        g_s = pid * G + rows
        m_s = gl.arange(0, BLOCK_M, layout=COL_S)
        g_o = pid * G + gl.arange(0, G, layout=ROW_O)
        d_o = gl.arange(0, BLOCK_D, layout=COL_O)
        d_v = gl.expand_dims(gl.expand_dims(d_o, 0), 1)  # [1, 1, BLOCK_D] in L3V
        sel_o = gl.convert_layout(sel, ROW_O)
        qd_ok_o = gl.expand_dims(g_o < N, 1) & gl.expand_dims(d_o < D, 0)
        qh = Q + h * sqh
        kh = K + h * skh
        vh = V + h * svh
        LT: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // BLOCK_D, BLOCK_D // 4], [1, 1],
                                            [1, 0])
        g_t = pid * G + gl.arange(0, G, layout=gl.SliceLayout(1, LT))
        d_t = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, LT))
        q_smem.store(gl.load(qh + gl.expand_dims(g_t, 1) * sqn + gl.expand_dims(d_t, 0),
                             mask=gl.expand_dims(g_t < N, 1) & gl.expand_dims(d_t < D, 0),
                             other=0.0))
        m_i = gl.full([G], NEG_INF, gl.float32, ROW_S)
        l_i = gl.zeros([G], gl.float32, ROW_S)
        acc = gl.zeros([G, BLOCK_D], gl.float32, LO)
        if HAS_BLANK:
            # The blank is the softmax's first element: running max = its logit, sum 1.
            q_o = gl.load(qh + gl.expand_dims(g_o, 1) * sqn + gl.expand_dims(d_o, 0),
                          mask=qd_ok_o, other=0.0)
            bk = gl.load(BK + h * sbkh + d_o, mask=d_o < D, other=0.0).to(gl.float32)
            bv = gl.load(BV + h * sbvh + d_o, mask=d_o < D, other=0.0).to(gl.float32)
            sb = gl.sum(q_o * gl.expand_dims(bk, 0), axis=1)
            sb = sb * scale_hi + sb * scale_lo
            m_i = gl.convert_layout(sb, ROW_S)
            l_i = gl.full([G], 1.0, gl.float32, ROW_S)
            acc = gl.zeros([G, BLOCK_D], gl.float32, LO) + gl.expand_dims(bv, 0)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + m_s
            ok = gl.expand_dims(sel, 1) & gl.expand_dims(offs_m < M, 0)
            off = gl.expand_dims(g_s * M, 1) + gl.expand_dims(offs_m, 0)
            if HAS_MASK:
                ok = ok & (gl.load(MASK + off, mask=ok, other=0) != 0)
            lead = gl.load(IDX + lead_off + offs_m, mask=offs_m < M, other=0)
            # A slot's rows are read if any selected query uses it.
            live = gl.max(ok.to(gl.int32), axis=0) > 0
            # Key rows: coalesced tile -> swizzled shared memory -> D-chunks per lane.
            live_t = gl.convert_layout(live, gl.SliceLayout(1, LT))
            lead_t = gl.convert_layout(lead, gl.SliceLayout(1, LT))
            k_tile = gl.load(kh + gl.expand_dims(lead_t.to(gl.int64) * skn, 1)
                             + gl.expand_dims(d_t, 0),
                             mask=gl.expand_dims(live_t, 1) & gl.expand_dims(d_t < D, 0),
                             other=0.0)
            k_smem.store(k_tile)
            s = gl.zeros([G, BLOCK_M], gl.float32, LS)
            for d0 in gl.static_range(0, BLOCK_D, DC):
                qc = gl.expand_dims(q_smem.slice(d0, DC, dim=1).load(gl.SliceLayout(1, L3K)), 1)
                kc = gl.expand_dims(k_smem.slice(d0, DC, dim=1).load(gl.SliceLayout(0, L3K)), 0)
                s += gl.sum(qc * kc, axis=2)
            lead_smem.store(gl.where(live, lead, -1).to(gl.int32))
            s = s * scale_hi + s * scale_lo
            if HAS_PE:
                pe = gl.load(PEIDX + off, mask=ok, other=0)
                s += gl.load(PE + pe * spet + h * speh, mask=ok, other=0.0).to(gl.float32)
            s = gl.where(ok, s, NEG_INF)
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            # All-invalid so far: shift by 0 so that exp(-inf - shift) = 0, never NaN.
            m_use = gl.where(m_new == NEG_INF, 0.0, m_new)
            alpha = _exp_ftz(m_i - m_use)
            p = _exp_ftz(s - gl.expand_dims(m_use, 1))
            l_i = l_i * alpha + gl.sum(p, axis=1)
            p_smem.store(gl.permute(p, [1, 0]))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
            for c in gl.static_range(0, BLOCK_M, KC):
                pc = p_smem.slice(c, KC).permute([1, 0]).load(LP)
                kv = lead_smem.slice(c, KC).load(gl.SliceLayout(0, LP))
                kv = gl.expand_dims(gl.expand_dims(kv, 0), 2)
                vc = gl.load(vh + kv.to(gl.int64) * svn + d_v, mask=(kv >= 0) & (d_v < D),
                             other=0.0)
                acc += gl.sum(gl.expand_dims(pc, 2) * vc, axis=1)
            m_i = m_new
        has = l_i > 0
        l_safe = gl.where(has, l_i, 1.0)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, ROW_O), 1)
        # lse = +inf on empty rows makes the backward's exp(logit - lse) exactly 0.
        lse = gl.where(has, m_i + gl.log(l_safe), float("inf"))
        gl.store(O + h * soh + gl.expand_dims(g_o, 1) * son + gl.expand_dims(d_o, 0), out,
                 mask=qd_ok_o & gl.expand_dims(sel_o, 1))
        gl.store(LSE + h * N + g_s, lse, mask=sel)

    @gluon.jit
    def _attn_fwd_gluon_kernel(
        Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
        spet, speh, sbkh, sbvh,
        H, N, M, D, scale_hi, scale_lo, HPG, NHG,
        HAS_PE: gl.constexpr, HAS_MASK: gl.constexpr, HAS_BLANK: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr, DC: gl.constexpr, KC: gl.constexpr,
    ):
        G: gl.constexpr = 8
        # q . k products [G, BLOCK_M, DC]: slots over lanes, the queries and a D-chunk in
        # each thread.
        L3K: gl.constexpr = gl.BlockedLayout([G, 1, DC], [1, 32, 1], [1, 1, 1], [2, 1, 0])
        # p . v products [G, KC, BLOCK_D]: columns over lanes, the queries and a chunk of
        # slots in each thread.
        L3V: gl.constexpr = gl.BlockedLayout([G, KC, BLOCK_D // 32], [1, 1, 32], [1, 1, 1],
                                             [2, 1, 0])
        LS: gl.constexpr = gl.SliceLayout(2, L3K)
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
        # p transposed: a slot's G probabilities are 32 contiguous bytes (two vector
        # loads for every lane at once).
        p_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, G],
                                           gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        lead_smem = gl.allocate_shared_memory(gl.int32, [BLOCK_M],
                                              gl.SwizzledSharedLayout(1, 1, 1, [0]))
        # Rows of 16-byte vectors XOR-swizzled by row: the lanes read 32 consecutive rows'
        # same columns without bank conflicts.
        q_smem = gl.allocate_shared_memory(gl.float32, [G, BLOCK_D],
                                           gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
        k_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_D],
                                           gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
        for h in range(h_lo, h_hi):
            if stray == 0:
                _attend(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, pid, pid * G * M,
                        q_ok, sqh, sqn, skh, skn, svh, svn, soh, son, spet, speh, sbkh, sbvh,
                        N, M, D, scale_hi, scale_lo, p_smem, lead_smem, q_smem, k_smem,
                        HAS_PE, HAS_MASK, HAS_BLANK, BLOCK_M, BLOCK_D, DC, KC, L3K, L3V)
            else:
                # Queries with lists of their own: each one in turn, as the group's lead
                # (the other rows' products are computed and dropped). Only rows < N: a
                # lead past N would read past the batch's member_idx.
                for gi in range(0, gl.minimum(G, N - pid * G)):
                    _attend(Q, K, V, O, LSE, IDX, PEIDX, MASK, PE, BK, BV, h, pid,
                            (pid * G + gi) * M, q_ok & (rows == gi), sqh, sqn, skh, skn, svh,
                            svn, soh, son, spet, speh, sbkh, sbvh, N, M, D, scale_hi,
                            scale_lo, p_smem, lead_smem, q_smem, k_smem, HAS_PE, HAS_MASK,
                            HAS_BLANK, BLOCK_M, BLOCK_D, DC, KC, L3K, L3V)
