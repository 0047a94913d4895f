"""Backward of the fused Triton kernels (cluster.triton_kernels) against the float64 reference.

Without a GPU these run on Triton's CPU interpreter (tests/_triton.py sets TRITON_INTERPRET
before anything imports the package).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from cluster import ops, reference, testing

from .. import _triton

_DEV, _WHY = _triton.DEV, _triton.WHY
pytestmark = _triton.PYTESTMARK

if _WHY is None:
    from cluster.triton_kernels import (
        backward,
        backward_kv,
        backward_tail,
        common,
        forward,
        launch,
        reverse_map,
        tuning,
    )

PARAMS = ("q", "k", "v", "pe_table", "blank_k", "blank_v")
KWARGS = ("pe_table", "pe_idx", "mask", "blank_k", "blank_v")


def make_case(*shape, **kw):
    """cluster.testing.random_case on this module's device."""
    return testing.random_case(*shape, device=_DEV, **kw)


def leaves(case, dtype, param_dtype=None, only=None):
    """Detached copies in dtype (parameters in param_dtype), requiring grad."""
    pd = param_dtype or dtype
    out = dict(case)
    for n in PARAMS:
        if case[n] is not None:
            out[n] = case[n].detach().to(dtype if n in ("q", "k", "v") else pd)
            out[n].requires_grad_(only is None or n in only)
    return out


def fwd_bwd(c, backend, dout, scale=None, deterministic=False):
    kw = {n: c[n] for n in KWARGS}
    if backend == "reference":
        out = reference.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw,
                                          scale=scale)
    else:
        out = ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw, scale=scale,
                                    backend=backend, deterministic=deterministic)
    names = [n for n in PARAMS if c[n] is not None and c[n].requires_grad]
    grads = torch.autograd.grad(out, [c[n] for n in names], dout.to(out.dtype))
    return out, dict(zip(names, grads))


def assert_close(x, ref, tol, what=""):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = (x - ref).abs()
    assert bool((err <= tol + tol * ref.abs()).all()), f"{what}: max abs err {float(err.max()):.3e}"


def assert_grads_fp32(case, seed, deterministic):
    """The triton backward in float32 against the float64 reference, every gradient."""
    dout = dout_for(case, seed)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    _, g = fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=deterministic)
    for n in ref_g:
        assert_close(g[n], ref_g[n], 1e-3, f"d{n}")


def assert_grads_lowp(case, seed, dtype):
    """flash-attention's rule per gradient: error at most 2x that of PyTorch in the same
    dtype, plus a small absolute term."""
    dout = dout_for(case, seed)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    _, pt_g = fwd_bwd(leaves(case, dtype), "reference", dout)
    _, g = fwd_bwd(leaves(case, dtype), "triton", dout)
    for n in ref_g:
        ok, err, bound = testing.within_lowp_rule(g[n], pt_g[n], ref_g[n], dtype)
        assert ok, f"d{n}: err {err:.3e} > bound {bound:.3e}"


def gradcheck_triton(case, deterministic):
    """torch.autograd.gradcheck of the triton op in float64 over every float input of case.

    gradcheck runs the backward twice and compares. The fast mode adds d_pe_table with
    float atomics, whose order varies on a GPU (seen on the H100: a last-bit difference),
    so it gets a tolerance far below the check's own; the deterministic mode gets none."""
    names = [n for n in PARAMS if case[n] is not None]
    fixed = {n: case[n] for n in ("member_idx", "pe_idx", "mask")}

    def f(*xs):
        c = dict(fixed, **dict(zip(names, xs)))
        for n in PARAMS:
            c.setdefault(n, None)
        kw = {n: c[n] for n in KWARGS}
        return ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw,
                                     backend="triton", deterministic=deterministic)

    xs = [case[n].clone().requires_grad_() for n in names]
    nondet = 0.0 if deterministic or _DEV.type != "cuda" else 1e-12
    return torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True,
                                    nondet_tol=nondet)


def dout_for(case, seed):
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randn(case["q"].shape, generator=g, dtype=torch.float64).to(_DEV)


SHAPES = [
    pytest.param((2, 3, 61, 12, 24), id="n61_h3_d12_m24"),
    pytest.param((1, 2, 100, 20, 40), id="n100_h2_d20_m40"),
    pytest.param((2, 2, 37, 7, 5), id="n37_h2_d7_m5"),
    pytest.param((1, 2, 19, 100, 9), id="n19_h2_d100_m9"),
]
FLAGS = [
    pytest.param(dict(pe=True, mask=True, blank=True), id="pe_mask_blank"),
    pytest.param(dict(pe=False, mask=False, blank=False), id="plain"),
    pytest.param(dict(pe=True, mask=True, blank=False, empty_rows=True), id="empty_rows"),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_fp32_matches_reference(shape, flags, deterministic):
    seed = zlib.crc32(repr((shape, flags)).encode()) % 1000
    case = make_case(*shape, seed=seed, **flags)
    dout = dout_for(case, seed)
    ref_out, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    out, g = fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=deterministic)
    assert_close(out, ref_out, 1e-4, "out")
    assert set(g) == set(ref_g)
    for n in g:
        assert g[n].dtype == torch.float32 and g[n].shape == ref_g[n].shape
        assert_close(g[n], ref_g[n], 1e-3, f"d{n}")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_backward_fp64_matches_reference(index_dtype):
    case = make_case(2, 2, 41, 20, 33, seed=11, empty_rows=True, index_dtype=index_dtype)
    dout = dout_for(case, 11)
    ref_out, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout, scale=0.41)
    for det in (False, True):
        out, g = fwd_bwd(leaves(case, torch.float64), "triton", dout, scale=0.41,
                         deterministic=det)
        for n in ref_g:
            assert g[n].dtype == torch.float64
            assert_close(g[n], ref_g[n], 1e-11, f"d{n} (deterministic={det})")


