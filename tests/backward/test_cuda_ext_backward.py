"""Backward of the unfused CUDA extension (cluster.cuda_ext) against PyTorch autograd.

On a machine without CUDA only the Python half runs: cuda_ext's autograd formulas and
composition on emulated ops (see tests/forward/test_cuda_ext.py). The GPU tests check
each op's backward kernels, the deterministic path, and the composed op's gradients
against autograd through cluster.reference.
"""

from __future__ import annotations

import pytest
import torch

from cluster import cuda_ext, ops, reference, testing

from ..forward.test_cuda_ext import (
    DET_SEEN,
    DT_IDS,
    FLOATS,
    VARIANTS,
    attention_args,
    compose,
    make_attention_case,
    make_wf_case,
    reference_attention,
    to_double,
)

PARAMS = ("q", "k", "v", "pe_table", "blank_k", "blank_v")
# (rtol, atol) of one op's gradients against float64 autograd on the same inputs.
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2),
            torch.float64: (1e-10, 1e-10)}


def _grads(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)


def _param_leaves(case):
    names = [n for n in PARAMS if case.get(n) is not None]
    return names, [case[n] for n in names]


# ================================================ CPU: Python side on emulated ops


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_composition_grads_match_reference(variant):
    case = to_double(make_attention_case(seed=30, **VARIANTS[variant]), requires_grad=True)
    names, leaves = _param_leaves(case)
    out = compose(case)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(31), dtype=out.dtype)
    got = _grads(out, leaves, g)
    want = _grads(reference_attention(case), leaves, g)
    for name, a, b in zip(names, got, want):
        assert a is not None and torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_fully_masked_rows_get_zero_grads():
    case = to_double(make_attention_case(seed=32, pe=True, mask=True, blank=False, empty_rows=True),
                     requires_grad=True)
    out = compose(case)
    dq, = torch.autograd.grad(out.sum(), [case["q"]])
    assert torch.isfinite(dq).all()
    assert torch.equal(dq[:, :, ::4], torch.zeros_like(dq[:, :, ::4]))


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_flag_reaches_backward_ops(deterministic):
    case = to_double(make_attention_case(seed=33, **VARIANTS["all"]), requires_grad=True)
    DET_SEEN.clear()
    compose(case, deterministic=deterministic).sum().backward()
    assert DET_SEEN and set(DET_SEEN) == {deterministic}


def test_only_requested_grads_are_returned():
    from ..forward.test_cuda_ext import emulated_ops

    ns = emulated_ops()
    case = to_double(make_attention_case(seed=34, pe=False, mask=False, blank=False))
    q = case["q"].clone().requires_grad_()
    out = ns.qk_forward(case["q"], case["k"].clone(), case["member_idx"])
    assert out.grad_fn is None
    out = ns.qk_forward(q, case["k"], case["member_idx"])
    out.sum().backward()
    assert q.grad is not None


# ========================================================== GPU: each op's backward


def _op_case(op, dtype, device, index_dtype, seed, **shape):
    case = make_attention_case(seed=seed, dtype=dtype, device=device, index_dtype=index_dtype,
                               pe=False, mask=False, blank=False, **shape)
    if op == "qk":
        return [case["q"], case["k"]], case["member_idx"]
    if op == "av":
        g = torch.Generator().manual_seed(seed + 1)
        B, H, N, _ = case["q"].shape
        attn = torch.rand(B, H, N, case["member_idx"].shape[-1], generator=g).to(device, dtype)
        return [attn, case["v"]], case["member_idx"]
    w, f, idx = make_wf_case(seed=seed, dtype=dtype, device=device, index_dtype=index_dtype)
    return [w, f], idx


_FWD = {"qk": "qk_forward", "av": "av_forward", "wf": "wf_forward"}
_BWD = {"qk": "qk_backward", "av": "av_backward", "wf": "wf_backward"}
_REF = {"qk": reference.query_key, "av": reference.attention_value, "wf": reference.weighted_features}


def _ref_grads(op, floats, idx, grad_out):
    leaves = [x.detach().double().requires_grad_() for x in floats]
    return torch.autograd.grad(_REF[op](*leaves, idx), leaves, grad_out.double())


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,), ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_op_backward_matches_autograd(cuda, op, dtype, index_dtype, deterministic):
    floats, idx = _op_case(op, dtype, cuda, index_dtype, seed=40)
    leaves = [x.clone().requires_grad_() for x in floats]
    out = getattr(torch.ops.cluster, _FWD[op])(*leaves, idx, deterministic)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(41)).to(cuda, dtype)
    got = torch.autograd.grad(out, leaves, g)
    want = _ref_grads(op, floats, idx, g)
    rtol, atol = GRAD_TOL[dtype]
    for a, b, x in zip(got, want, floats):
        assert a.dtype == x.dtype and a.shape == x.shape
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_op_gradcheck_float64(cuda, op, deterministic):
    floats, idx = _op_case(op, torch.float64, cuda, torch.int64, seed=42, B=1, H=2, N=6, D=3, M=4)
    leaves = [x.clone().requires_grad_() for x in floats]
    fn = getattr(torch.ops.cluster, _FWD[op])
    # Atomic sums may round differently run to run, hence the reentrancy tolerance.
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs, idx, deterministic), leaves,
                                    nondet_tol=0.0 if deterministic else 1e-12)


