"""torch.compile / custom-op integration of the fused Triton kernels.

The kernels are registered as torch.library custom ops, so dynamo sees one opaque op per
direction: a compiled function calling them must trace as a single graph. On the CPU
the op's real implementation runs on Triton's interpreter (TRITON_INTERPRET is set
before the module is imported).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo

from cluster import ops, reference

from .. import _triton

_DEV, _WHY = _triton.DEV, _triton.WHY
pytestmark = _triton.PYTESTMARK

if _WHY is None:
    from cluster import triton_kernels as tk
    from cluster.triton_kernels import autograd

# Inductor needs a C++ compiler for its CPU code; the CUDA path needs none here.
_HAVE_CXX = _DEV.type == "cuda" or any(shutil.which(c) for c in ("g++", "c++", "clang++"))
COMPILE_BACKENDS = [
    pytest.param("aot_eager", id="aot_eager"),
    pytest.param("inductor", id="inductor",
                 marks=pytest.mark.skipif(not _HAVE_CXX, reason="inductor needs a C++ compiler")),
]


def make_case(seed=0, B=1, H=2, N=19, D=8, M=5, T=4):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(_DEV).requires_grad_()

    return dict(
        q=randn(B, H, N, D), k=randn(B, H, N, D), v=randn(B, H, N, D),
        member_idx=torch.randint(0, N, (B, N, M), generator=g).to(_DEV),
        pe_table=randn(T, H), pe_idx=torch.randint(0, T, (B, N, M), generator=g).to(_DEV),
        mask=(torch.rand(B, N, M, generator=g) > 0.2).to(_DEV),
        blank_k=randn(H, D), blank_v=randn(H, D),
    )


def fresh(case):
    return {n: (t.detach().clone().requires_grad_() if t.is_floating_point() else t)
            for n, t in case.items()}


FLOATS = ("q", "k", "v", "pe_table", "blank_k", "blank_v")


def loss_backend(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v):
    out = tk.cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v,
                               0.3, False)
    return (out * out).sum()


def loss_ops(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v):
    # check_indices=False: the range check reads values back to the host, a graph break
    # by design.
    out = ops.cluster_attention(q, k, v, member_idx, pe_table=pe_table, pe_idx=pe_idx,
                                mask=mask, blank_k=blank_k, blank_v=blank_v, scale=0.3,
                                backend="triton", deterministic=False, check_indices=False)
    return (out * out).sum()


def loss_reference(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v):
    out = reference.cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k,
                                      blank_v, 0.3)
    return (out * out).sum()


def check_against_reference(fn, case):
    c, r = fresh(case), fresh(case)
    loss = fn(**c)
    loss.backward()
    ref = loss_reference(**r)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    for n in FLOATS:
        torch.testing.assert_close(c[n].grad, r[n].grad, atol=1e-3, rtol=1e-3, msg=f"d{n}")


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_backend_op_compiles_fullgraph(backend):
    torch._dynamo.reset()
    case = make_case(seed=1)
    check_against_reference(torch.compile(loss_backend, backend=backend, fullgraph=True), case)


def test_backend_op_no_graph_breaks():
    torch._dynamo.reset()
    ex = torch._dynamo.explain(loss_backend)(**fresh(make_case(seed=2)))
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_ops_dispatch_compiles_fullgraph():
    # Through the public op: argument checks and backend dispatch must trace as well
    # (fullgraph=True turns any graph break into an error that names its cause).
    torch._dynamo.reset()
    case = make_case(seed=4)
    check_against_reference(torch.compile(loss_ops, backend="aot_eager", fullgraph=True), case)


def test_weighted_features_compiles_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1, 9, 4, 2, generator=g).to(_DEV)
    f = torch.randn(1, 7, 6, generator=g).to(_DEV)
    idx = torch.randint(0, 7, (1, 9, 4), generator=g).to(_DEV)

    def fn(w, f):
        return tk.weighted_features(w, f, idx).square().sum()

    w1, f1 = w.clone().requires_grad_(), f.clone().requires_grad_()
    torch.compile(fn, backend="aot_eager", fullgraph=True)(w1, f1).backward()
    w2, f2 = w.clone().requires_grad_(), f.clone().requires_grad_()
    reference.weighted_features(w2, f2, idx).square().sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f1.grad, f2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_optional", [True, False], ids=["pe_mask_blank", "plain"])
def test_opcheck_attention(with_optional):
    # Schema, fake (meta) implementations, autograd registration and AOT dispatch.
    c = fresh(make_case(seed=6, N=11, M=3))
    if not with_optional:
        for n in ("pe_table", "pe_idx", "mask", "blank_k", "blank_v"):
            c[n] = None
    args = (c["q"], c["k"], c["v"], c["member_idx"], c["pe_table"], c["pe_idx"], c["mask"],
            c["blank_k"], c["blank_v"], 0.3, True)
    torch.library.opcheck(torch.ops.cluster_triton.attn_fwd.default, args)
    out, lse = torch.ops.cluster_triton.attn_fwd(*args)
    dout = torch.randn_like(out)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:9]]
    bwd_args = (dout, *detached[:3], out.detach(), lse, *detached[3:], 0.3, True, True, True)
    torch.library.opcheck(torch.ops.cluster_triton.attn_bwd.default, bwd_args)


def test_opcheck_weighted_features():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1, 5, 3, 2, generator=g).to(_DEV).requires_grad_()
    f = torch.randn(1, 4, 6, generator=g).to(_DEV).requires_grad_()
    idx = torch.randint(0, 4, (1, 5, 3), generator=g).to(_DEV)
    torch.library.opcheck(torch.ops.cluster_triton.wf_fwd.default, (w, f, idx))
    dout = torch.randn(1, 5, 2, 6, generator=g).to(_DEV)
    torch.library.opcheck(torch.ops.cluster_triton.wf_bwd.default,
                          (dout, w.detach(), f.detach(), idx, True, True))


def test_autocast_passes_through():
    # Under autocast the op still receives (and returns) the dtype its callers chose.
    case = make_case(seed=8)
    c = fresh(case)
    low = torch.float16 if _DEV.type == "cuda" else torch.bfloat16
    with torch.autocast(_DEV.type, dtype=low):
        x = c["q"] * 1.0  # stays float32: elementwise ops are not autocast
        loss = loss_backend(x, c["k"], c["v"], c["member_idx"], c["pe_table"], c["pe_idx"],
                            c["mask"], c["blank_k"], c["blank_v"])
    loss.backward()
    assert loss.dtype == torch.float32 and c["q"].grad.dtype == torch.float32
    r = fresh(case)
    loss_reference(**r).backward()
    torch.testing.assert_close(c["q"].grad, r["q"].grad, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("needs", ["all", "q_only", "params_only"])
def test_eager_function_matches_custom_op(needs):
    # Eager calls take an autograd.Function, compiled ones the custom op: both must give
    # the same output and the same gradients (deterministic mode: bitwise), including
    # which gradients exist when only some inputs require them.
    case = make_case(seed=9, N=23, M=6)
    wanted = {"all": None, "q_only": {"q"}, "params_only": {"pe_table", "blank_k", "blank_v"}}[needs]
    results = []
    for path in ("function", "custom_op"):
        c = fresh(case)
        for n in ("q", "k", "v", "pe_table", "blank_k", "blank_v"):
            c[n].requires_grad_(wanted is None or n in wanted)
        args = (c["q"], c["k"], c["v"], c["member_idx"], c["pe_table"], c["pe_idx"], c["mask"],
                c["blank_k"], c["blank_v"], 0.4, True)
        if path == "function":
            out = autograd._AttnFunction.apply(*args, True)
        else:
            out = torch.ops.cluster_triton.attn_fwd(*args)[0]
        out.square().sum().backward()
        results.append((out.detach(), {n: c[n].grad for n in ("q", "k", "v", "pe_table", "blank_k",
                                                               "blank_v")}))
    (out_f, g_f), (out_c, g_c) = results
    assert torch.equal(out_f, out_c)
    for n in g_f:
        assert (g_f[n] is None) == (g_c[n] is None), n
        if g_f[n] is not None:
            assert torch.equal(g_f[n], g_c[n]), n