@pytest.mark.parametrize("flags", [dict(pe=True, mask=True, blank=True),
                                   dict(pe=True, mask=True, blank=False, empty_rows=True)],
                         ids=["pe_mask_blank", "empty_rows"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_gradcheck_fp64(flags, deterministic):
    assert gradcheck_triton(make_case(1, 2, 9, 5, 6, seed=12, T=3, **flags), deterministic)


# Queries sharing key lists in groups of 8 (AFF's clusters): the forward's group kernel
# (tl.dot path) saves the out / lse the backward reads; stray_every=2 sends every other
# group down the per-query path of the same launch.
GROUP_SHAPES = SHAPES[:3] + [pytest.param((2, 2, 64, 16, 64), id="n64_h2_d16_m64")]
STRAYS = [pytest.param(0, id="shared"), pytest.param(2, id="strays")]


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("stray_every", STRAYS)
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", GROUP_SHAPES)
def test_group_shared_lists_backward_fp32(shape, flags, stray_every, deterministic):
    seed = zlib.crc32(repr((shape, flags, stray_every)).encode()) % 1000
    case = make_case(*shape, seed=seed, **flags, group=8, stray_every=stray_every)
    dout = dout_for(case, seed)
    ref_out, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    out, g = fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=deterministic)
    assert_close(out, ref_out, 1e-4, "out")
    for n in ref_g:
        assert_close(g[n], ref_g[n], 1e-3, f"d{n}")


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("stray_every", STRAYS)
def test_group_shared_lists_gradcheck_fp64(stray_every):
    case = make_case(1, 2, 19, 5, 6, seed=23, T=3, group=8, stray_every=stray_every)
    assert gradcheck_triton(case, deterministic=True)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_group_shared_lists_backward_low_precision(dtype):
    case = make_case(2, 2, 61, 32, 40, seed=24, group=8)
    assert_grads_lowp(case, 24, dtype)


# Lists of whole key clusters (AFF's layout, M a multiple of 8) take the key-cluster
# backward: one program per 8 keys walking the group-level map. N=61 and 37 leave a short,
# masked last cluster.
KEY_CLUSTER_SHAPES = [
    pytest.param((2, 3, 61, 12, 24), id="n61_h3_d12_m24"),
    pytest.param((1, 2, 100, 20, 40), id="n100_h2_d20_m40"),
    pytest.param((2, 2, 64, 16, 64), id="n64_h2_d16_m64"),
    pytest.param((2, 2, 37, 7, 8), id="n37_h2_d7_m8"),
]


def _group_map(case):
    """(gperm, gptr, bad) of the key side's group-level map of a case."""
    mask = case["mask"]
    return reverse_map._group_reverse_map(
        case["member_idx"].contiguous(),
        None if mask is None else mask.contiguous().view(torch.uint8), case["q"].shape[2])[1:]


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", KEY_CLUSTER_SHAPES)
def test_key_cluster_backward_fp32(shape, flags, deterministic):
    seed = zlib.crc32(repr((shape, flags, "kc")).encode()) % 1000
    case = make_case(*shape, seed=seed, **flags, whole_clusters=True)
    assert _group_map(case)[2].eq(0).all(), "inputs should take the key-cluster path"
    assert backward_kv._kv_group_blocks(shape[3], shape[4], torch.float32) is not None
    assert_grads_fp32(case, seed, deterministic)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_key_cluster_backward_low_precision(dtype):
    # The key-cluster kernel multiplies 16-bit operands on tensor cores (p and ds split
    # into hi + lo parts): flash-attention's rule as above.
    case = make_case(2, 2, 61, 32, 40, seed=29, whole_clusters=True)
    assert _group_map(case)[2].eq(0).all()
    assert_grads_lowp(case, 29, dtype)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("heads,split", [(1, None), (2, None), (2, (1, 3)), (2, (2, 2))],
                         ids=["1head", "2heads", "2heads_1perprog", "2heads_2perprog"])
def test_group_kernels_heads_per_tile(heads, split, monkeypatch):
    # The group forward and key-cluster backward put 8 tokens of HEADS heads in one
    # 16-row tile. H=3 leaves the last pair half empty; on a GPU small grids also split
    # the heads over programs (forced here), which may start a pair at any head.
    case = make_case(2, 3, 61, 12, 24, seed=31, whole_clusters=True)
    if split is not None:
        monkeypatch.setattr(common, "_head_groups", lambda n, B, H, dev, step=1, per_sm=4: split)
    dout = dout_for(case, 31)
    ref_out, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    with tuning.override(TUNING_GROUP_HEADS={"fwd": heads, "bwd_kv": heads}):
        out, g = fwd_bwd(leaves(case, torch.float32), "triton", dout)
    assert_close(out, ref_out, 1e-5, "out")
    for n in ref_g:
        assert_close(g[n], ref_g[n], 1e-4, f"d{n}")


@pytest.mark.usefixtures("group_kernels_on")
def test_group_backward_bf16_keeps_p_and_ds_bits():
    # p and ds enter the tensor-core products as hi + lo bf16 parts (the key-cluster and the
    # query-cluster backward): the gradients come out closer to float64 than PyTorch's own
    # bf16 run (for dk, dv: RMS error 0.63-0.73x of it over seeds 29-32; a single bf16 cast
    # of p and ds gives 0.89-1.13x).
    case = make_case(2, 2, 61, 32, 40, seed=29, whole_clusters=True)
    dout = dout_for(case, 29)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    _, pt_g = fwd_bwd(leaves(case, torch.bfloat16), "reference", dout)
    _, g = fwd_bwd(leaves(case, torch.bfloat16), "triton", dout)
    for n in ("q", "k", "v"):
        def rms(x, n=n):
            return float((x.double() - ref_g[n]).pow(2).mean().sqrt())
        assert rms(g[n]) <= 0.85 * rms(pt_g[n]), f"d{n}: {rms(g[n]):.3e} vs {rms(pt_g[n]):.3e}"


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_key_cluster_backward_hot_cluster(deterministic):
    # Every query group names key cluster 0 in its first slot block: that cluster's list
    # is long (13 entries), so its program walks several chunks of the group-level map.
    case = make_case(1, 2, 100, 16, 24, seed=33, whole_clusters=True)
    idx = case["member_idx"].clone()
    idx[:, :, :8] = torch.arange(8, device=idx.device)
    case["member_idx"] = idx
    gperm, gptr, bad = _group_map(case)
    assert bad.eq(0).all() and int(gptr[0, 1] - gptr[0, 0]) >= 13
    assert_grads_fp32(case, 33, deterministic)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_key_cluster_backward_mixed_batches(deterministic):
    # Batch 1 names one key out of its cluster's order: only it takes the token-level map.
    case = make_case(2, 2, 64, 16, 24, seed=26, whole_clusters=True)
    idx = case["member_idx"].clone()
    idx[1, 8:16, 3] = (idx[1, 8:16, 3] + 1) % 64
    case["member_idx"] = idx
    case["mask"][1, 8:16, 3] = True
    assert _group_map(case)[2].tolist() == [0, 1]
    assert_grads_fp32(case, 26, deterministic)


@pytest.mark.skipif(_DEV.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_backward_replays_as_a_cuda_graph(deterministic):
    # Neither mode reads anything back to the host (no sync), so a whole step is captured:
    # one batch takes the group-level map, the other the token-level one.
    case = make_case(2, 2, 64, 16, 24, seed=61, whole_clusters=True)
    case["member_idx"][1, 8:16, 3] = (case["member_idx"][1, 8:16, 3] + 1) % 64
    case["mask"][1, 8:16, 3] = True
    assert _group_map(case)[2].tolist() == [0, 1]
    c = leaves(case, torch.float32)
    dout = dout_for(case, 61).float()
    names = [n for n in PARAMS if c[n] is not None]

    def step():
        for n in names:
            c[n].grad = None
        out = ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"],
                                    **{n: c[n] for n in KWARGS}, backend="triton",
                                    deterministic=deterministic, check_indices=False)
        out.backward(dout)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    got = {n: c[n].grad.clone() for n in names}
    want_out = step()
    for n in names:
        if deterministic:
            assert torch.equal(got[n], c[n].grad), f"d{n}: replay differs from eager"
        else:
            assert_close(got[n], c[n].grad, 1e-4, f"d{n} replay vs eager")
    assert torch.equal(out, want_out)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_key_cluster_gradcheck_fp64(deterministic):
    case = make_case(1, 2, 19, 5, 16, seed=27, T=3, whole_clusters=True)
    assert _group_map(case)[2].eq(0).all()
    assert gradcheck_triton(case, deterministic)


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "counted"])
def test_group_key_map_lists_and_flags(deterministic):
    # The key side's map lists, per key cluster, the (query group, union entry) pairs whose
    # entry names it; the deterministic mode's (a stable sort) in order, the fast mode's (a
    # counting sort) the same pairs in any order.
    B, N, M = 2, 37, 24
    g = torch.Generator().manual_seed(28)
    idx, valid = testing.clustered_member_idx(B, N, M, group=8, generator=g)
    idx, valid = idx.to(_DEV), valid.to(_DEV)
    live = valid.clone()
    live[0, 16:24, 8:16] = False  # block 1 of group 2 unused in batch 0: no entry

    def group_map(member_idx, mask):
        return reverse_map._group_reverse_map(
            member_idx, None if mask is None else mask.view(torch.uint8), N, deterministic)

    def listed(gperm, gptr, b, c):
        got = gperm[b, int(gptr[b, c]):int(gptr[b, c + 1])].tolist()
        return got if deterministic else sorted(got)

    umap, gperm, gptr, bad = group_map(idx, live)
    assert bad.tolist() == [0, 0]
    n_groups, ucap = 5, umap.ucap
    for b in range(B):
        want = [[] for _ in range(n_groups)]
        for gi in range(n_groups):
            for u in range(ucap):
                c = int(umap.uc[b, gi, u])
                if c >= 0:
                    want[c].append(gi * ucap + u)
        got = [listed(gperm, gptr, b, c) for c in range(n_groups)]
        assert got == want
        assert int(gptr[b, 0]) == 0 and int(gptr[b, -1]) == sum(map(len, want))
    # A block out of cluster order, an index out of range, a query whose block straddles
    # two clusters: each flags its batch (and only it); masked slots may hold anything.
    # Without the padding mask the short last cluster's slots (all naming N - 1) are out
    # of order.
    assert group_map(idx, None)[3].tolist() == [1, 1]
    cases = {"stray": (0, 9, 2, lambda x: (x + 8) % N), "order": (0, 0, 1, lambda x: x ^ 1),
             "range": (0, 0, 5, lambda x: x + 10 * N)}
    for why, (b, q, s, f) in cases.items():
        broken = idx.clone()
        rows = slice(q, q + 1) if why == "stray" else slice(q, q + 8)
        broken[b, rows, s] = f(broken[b, rows, s])
        assert group_map(broken, valid)[3].tolist() == [1, 0], why
        hidden = valid.clone()
        hidden[b, rows, s] = False
        assert group_map(broken, hidden)[3].tolist() == [0, 0], why


