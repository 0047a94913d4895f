"""Forward outputs of every backend present here against the float64 reference, and
backends against each other.

float32 is judged elementwise (atol = rtol = 1e-4); float16 / bfloat16 by the
flash-attention rule (error vs float64 at most 2x that of the PyTorch reference run in the
same low precision, plus one rounding unit). See cluster.testing for the rules.
"""

from __future__ import annotations

import pytest
import torch

from cluster import ops, reference, testing
from cluster.testing import CONFIGS, RAGGED_CONFIGS

from ..conftest import ALL_DTYPES, DTYPE_IDS, require_backend, skip_slow_on_cpu

SEED = 1234


def _check_against_reference(backend, cfg, dtype, device, reference_cache, fwd_tol, **recipe):
    require_backend(backend, device, dtype)
    ref = reference_cache(cfg, SEED, **recipe)["out"]
    x = testing.make_inputs(cfg, seed=SEED, **recipe)
    out = testing.run_case(x.to(dtype, device), backend=backend)[0]
    assert out.shape == ref.shape and out.dtype == dtype and out.device == device
    if dtype == torch.float32:
        err = testing.max_errors(out, ref)
        assert testing.within_fp32_tolerance(out, ref, fwd_tol), f"{backend} fp32 max abs/rel error {err}"
    else:
        pt = testing.run_case(x.to(dtype, device), backend="reference")[0]
        ok, err, bound = testing.within_lowp_rule(out, pt, ref, dtype)
        assert ok, f"{backend} {dtype}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("lists", testing.LISTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_forward_matches_reference(backend, cfg, dtype, lists, device, reference_cache, fwd_tol):
    """AFF's per-token lists (every other test's default too) and the shared lists."""
    if device.type == "cpu" and dtype != torch.float32 and backend != "reference":
        pytest.skip("low precision kernels are checked on the GPU only (interpreter is float32-faithful only)")
    skip_slow_on_cpu(device, backend, cfg, lists)
    _check_against_reference(backend, cfg, dtype, device, reference_cache, fwd_tol, lists=lists)


@pytest.mark.parametrize("cfg", RAGGED_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_forward_ragged(backend, cfg, device, reference_cache, fwd_tol):
    """Padded last cluster, odd head dims, odd M, duplicates, rows with nothing valid."""
    _check_against_reference(backend, cfg, torch.float32, device, reference_cache, fwd_tol,
                             duplicates=True, empty_rows=True)


@pytest.mark.parametrize("recipe", [
    dict(pe=False), dict(blank=False), dict(mask=False), dict(pe=False, blank=False, mask=False),
    dict(duplicates=True), dict(index_dtype=torch.int32),
], ids=["no_pe", "no_blank", "no_extra_mask", "bare", "duplicates", "int32"])
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_forward_variants(backend, recipe, device, reference_cache, fwd_tol):
    _check_against_reference(backend, CONFIGS[0], torch.float32, device, reference_cache, fwd_tol,
                             **recipe)


def test_reference_float32_vs_float64(config, reference_cache, fwd_tol):
    """The ground truth itself: float32 reference within tolerance of float64."""
    ref = reference_cache(config, SEED)["out"]
    x = testing.make_inputs(config, seed=SEED).to(torch.float32)
    out = testing.run_case(x, backend="reference")[0]
    assert testing.within_fp32_tolerance(out, ref, fwd_tol)


def test_reference_matches_loop_definition():
    """The vectorised reference against a per-query loop written from the README's formula."""
    cfg = RAGGED_CONFIGS[0]
    x = testing.make_inputs(cfg, seed=7, duplicates=True, empty_rows=True)
    out = reference.cluster_attention(x.q, x.k, x.v, x.member_idx, x.pe_table, x.pe_idx,
                                      x.mask, x.blank_k, x.blank_v)
    B, H, N, D = x.q.shape
    scale = D**-0.5
    expect = torch.zeros_like(out)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                valid = x.mask[b, i].nonzero().flatten().tolist()
                logits, vals = [], []
                for j in valid:
                    n = int(x.member_idx[b, i, j])
                    logits.append(scale * x.q[b, h, i] @ x.k[b, h, n]
                                  + x.pe_table[x.pe_idx[b, i, j], h])
                    vals.append(x.v[b, h, n])
                logits.append(scale * x.q[b, h, i] @ x.blank_k[h])
                vals.append(x.blank_v[h])
                p = torch.softmax(torch.stack(logits), 0)
                expect[b, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_empty_rows_without_blank_are_zero(backend, device):
    require_backend(backend, device, torch.float32)
    x = testing.make_inputs(RAGGED_CONFIGS[0], seed=3, blank=False, empty_rows=True)
    x = x.to(torch.float32, device)
    out = testing.run_case(x, backend=backend)[0]
    empty = ~x.mask.any(-1)  # [B, N]
    assert empty.any()
    assert torch.isfinite(out).all()
    assert (out.permute(0, 2, 1, 3)[empty] == 0).all()


def test_masked_slots_have_no_influence(backend, device):
    """Changing the key/value a masked slot points to must not change the output."""
    x = testing.make_inputs(CONFIGS[0], seed=11).to(torch.float32, device)
    out = testing.run_case(x, backend=backend)[0]
    y = x.to(torch.float32, device)
    moved = torch.randint(0, y.q.shape[2], y.member_idx.shape,
                          generator=torch.Generator().manual_seed(5)).to(device, y.member_idx.dtype)
    y.member_idx = torch.where(y.mask, y.member_idx, moved)
    y.pe_idx = torch.where(y.mask, y.pe_idx, torch.zeros_like(y.pe_idx))
    out2 = testing.run_case(y, backend=backend)[0]
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-6)


PAIRS = [("triton", "cuda"), ("triton", "reference"), ("cuda", "reference")]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-vs-{p[1]}")
def test_backends_agree(pair, dtype, config, device, fwd_tol):
    """New vs old vs reference on identical inputs, wherever both exist."""
    a, b = pair
    require_backend(a, device, dtype)
    require_backend(b, device, dtype)
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("low precision backend pairs are compared on the GPU")
    x = testing.make_inputs(config, seed=SEED + 1)
    oa = testing.run_case(x.to(dtype, device), backend=a)[0]
    ob = testing.run_case(x.to(dtype, device), backend=b)[0]
    if dtype == torch.float32:
        # two float32 results each within tol of float64 are within 2 tol of each other
        assert testing.within_fp32_tolerance(oa, ob, 2 * fwd_tol), testing.max_errors(oa, ob)
    else:
        ref = testing.make_inputs(config, seed=SEED + 1)
        r64 = testing.run_case(ref, backend="reference")[0]
        pt = testing.run_case(x.to(dtype, device), backend="reference")[0]
        ea, eb = testing.max_errors(oa, r64)[0], testing.max_errors(ob, r64)[0]
        bound = 2 * testing.LOWP_FACTOR * testing.max_errors(pt, r64)[0] + 2 * testing.lowp_atol(r64, dtype)
        assert testing.max_errors(oa, ob)[0] <= bound, (ea, eb, bound)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_params_in_float32_beside_half_activations(backend, device):
    """Autocast keeps parameters in float32; the op must take them without a silent downcast error."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    require_backend(backend, device, dtype)
    if device.type == "cpu" and backend != "reference":
        pytest.skip("low precision kernels are checked on the GPU")
    x = testing.make_inputs(CONFIGS[0], seed=5).to(dtype, device, param_dtype=torch.float32)
    out = testing.run_case(x, backend=backend)[0]
    assert out.dtype == dtype and torch.isfinite(out).all()
