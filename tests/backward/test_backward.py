"""Gradients of the op and of the module: every backend against the float64 reference,
gradcheck in float64 wherever a backend takes float64, finite and matching norms."""

from __future__ import annotations

import pytest
import torch

from cluster import ops, testing
from cluster.testing import CONFIGS, RAGGED_CONFIGS

from ..conftest import ALL_DTYPES, DTYPE_IDS, require_backend, skip_slow_on_cpu

SEED = 4321
GRAD_NAMES = ("q", "k", "v", "pe_table", "blank_k", "blank_v")


def _grads(backend, x, dtype, device, dout, deterministic=None):
    xi = x.to(dtype, device, requires_grad=True)
    return testing.run_case(xi, backend=backend, dout=dout, deterministic=deterministic)[1]


def _check_grads(backend, cfg, dtype, device, reference_cache, bwd_tol, deterministic=None,
                 **recipe):
    require_backend(backend, device, dtype)
    ref = reference_cache(cfg, SEED, **recipe)
    x = testing.make_inputs(cfg, seed=SEED, **recipe)
    grads = _grads(backend, x, dtype, device, ref["dout"], deterministic)
    assert set(grads) == set(ref["grads"])
    if dtype == torch.float32:
        for name, g in grads.items():
            r = ref["grads"][name]
            assert g.shape == r.shape
            assert testing.within_fp32_tolerance(g, r, bwd_tol), \
                f"{backend} d{name}: max abs/rel error {testing.max_errors(g, r)}"
    else:
        pt = _grads("reference", x, dtype, device, ref["dout"])
        for name, g in grads.items():
            ok, err, bound = testing.within_lowp_rule(g, pt[name], ref["grads"][name], dtype)
            assert ok, f"{backend} {dtype} d{name}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("lists", testing.LISTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_gradients_match_reference(backend, cfg, dtype, lists, device, reference_cache, bwd_tol):
    """AFF's per-token lists and the shared lists; the triton backend's fast mode."""
    if device.type == "cpu" and dtype != torch.float32 and backend != "reference":
        pytest.skip("low precision kernels are checked on the GPU only")
    skip_slow_on_cpu(device, backend, cfg, lists)
    _check_grads(backend, cfg, dtype, device, reference_cache, bwd_tol, lists=lists)


@pytest.mark.parametrize("lists", testing.LISTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_gradients_deterministic_mode(cfg, dtype, lists, device, reference_cache, bwd_tol):
    """The triton backend's deterministic backward at the suite configurations."""
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("low precision kernels are checked on the GPU only")
    if device.type == "cpu" and cfg.name == "config_3_large":
        pytest.skip("interpreter time (over two minutes): the deterministic backward runs at "
                    "config_3_large on the GPU, and at the ragged configurations here")
    _check_grads("triton", cfg, dtype, device, reference_cache, bwd_tol, deterministic=True,
                 lists=lists)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("cfg", RAGGED_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_ragged(backend, cfg, deterministic, device, reference_cache, bwd_tol):
    """Duplicates must accumulate, fully masked rows must give zero gradients, odd sizes."""
    _check_grads(backend, cfg, torch.float32, device, reference_cache, bwd_tol,
                 deterministic=deterministic, duplicates=True, empty_rows=True)


@pytest.mark.parametrize("backend", ["cuda"])
def test_gradients_ragged_cuda(backend, ragged_config, device, reference_cache, bwd_tol):
    _check_grads(backend, ragged_config, torch.float32, device, reference_cache, bwd_tol,
                 duplicates=True, empty_rows=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradcheck_float64(backend, device):
    """torch.autograd.gradcheck on a tiny float64 problem with every feature switched on."""
    require_backend(backend, device, torch.float64)
    cfg = testing.Config("tiny", B=1, N=16, C=6, H=2, M=8, cluster_size=4, ragged=True)
    x = testing.make_inputs(cfg, seed=2, duplicates=True, empty_rows=True).to(
        torch.float64, device, requires_grad=True)
    names = list(x.float_tensors())

    def f(*tensors):
        kw = x.kwargs()
        kw.update({n: t for n, t in zip(names, tensors) if n in kw})
        t = dict(zip(names, tensors))
        return ops.cluster_attention(t["q"], t["k"], t["v"], x.member_idx, backend=backend,
                                     deterministic=True, **kw)

    # gradcheck also demands bitwise-reentrant backward; the reference on CUDA gets its
    # gathers' gradients from torch's atomic scatter-add, which is not (torch's own
    # nondeterminism, not ours): allow rounding-level differences there only.
    nondet = 1e-12 if (device.type == "cuda" and backend == "reference") else 0.0
    assert torch.autograd.gradcheck(f, tuple(x.float_tensors().values()), eps=1e-6, atol=1e-6,
                                    nondet_tol=nondet)


def test_gradcheck_empty_rows_without_blank():
    """Rows with nothing valid: zero output and exactly zero gradient, no NaN."""
    x = testing.make_inputs(RAGGED_CONFIGS[0], seed=9, blank=False, empty_rows=True).to(
        torch.float64, requires_grad=True)
    out = testing.run_case(x, backend="reference")[0]
    out.sum().backward()
    empty = ~x.mask.any(-1)
    assert empty.any()
    assert (x.q.grad.permute(0, 2, 1, 3)[empty] == 0).all()
    for t in x.float_tensors().values():
        assert torch.isfinite(t.grad).all()


def test_gradient_norms_finite_and_matching(backend, config, device, reference_cache):
    if device.type == "cpu" and backend == "triton" and config.name == "config_3_large":
        pytest.skip("interpreter time: config_3_large triton gradients are checked elementwise "
                    "in test_gradients_match_reference")
    ref = reference_cache(config, SEED)
    x = testing.make_inputs(config, seed=SEED)
    grads = _grads(backend, x, torch.float32, device, ref["dout"])
    for name, g in grads.items():
        n, rn = float(g.double().norm()), float(ref["grads"][name].norm())
        assert torch.isfinite(g).all(), name
        assert abs(n - rn) <= 1e-3 * (1 + rn), (name, n, rn)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_module_gradients_match_reference(backend, device, loss_tol, bwd_tol):
    """Module parameters' gradients through a backend equal those through the reference."""
    require_backend(backend, device, torch.float32)
    from cluster.nn import ClusterAttention

    cfg = CONFIGS[1]
    x = testing.make_inputs(cfg, seed=17)
    nb = x.extras["neighborhoods"]
    torch.manual_seed(0)
    m64 = ClusterAttention(cfg.C, cfg.H, backend="reference", rel_pos_width=x.extras["R"]).double()
    m = ClusterAttention(cfg.C, cfg.H, backend=backend, rel_pos_width=x.extras["R"]).to(device)
    m.load_state_dict(m64.state_dict())
    feat = torch.randn(cfg.B, cfg.N, cfg.C, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)
    args = (x.member_idx, x.mask, nb.pe_idx, False)
    out64 = m64(feat, *args)
    loss64 = (out64**2).mean()
    loss64.backward()
    out = m(feat.float().to(device), *(a.to(device) if torch.is_tensor(a) else a for a in args))
    loss = (out**2).mean()
    loss.backward()
    assert abs(loss.item() - loss64.item()) <= loss_tol * (1 + abs(loss64.item()))
    for (name, p64), p in zip(m64.named_parameters(), m.parameters()):
        assert testing.within_fp32_tolerance(p.grad, p64.grad, bwd_tol), \
            (name, testing.max_errors(p.grad, p64.grad))