def test_deterministic_is_bitwise_reproducible():
    case = make_case(2, 3, 61, 12, 24, seed=13, empty_rows=True)
    case["pe_idx"] = case["pe_idx"] % 2  # many slots per table row: long segments
    dout = dout_for(case, 13)
    runs = [fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=True)
            for _ in range(2)]
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), f"d{n} differs between two deterministic runs"
    _, gf = fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=False)
    for n in g1:
        assert_close(gf[n], g1[n], 1e-4, f"d{n} fast vs deterministic")


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e6], ids=["tiny", "unit", "huge"])
def test_deterministic_pe_grad_fixed_point(magnitude):
    # The deterministic d_pe_table sums ds in int64 fixed point with a scale taken from the
    # inputs' magnitudes: it must stay float32-accurate whatever they are (a fixed scale
    # would overflow on large gradients or round small ones to zero), in every table row.
    case = make_case(2, 3, 61, 12, 24, seed=31, empty_rows=True)
    case["pe_idx"] = case["pe_idx"] % 3  # long segments: many terms per table row
    dout = dout_for(case, 31) * magnitude
    c64 = leaves(case, torch.float64)
    c64["v"] = (c64["v"] * magnitude).detach().requires_grad_()
    _, ref_g = fwd_bwd(c64, "reference", dout)
    c32 = leaves(case, torch.float32)
    c32["v"] = (c32["v"] * magnitude).detach().requires_grad_()
    _, g = fwd_bwd(c32, "triton", dout, deterministic=True)
    ref = ref_g["pe_table"]
    err = (g["pe_table"].double().cpu() - ref.cpu()).abs().max()
    assert float(err) <= 1e-5 * float(ref.abs().max()), f"dpe_table: max abs err {float(err):.3e}"