def test_duplicate_indices_accumulate(cuda):
    floats, idx = _op_case("qk", torch.float32, cuda, torch.int64, seed=43)
    q, k = floats
    B, H, N, D = q.shape
    idx = torch.zeros(B, N, 5, dtype=torch.int64, device=cuda)
    idx[:, :, 1] = 2  # keys 0 (four times per query) and 2 (once)
    for det in (False, True):
        grad = torch.ones(B, H, N, 5, device=cuda)
        dq, dk = torch.ops.cluster.qk_backward(grad, q, k, idx, det)
        torch.testing.assert_close(dk[:, :, 0], 4 * q.sum(2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dk[:, :, 2], q.sum(2), rtol=1e-5, atol=1e-5)
        assert torch.equal(dk[:, :, 3:], torch.zeros_like(dk[:, :, 3:]))
        torch.testing.assert_close(dq, (4 * k[:, :, :1] + k[:, :, 2:3]).expand_as(q), rtol=1e-5, atol=1e-5)
    w, f, widx = make_wf_case(seed=44, device=cuda)
    widx = torch.full_like(widx, 1)
    for det in (False, True):
        go = torch.ones(*w.shape[:2], w.shape[3], f.shape[2], device=cuda)
        _, df = torch.ops.cluster.wf_backward(go, w, f, widx, det)
        torch.testing.assert_close(df[:, 1], w.sum((1, 2, 3))[:, None].expand_as(df[:, 1]),
                                   rtol=1e-5, atol=1e-4)
        assert torch.equal(df[:, 0], torch.zeros_like(df[:, 0]))


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_backward_index_dtypes_agree(cuda, op):
    out = []
    for index_dtype in (torch.int32, torch.int64):
        floats, idx = _op_case(op, torch.float32, cuda, index_dtype, seed=45)
        y = getattr(torch.ops.cluster, _FWD[op])(*floats, idx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(46)).to(cuda)
        out.append(getattr(torch.ops.cluster, _BWD[op])(g, *floats, idx, True))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
@pytest.mark.parametrize("empty", ["B", "N"])
def test_backward_of_empty_inputs(cuda, op, empty):
    shape = dict(B=0) if empty == "B" else dict(N=0)
    if op == "wf":
        w, f, idx = make_wf_case(**shape, device=cuda)
        floats = [w, f]
    else:
        floats, idx = _op_case(op, torch.float32, cuda, torch.int64, seed=47, **shape)
    leaves = [x.clone().requires_grad_() for x in floats]
    for det in (False, True):
        y = getattr(torch.ops.cluster, _FWD[op])(*leaves, idx, det)
        grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
        for gr, x in zip(grads, floats):
            assert gr is None or (gr.shape == x.shape and not gr.abs().sum().item())


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_backward_noncontiguous_grad(cuda, op):
    floats, idx = _op_case(op, torch.float32, cuda, torch.int64, seed=48)
    y = getattr(torch.ops.cluster, _FWD[op])(*floats, idx)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(49)).to(cuda)
    g_nc = g.transpose(0, -1).contiguous().transpose(0, -1)
    assert not g_nc.is_contiguous()
    a = getattr(torch.ops.cluster, _BWD[op])(g, *floats, idx, True)
    b = getattr(torch.ops.cluster, _BWD[op])(g_nc, *floats, idx, True)
    for x, z in zip(a, b):
        assert torch.equal(x, z)


def test_backward_ops_refuse_cpu(cuda):
    floats, idx = _op_case("qk", torch.float32, "cpu", torch.int64, seed=50)
    g = torch.ones(*floats[0].shape[:3], idx.shape[-1])
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu"):
        torch.ops.cluster.qk_backward(g, *floats, idx)