def test_deterministic_pe_grad_zero_and_nonfinite():
    case = make_case(1, 2, 20, 8, 16, seed=32)
    dout = torch.zeros_like(dout_for(case, 32))
    _, g = fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=True)
    assert torch.equal(g["pe_table"], torch.zeros_like(g["pe_table"]))
    dout[0, 1, 3, 2] = float("nan")
    _, g = fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=True)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    assert torch.isnan(ref_g["pe_table"]).any() and torch.isnan(g["pe_table"]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpe_fixed_amax_is_torchs_max(dtype):
    # The fixed-point scale's max |dout| and max |v| come from one kernel (integer atomics
    # on float bits): strided heads, row ranges of several programs, the blank's rows, a
    # NaN, and the largest value in the last row or the blank must all be seen.
    g = torch.Generator().manual_seed(41)
    B, H, N, D = 2, 3, 150, 24
    dout = torch.randn(B, N, H, D, generator=g).to(dtype).to(_DEV).transpose(1, 2)
    v = torch.randn(B, H, N, D, generator=g).to(dtype).to(_DEV)
    blank_v = torch.randn(H, D, generator=g).to(dtype).to(_DEV)
    dout[1, 2, N - 1, D - 1] = -40.0  # the last row of the last program
    with tuning.override(AMAX_ROWS=64):
        for bv, want_v in ((None, v.abs().max()), (blank_v, v.abs().max())):
            amax = torch.zeros(2, dtype=torch.float32, device=_DEV)
            backward_tail._dpe_fixed_amax(dout, v, bv, amax)
            assert amax[0].item() == 40.0 and amax[1].item() == float(want_v)
        blank_v[2, 5] = 75.0
        amax = torch.zeros(2, dtype=torch.float32, device=_DEV)
        backward_tail._dpe_fixed_amax(dout, v, blank_v, amax)
        assert amax.tolist() == [40.0, 75.0]
        v[0, 1, 77, 3] = float("nan")
        amax.zero_()
        backward_tail._dpe_fixed_amax(dout, v, blank_v, amax)
        assert amax[0].item() == 40.0 and torch.isnan(amax[1])


def _tail(dpe=None, pe_mode=0, scale=None, pe_dtype=None, part=None, bk_dtype=None,
          bv_dtype=None, acc=torch.float32):
    """Run the backward's tail as _attn_backward does: part [2, R, H, D] or None."""
    R, H, D = (part.shape[1:] if part is not None else (1, dpe.shape[2], 1))
    plan = backward_tail._tail_plan(R, H * D) if part is not None else (1, 1, 0, 0, 0)
    count = scratch = None
    if part is not None and plan[3] > 1:
        count = torch.zeros(2 * plan[2], dtype=torch.int32, device=_DEV)
        scratch = torch.empty(2 * plan[3] * H * D, dtype=acc, device=_DEV)
    return backward_tail._backward_tail(dpe, pe_mode, scale, pe_dtype,
                                        part.reshape(-1) if part is not None else None,
                                        scratch, count, plan, R, H, D, bk_dtype, bv_dtype,
                                        acc), plan


@pytest.mark.parametrize("n_rep", [5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
def test_tail_finishes_fixed_point_pe_grad(n_rep, dtype):
    # The deterministic d_pe_table's int64 replicas: exact sums, one division in float64,
    # then the table's dtype through float32, as torch's sum, division and casts give
    # them, bitwise, over several programs and replica tiles. The first entries sit on
    # bfloat16 / float16 ties (a truncating or round-half-up cast gets them wrong).
    g = torch.Generator().manual_seed(42)
    T, H = 211, 3
    dpe = torch.randint(-2**30, 2**30, (n_rep, T, H), generator=g)  # float16: < 65504
    dpe[:, 0, :] = 0
    dpe[0, 0, 0] = 2**20 + 2**12           # 1 + 2^-8: a bfloat16 tie, rounds to 1
    dpe[0, 0, 1] = 2**20 + 3 * 2**12       # 1 + 3 * 2^-8: rounds up to 1 + 2^-6
    dpe[0, 0, 2] = -(2**20 + 2**9)         # -(1 + 2^-11): a float16 tie
    dpe = dpe.to(_DEV)
    scale = torch.tensor([2.0**20], device=_DEV)
    mid = torch.float64 if dtype == torch.float64 else torch.float32
    want = dpe.sum(0).double().div_(scale).to(mid).to(dtype)
    (got, dbk, dbv), _ = _tail(dpe, 3, scale, dtype)
    assert dbk is None and dbv is None
    assert got.dtype == dtype and got.shape == (T, H)
    assert torch.equal(got, want)
    if dtype == torch.bfloat16:
        assert got[0].tolist() == [1.0, 1.015625, -1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tail_sums_float_pe_replicas(dtype):
    g = torch.Generator().manual_seed(43)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dpe = torch.randn(23, 97, 2, generator=g, dtype=acc).to(_DEV)
    (got, _, _), _ = _tail(dpe, 1, None, dtype, acc=acc)
    want = dpe.double().sum(0)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float64: 1e-14}[dtype]
    assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("R,max_pieces", [(3, 512), (300, 512), (301, 16)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float16),
                                    (torch.float64, torch.float32)], ids=["f32", "16bit", "mixed"])
def test_tail_sums_blank_partials(R, max_pieces, dtypes):
    # dblank_k / dblank_v: column sums of the query-side kernel's partial rows, cut into
    # row pieces that the last program of a column chunk adds up (small tiles here, so 300
    # rows make 75 pieces and two chunks, 3 rows one piece; with at most 16 pieces, 301
    # rows make 16 longer ones); both slabs, in their own dtypes, twice with the same bits
    # (the sums' order is fixed).
    with tuning.override(TAIL_TILE=256, TAIL_MIN_TILES=2, TAIL_MAX_PIECES=max_pieces):
        g = torch.Generator().manual_seed(44 + R)
        H, D = 3, 48  # 144 columns: two chunks of 128
        acc = torch.float64 if torch.float64 in dtypes else torch.float32
        part = torch.randn(2, R, H, D, generator=g, dtype=acc).to(_DEV)
        (_, dbk, dbv), plan = _tail(part=part, bk_dtype=dtypes[0], bv_dtype=dtypes[1], acc=acc)
        assert (plan[2] > 1 and plan[3] > 1) == (R > 3)
        assert plan[3] == {3: 1, 300: 75, 301: 16}[R]
        (_, dbk2, dbv2), _ = _tail(part=part, bk_dtype=dtypes[0], bv_dtype=dtypes[1], acc=acc)
        for got, again, want, dt in ((dbk, dbk2, part[0], dtypes[0]), (dbv, dbv2, part[1], dtypes[1])):
            want = want.double().sum(0)
            assert got.dtype == dt and got.shape == (H, D)
            assert torch.equal(got, again)
            tol = {torch.float32: 1e-6, torch.float64: 1e-14}.get(dt, 1e-2)
            assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max()), dt


def test_tail_plan_bounds():
    for R, HD in ((1, 1), (1024, 256), (16384, 96), (32768, 64), (10**6, 3000)):
        block_r, block_c, n_chunks, n_pieces, rows = backward_tail._tail_plan(R, HD)
        assert block_r * block_c == tuning.TAIL_TILE and block_c >= min(HD, 128)
        assert n_chunks * block_c >= HD and (n_chunks - 1) * block_c < HD
        assert rows % block_r == 0 and n_pieces * rows >= R and (n_pieces - 1) * rows < R
        assert n_pieces <= tuning.TAIL_MAX_PIECES


def test_deterministic_follows_torch_setting():
    # ops passes deterministic=None as torch's global setting; the op must honour it.
    case = make_case(1, 2, 20, 8, 6, seed=14)
    dout = dout_for(case, 14)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        c = leaves(case, torch.float32)
        kw = {n: c[n] for n in KWARGS}
        out = ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw,
                                    backend="triton")
        out.backward(dout.float())
    finally:
        torch.use_deterministic_algorithms(prev)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    assert_close(c["pe_table"].grad, ref_g["pe_table"], 1e-3, "dpe_table")


def test_empty_rows_zero_grads():
    case = make_case(1, 2, 21, 8, 6, seed=15, blank=False)
    case["mask"][:, 3] = False
    case["mask"][:, 10] = False
    dout = dout_for(case, 15)
    out, g = fwd_bwd(leaves(case, torch.float32), "triton", dout)
    assert torch.equal(out[:, :, [3, 10]], torch.zeros_like(out[:, :, [3, 10]]))
    assert torch.equal(g["q"][:, :, [3, 10]], torch.zeros_like(g["q"][:, :, [3, 10]]))
    # Every row empty: all gradients exactly zero, nothing NaN.
    case["mask"][:] = False
    out, g = fwd_bwd(leaves(case, torch.float32), "triton", dout)
    for n, t in g.items():
        assert torch.equal(t, torch.zeros_like(t)), f"d{n} not zero"


def test_duplicates_accumulate():
    # Every slot names key 0: its gradient collects M contributions per query.
    B, H, N, D, M = 1, 2, 13, 8, 5
    case = make_case(B, H, N, D, M, seed=16, mask=False, pe=False, blank=False)
    case["member_idx"] = torch.zeros_like(case["member_idx"])
    dout = dout_for(case, 16)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    for det in (False, True):
        _, g = fwd_bwd(leaves(case, torch.float64), "triton", dout, deterministic=det)
        assert_close(g["v"], ref_g["v"], 1e-12, "dv")
        assert_close(g["k"], ref_g["k"], 1e-12, "dk")
        assert bool((g["v"][:, :, 1:] == 0).all())