# ====================================================== GPU: determinism


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_deterministic_backward_is_bitwise_reproducible(cuda, op):
    # Few keys, many queries: every key is hit by many (query, slot) pairs.
    floats, idx = _op_case(op, torch.float32, cuda, torch.int64, seed=51, B=2, H=2, N=512, D=32, M=32)
    idx = idx % 7
    y = getattr(torch.ops.cluster, _FWD[op])(*floats, idx)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(52)).to(cuda)
    bwd = getattr(torch.ops.cluster, _BWD[op])
    first = bwd(g, *floats, idx, True)
    for _ in range(3):
        for a, b in zip(first, bwd(g, *floats, idx, True)):
            assert torch.equal(a, b)
    # Both modes against float64 (the suite's float32 gradient rule, cluster.testing), not
    # against each other at 1e-4: the hot keys' sums have ~2300 float32 terms, and the
    # fast mode's atomic order moved one element by 1.3e-4 (of 0.32) in an H200 run.
    ref = bwd(g.double(), *(f.double() for f in floats), idx, True)
    for det in (True, False):
        for a, r in zip(bwd(g, *floats, idx, det), ref):
            assert testing.within_fp32_tolerance(a, r, 1e-3), testing.max_errors(a, r)


def test_composed_deterministic_grads_are_reproducible(cuda):
    case = make_attention_case(B=2, H=2, N=64, D=16, M=16, seed=53, device=cuda, **VARIANTS["all"])
    case["member_idx"] = case["member_idx"] % 5
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            c = {n: (x.clone().requires_grad_() if n in PARAMS and x is not None else x)
                 for n, x in case.items()}
            names, leaves = _param_leaves(c)
            out = cuda_ext.cluster_attention(*attention_args(c), True)
            runs.append(torch.autograd.grad(out.square().sum(), leaves))
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ============================================ GPU: the composed op vs the reference


def _call(case, **kw):
    return ops.cluster_attention(case["q"], case["k"], case["v"], case["member_idx"],
                                 pe_table=case["pe_table"], pe_idx=case["pe_idx"], mask=case["mask"],
                                 blank_k=case["blank_k"], blank_v=case["blank_v"], backend="cuda", **kw)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_cluster_attention_fp32_grads_match_reference(cuda, variant, deterministic):
    case = make_attention_case(B=2, H=2, N=24, D=16, M=8, seed=60, device=cuda, **VARIANTS[variant])
    c = {n: (x.clone().requires_grad_() if n in PARAMS and x is not None else x) for n, x in case.items()}
    names, leaves = _param_leaves(c)
    out = _call(c, deterministic=deterministic)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(61)).to(cuda)
    got = torch.autograd.grad(out, leaves, g)
    ref = to_double(case, requires_grad=True)
    _, ref_leaves = _param_leaves(ref)
    want = torch.autograd.grad(reference_attention(ref), ref_leaves, g.double())
    for name, a, b in zip(names, got, want):
        assert a.dtype == case[name].dtype and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3, msg=name)


def test_fully_masked_rows_without_blank_have_zero_grads(cuda):
    case = make_attention_case(B=2, H=2, N=24, D=16, M=8, seed=62, device=cuda,
                               **VARIANTS["masked_rows_no_blank"])
    q = case["q"].clone().requires_grad_()
    out = _call(dict(case, q=q))
    assert torch.equal(out[:, :, ::4], torch.zeros_like(out[:, :, ::4]))
    dq, = torch.autograd.grad(out.sum(), [q])
    assert torch.isfinite(dq).all()
    assert torch.equal(dq[:, :, ::4], torch.zeros_like(dq[:, :, ::4]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DT_IDS[d])
def test_cluster_attention_low_precision_grads(cuda, dtype):
    case = make_attention_case(B=2, H=2, N=24, D=16, M=8, seed=63, device=cuda, dtype=dtype,
                               **VARIANTS["all"])

    def grads_of(fn, c):
        c = {n: (x.detach().clone().requires_grad_() if n in PARAMS and x is not None else x)
             for n, x in c.items()}
        names, leaves = _param_leaves(c)
        out = fn(c)
        # rounded to the test's dtype first, so that every run sees the same values
        gg = torch.randn(out.shape, generator=torch.Generator().manual_seed(64)).to(cuda, dtype)
        gg = gg.to(out.dtype)
        return names, torch.autograd.grad(out, leaves, gg)

    names, got = grads_of(_call, case)
    _, want = grads_of(reference_attention, to_double(case))
    _, lowp = grads_of(reference_attention, case)
    for name, a, b, p in zip(names, got, want, lowp):
        err = (a.double() - b).abs().max().item()
        pt_err = (p.double() - b).abs().max().item()
        floor = torch.finfo(dtype).eps * max(b.abs().max().item(), 1.0)
        assert err <= 2 * pt_err + floor, (name, err, pt_err)


def test_weighted_features_grads_through_ops(cuda):
    w, f, idx = make_wf_case(seed=65, device=cuda)
    w, f = w.requires_grad_(), f.requires_grad_()
    out = ops.weighted_features(w, f, idx, backend="cuda")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(66)).to(cuda)
    got = torch.autograd.grad(out, [w, f], g)
    want = _ref_grads("wf", [w, f], idx, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