@pytest.mark.parametrize("only", [("q",), ("k",), ("pe_table", "blank_v")],
                         ids=["q", "k", "pe_blank_v"])
def test_partial_requires_grad(only):
    case = make_case(1, 2, 25, 12, 9, seed=17)
    dout = dout_for(case, 17)
    _, ref_g = fwd_bwd(leaves(case, torch.float64, only=only), "reference", dout)
    _, g = fwd_bwd(leaves(case, torch.float32, only=only), "triton", dout)
    assert set(g) == set(only)
    for n in only:
        assert_close(g[n], ref_g[n], 1e-3, f"d{n}")


def test_low_precision_param_grads_keep_dtype():
    case = make_case(1, 2, 25, 16, 9, seed=18)
    dout = dout_for(case, 18)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    _, g = fwd_bwd(leaves(case, torch.float16, param_dtype=torch.float32), "triton", dout)
    for n in ("q", "k", "v"):
        assert g[n].dtype == torch.float16
    for n in ("pe_table", "blank_k", "blank_v"):
        assert g[n].dtype == torch.float32
    for n in g:
        scale = float(ref_g[n].abs().max())
        assert float((g[n].double() - ref_g[n]).abs().max()) <= 2e-2 * scale, f"d{n}"


def test_broadcast_upstream_grad():
    # out.sum().backward() hands the op an expanded gradient with stride 0 everywhere.
    case = make_case(1, 2, 19, 8, 5, seed=19)
    c = leaves(case, torch.float64)
    kw = {n: c[n] for n in KWARGS}
    ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw,
                          backend="triton").sum().backward()
    r = leaves(case, torch.float64)
    kw = {n: r[n] for n in KWARGS}
    reference.cluster_attention(r["q"], r["k"], r["v"], r["member_idx"], **kw).sum().backward()
    for n in PARAMS:
        assert_close(c[n].grad, r[n].grad, 1e-12, f"d{n}")


def test_zeroed_parts_are_zero_aligned_and_disjoint():
    # The backward's counters and sums share one zero fill: each part must start zeroed, on
    # an 8-byte boundary (int64 / float64 views), and writing one must not touch another.
    sizes = [(5, torch.int32), (3, torch.int64), (0, torch.int32), (7, torch.float32),
             (2, torch.float64)]
    parts = backward._zeroed(_DEV, *sizes)
    assert parts[2] is None  # nothing to cut for an empty part
    parts = [p for p in parts if p is not None]
    assert [(p.numel(), p.dtype) for p in parts] == [s for s in sizes if s[0]]
    for p in parts:
        assert p.data_ptr() % 8 == 0 and not p.any()
    for i, p in enumerate(parts):
        p.fill_(i + 1)
    for i, p in enumerate(parts):
        assert (p == i + 1).all(), f"part {i} was overwritten"


@pytest.mark.parametrize("blank_v_dtype", [torch.float32, torch.float64], ids=["same", "mixed"])
def test_backward_returns_do_not_alias(blank_v_dtype):
    # A custom op's returns may not share storage (torch.library rejects it under
    # torch.compile, which this CPU suite cannot run); the blank gradients come from one
    # partial-sum buffer, so check it here.
    c = leaves(make_case(1, 2, 19, 8, 5, seed=20), torch.float32)
    args = [c[n].detach() if c[n] is not None else None
            for n in ("q", "k", "v", "member_idx", *KWARGS)]
    args[-1] = args[-1].to(blank_v_dtype)
    out, lse = torch.ops.cluster_triton.attn_fwd(*args, 0.3, False)
    for det in (False, True):
        grads = torch.ops.cluster_triton.attn_bwd(torch.randn_like(out), *args[:3], out, lse,
                                                  *args[3:], 0.3, det, True, True)
        storages = [g.untyped_storage().data_ptr() for g in grads if g.numel()]
        assert len(storages) == 6 and len(set(storages)) == 6, storages


def test_query_cluster_kernel_dispatch():
    # 16-bit: the group kernels, M = 48 (a slot tile of 64) included; a tile too large for
    # one program: the per-query kernels. float32: the group forward (its FMA path), the
    # per-query backward.
    for kind in ("fwd", "bwd_q"):
        assert common._group_blocks(32, 64, torch.bfloat16, kind)[:3] == (64, 32, 1)
        assert common._group_blocks(32, 48, torch.bfloat16, kind)[:2] == (64, 32)
        assert common._group_blocks(128, 128, torch.bfloat16, kind) is None
    # (The interpreter keeps float32 forwards per query: TUNING_GROUP.)
    fp32_fwd = common._group_blocks(32, 48, torch.float32, "fwd")
    assert fp32_fwd is None if launch._INTERPRET else fp32_fwd[:2] == (64, 32)
    assert tuning.TUNING_GROUP_FMA["fwd", 4] and not tuning.TUNING_GROUP_FMA.get(("fwd", 2))
    assert common._group_blocks(32, 48, torch.float32, "bwd_q") is None


@pytest.mark.parametrize("M,want", [(64, 32), (48, 16), (40, 16), (7, 8), (1, 1)])
def test_lead_chunk_slots(M, want):
    # The FMA path's slot chunk at D = 32: whole chunks where M allows, never past the
    # [8, slots, D] tile budget (half of it in float64).
    assert forward._lead_slots(32, M, torch.float32) == want
    assert 8 * forward._lead_slots(128, 64, torch.float32) * 128 <= tuning.GROUP_TILE
    assert 8 * forward._lead_slots(32, 64, torch.float64) * 32 <= tuning.GROUP_TILE // 2


@pytest.mark.parametrize("group", [False, True], ids=["per_row", "group"])
def test_register_caps_keep_results(group, request):
    # TUNING_MAXNREG changes how ptxas allocates registers (spills on the GPU; ignored by
    # the interpreter), never what the kernels compute: every attention kernel capped low.
    if group:
        request.getfixturevalue("group_kernels_on")
    caps = {(name, width): 64 for kind in ("fwd", "bwd_q", "bwd_kv")
            for name in (kind, kind + "_group") for width in (2, 4)}
    case = make_case(2, 3, 64, 16, 16, seed=23, whole_clusters=True)
    dout = dout_for(case, 23)
    out_ref, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    with tuning.override(TUNING_MAXNREG=caps):
        for det in (False, True):
            out, g = fwd_bwd(leaves(case, torch.float32), "triton", dout, deterministic=det)
            assert_close(out, out_ref, 1e-5, "out")
            for n in ref_g:
                assert_close(g[n], ref_g[n], 1e-4, f"d{n}")
        assert_grads_lowp(case, 23, torch.bfloat16)


def test_head_groups_backward(monkeypatch):
    case = make_case(1, 3, 30, 12, 10, seed=20)
    dout = dout_for(case, 20)
    _, ref_g = fwd_bwd(leaves(case, torch.float64), "reference", dout)
    monkeypatch.setattr(common, "_head_groups", lambda n, B, H, dev, step=1, per_sm=4: (2, 2))
    for det in (False, True):
        _, g = fwd_bwd(leaves(case, torch.float64), "triton", dout, deterministic=det)
        for n in g:
            assert_close(g[n], ref_g[n], 1e-11, f"d{n}")


@pytest.mark.parametrize("dims", [(2, 33, 23, 9, 3, 20), (1, 17, 40, 5, 1, 80)],
                         ids=["w3_c20", "w1_c80"])
def test_weighted_features_backward(dims):
    B, N, Nf, M, W, C = dims
    g = torch.Generator().manual_seed(21)
    w = torch.randn(B, N, M, W, generator=g, dtype=torch.float64).to(_DEV)
    f = torch.randn(B, Nf, C, generator=g, dtype=torch.float64).to(_DEV)
    idx = torch.randint(0, Nf, (B, N, M), generator=g)
    idx[:, :, 1] = idx[:, :, 0]
    idx = idx.to(_DEV)
    dout = torch.randn(B, N, W, C, generator=g, dtype=torch.float64).to(_DEV)
    wr, fr = w.clone().requires_grad_(), f.clone().requires_grad_()
    ref = torch.autograd.grad(reference.weighted_features(wr, fr, idx), (wr, fr), dout)
    for dt, tol, it in ((torch.float64, 1e-12, torch.int64), (torch.float32, 1e-3, torch.int32)):
        wt, ft = w.to(dt).requires_grad_(), f.to(dt).requires_grad_()
        out = ops.weighted_features(wt, ft, idx.to(it), backend="triton")
        gw, gf = torch.autograd.grad(out, (wt, ft), dout.to(dt))
        assert gw.dtype == dt and gf.dtype == dt
        assert_close(gw, ref[0], tol, "d_weights")
        assert_close(gf, ref[1], tol, "d_feat")


def test_weighted_features_gradcheck():
    g = torch.Generator().manual_seed(22)
    w = torch.randn(1, 6, 4, 2, generator=g, dtype=torch.float64).to(_DEV).requires_grad_()
    f = torch.randn(1, 5, 3, generator=g, dtype=torch.float64).to(_DEV).requires_grad_()
    idx = torch.randint(0, 5, (1, 6, 4), generator=g).to(_DEV)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.weighted_features(a, b, idx, backend="triton"), (w, f), fast_mode=True)


def _stable_sort_map(idx, valid, n_keys):
    """The reverse map's oracle: a stable sort of each batch's slot keys."""
    B, N, M = idx.shape
    key = idx.reshape(B, N * M).long()
    ok = (key >= 0) & (key < n_keys)
    if valid is not None:
        ok &= valid.reshape(B, N * M)
    key = torch.where(ok, key, torch.full_like(key, n_keys))
    sorted_key, perm = torch.sort(key, dim=1, stable=True)
    bounds = torch.arange(n_keys + 1, device=key.device).expand(B, -1).contiguous()
    return perm, torch.searchsorted(sorted_key, bounds)


def _map_case(N, M, n_keys, masked):
    # Duplicates within rows, a key named by many slots (more than one block of the
    # counting kernels), and indices outside [0, n_keys) that must land in no list.
    g = torch.Generator().manual_seed(N * 1000 + M)
    idx = torch.randint(-2, n_keys + 2, (2, N, M), generator=g)
    idx[:, : N // 2, 0] = 1
    idx[0, 1, :] = 3 % n_keys
    valid = (torch.rand(2, N, M, generator=g) > 0.3) if masked else None
    return idx.to(torch.int32).to(_DEV), None if valid is None else valid.to(_DEV)


MAP_CASES = pytest.mark.parametrize(
    "N,M,n_keys", [(5, 3, 5), (37, 24, 37), (90, 33, 50), (300, 9, 700), (6, 5, 40000)],
    ids=["tiny", "ragged", "fewer-keys", "more-keys", "int32-sort-keys"])


@MAP_CASES
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_sorted_reverse_map_is_a_stable_sort(N, M, n_keys, masked):
    idx, valid = _map_case(N, M, n_keys, masked)
    idx = idx.clamp(0, n_keys - 1)  # the sort version relies on the range check
    want_perm, want_ptr = _stable_sort_map(idx, valid, n_keys)
    perm, ptr = reverse_map._reverse_map(idx, valid, n_keys)
    assert perm.dtype == ptr.dtype == torch.int32
    assert torch.equal(ptr.long(), want_ptr)
    for b in range(2):
        used = int(want_ptr[b, -1])
        assert torch.equal(perm[b, :used].long(), want_perm[b, :used]), f"batch {b}"


@MAP_CASES
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_counting_reverse_map_has_the_sorts_lists(N, M, n_keys, masked):
    # The fast mode's map: the same list per key, in an order the atomics choose.
    idx, valid = _map_case(N, M, n_keys, masked)
    want_perm, want_ptr = _stable_sort_map(idx, valid, n_keys)
    perm, ptr = reverse_map._reverse_map_counting(
        idx, None if valid is None else valid.view(torch.uint8), n_keys)
    assert perm.dtype == ptr.dtype == torch.int32
    assert torch.equal(ptr.long(), want_ptr)
    for b in range(2):
        used = int(want_ptr[b, -1])
        # Each key's list sorted by slot must be the stable sort's list.
        key_of = torch.repeat_interleave(torch.arange(n_keys, device=_DEV), ptr[b].diff().long())
        got = perm[b, :used].long()
        got = got[torch.argsort(key_of * (N * M + 1) + got)]
        assert torch.equal(got, want_perm[b, :used]), f"batch {b}"


@MAP_CASES
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_range_reverse_map_is_the_stable_sort(N, M, n_keys, masked):
    # The deterministic mode's token-level map: the stable sort's lists, in slot order, for
    # the batches flagged in need (batch 0 here); the other batch's lists are not built.
    # Small ranges so that the cases span several ranges and several chunks per range.
    idx, valid = _map_case(N, M, n_keys, masked)
    want_perm, want_ptr = _stable_sort_map(idx, valid, n_keys)
    need = torch.tensor([1, 0], dtype=torch.int32, device=_DEV)
    with tuning.override(RANGE_MIN=150):
        perm, ptr = reverse_map._reverse_map_stable(
            idx, None if valid is None else valid.view(torch.uint8), n_keys, need)
    assert perm.dtype == ptr.dtype == torch.int32
    assert torch.equal(ptr[0].long(), want_ptr[0])
    used = int(want_ptr[0, -1])
    assert torch.equal(perm[0, :used].long(), want_perm[0, :used])
