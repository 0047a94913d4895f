"""Forward of the fused Triton kernels (cluster.triton_kernels) against the float64 reference.

Without a GPU these run on Triton's CPU interpreter (tests/_triton.py sets TRITON_INTERPRET
before anything imports the package).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

from cluster import ops, reference, testing
from cluster.testing import random_case as make_case

from .. import _triton

_DEV, _WHY = _triton.DEV, _triton.WHY
pytestmark = _triton.PYTESTMARK

if _WHY is None:
    from cluster import triton_kernels as tk
    from cluster.triton_kernels import common, forward, launch, tuning


def cast(case, dtype, param_dtype=None):
    pd = param_dtype or dtype
    out = dict(case)
    for n in ("q", "k", "v"):
        out[n] = case[n].to(dtype)
    for n in ("pe_table", "blank_k", "blank_v"):
        if case[n] is not None:
            out[n] = case[n].to(pd)
    return out


def run_triton(c, scale=None, deterministic=False):
    kw = {n: c[n] for n in ("pe_table", "pe_idx", "mask", "blank_k", "blank_v")}
    return ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw, scale=scale,
                                 backend="triton", deterministic=deterministic)


def run_reference(c, scale=None):
    kw = {n: c[n] for n in ("pe_table", "pe_idx", "mask", "blank_k", "blank_v")}
    return reference.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw,
                                       scale=scale)


def assert_close(x, ref, tol, what=""):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    err = (x - ref).abs()
    bound = tol + tol * ref.abs()
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    assert bool((err <= bound).all()), f"{what}: max abs err {float(err.max()):.3e}"


# Ragged sizes: N not a multiple of the row block, M odd or past one chunk, D not a
# power of two.
SHAPES = [
    pytest.param((2, 3, 61, 12, 24), id="n61_h3_d12_m24"),
    pytest.param((1, 2, 100, 20, 40), id="n100_h2_d20_m40"),
    pytest.param((2, 2, 37, 7, 5), id="n37_h2_d7_m5"),
    pytest.param((1, 1, 37, 32, 1), id="n37_h1_d32_m1"),
    pytest.param((1, 2, 19, 128, 9), id="n19_h2_d128_m9"),
    pytest.param((1, 1, 11, 200, 3), id="n11_h1_d200_m3"),
]
FLAGS = [
    pytest.param(dict(pe=True, mask=True, blank=True), id="pe_mask_blank"),
    pytest.param(dict(pe=False, mask=False, blank=False), id="plain"),
    pytest.param(dict(pe=True, mask=True, blank=False, empty_rows=True), id="empty_rows"),
]


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_fp32_matches_reference(shape, flags):
    B, H, N, D, M = shape
    case = make_case(B, H, N, D, M, seed=zlib.crc32(repr((shape, flags)).encode()) % 1000, **flags,
                     device=_DEV)
    ref = run_reference(case)
    out = run_triton(cast(case, torch.float32))
    assert out.dtype == torch.float32 and out.shape == (B, H, N, D)
    assert_close(out, ref, 1e-4, "out")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_forward_fp64_exact(index_dtype):
    case = make_case(2, 2, 45, 20, 40, seed=1, index_dtype=index_dtype, empty_rows=True,
                     device=_DEV)
    ref = run_reference(case, scale=0.37)
    out = run_triton(case, scale=0.37)
    assert out.dtype == torch.float64
    assert_close(out, ref, 1e-12, "out")


def test_mixed_index_dtypes():
    case = make_case(1, 2, 33, 16, 9, seed=2, device=_DEV)
    case["member_idx"] = case["member_idx"].to(torch.int32)
    case["pe_idx"] = case["pe_idx"].to(torch.int64)
    assert_close(run_triton(cast(case, torch.float32)), run_reference(case), 1e-4, "out")


def test_non_contiguous_inputs():
    # AFF's layout: q a permuted [B, N, H, D] view, k and v slices of one [B, N, H, 2, D].
    B, H, N, D, M = 2, 3, 29, 20, 11
    g = torch.Generator().manual_seed(3)
    kv_base = torch.randn(B, N, H, 2, D, generator=g, dtype=torch.float64).to(_DEV)
    q_base = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).to(_DEV)
    case = make_case(B, H, N, D, M, seed=3, device=_DEV)

    def views(dtype):
        kv = kv_base.to(dtype).permute(3, 0, 2, 1, 4)
        return q_base.to(dtype).permute(0, 2, 1, 3), kv[0], kv[1]

    case["q"], case["k"], case["v"] = views(torch.float64)
    ref = run_reference(case)
    c32 = cast(case, torch.float32)
    c32["q"], c32["k"], c32["v"] = views(torch.float32)
    assert not (c32["q"].is_contiguous() or c32["k"].is_contiguous() or c32["v"].is_contiguous())
    assert_close(run_triton(c32), ref, 1e-4, "out")
    # A last axis with stride != 1 is copied by the launcher rather than misread.
    c32["q"] = c32["q"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert c32["q"].stride(-1) != 1
    assert_close(run_triton(c32), ref, 1e-4, "out (strided D)")


def test_empty_rows_give_zero():
    # No blank and every slot masked: the output must be exactly 0, not NaN.
    case = make_case(1, 2, 21, 8, 6, seed=4, blank=False, device=_DEV)
    case["mask"] = torch.zeros_like(case["mask"])
    out = run_triton(cast(case, torch.float32))
    assert torch.equal(out, torch.zeros_like(out))


def test_lse_saved_by_forward():
    # The backward relies on lse: logsumexp of the valid logits (blank included), +inf
    # for rows with nothing valid.
    B, H, N, D, M = 1, 2, 23, 12, 7
    case = make_case(B, H, N, D, M, seed=5, blank=False, empty_rows=True, device=_DEV)
    scale = D**-0.5
    out, lse = torch.ops.cluster_triton.attn_fwd(
        case["q"], case["k"], case["v"], case["member_idx"], case["pe_table"],
        case["pe_idx"], case["mask"], None, None, scale, False)
    kg = reference._gather_rows(case["k"], case["member_idx"])
    logits = scale * (case["q"].unsqueeze(3) * kg).sum(-1)
    logits = logits + case["pe_table"][case["pe_idx"].long()].permute(0, 3, 1, 2)
    logits = logits.masked_fill(~case["mask"].unsqueeze(1), float("-inf"))
    want = torch.logsumexp(logits, -1)
    empty = ~case["mask"].any(-1).unsqueeze(1).expand_as(want)
    assert bool(torch.isinf(lse[empty]).all()) and bool((lse[empty] > 0).all())
    assert_close(lse[~empty], want[~empty], 1e-12, "lse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_low_precision(dtype):
    # flash-attention's rule: error at most 2x that of the reference run in the same dtype.
    case = make_case(2, 2, 40, 16, 24, seed=6, device=_DEV)
    ref = run_reference(case)
    low = cast(case, dtype, param_dtype=torch.float32)
    out = run_triton(low)
    assert out.dtype == dtype
    pt = run_reference(cast(case, dtype))
    ok, err, bound = testing.within_lowp_rule(out, pt, ref, dtype)
    assert ok, f"err {err:.3e} > bound {bound:.3e}"


# Queries sharing key lists in groups of 8 (AFF's clusters) take the group kernel's
# tl.dot path; stray_every=2 breaks every other group, which must then take the
# per-query path inside the same launch. The last shape's [M, D] tile is too large
# for one group tile, so it runs the per-query kernel.
GROUP_SHAPES = SHAPES[:5] + [
    pytest.param((2, 2, 64, 16, 64), id="n64_h2_d16_m64"),
    pytest.param((1, 2, 40, 128, 70), id="n40_h2_d128_m70_untiled"),
]
STRAYS = [pytest.param(0, id="shared"), pytest.param(2, id="strays")]


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("stray_every", STRAYS)
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", GROUP_SHAPES)
def test_group_shared_lists_fp32(shape, flags, stray_every):
    B, H, N, D, M = shape
    seed = zlib.crc32(repr((shape, flags, stray_every)).encode()) % 1000
    case = make_case(B, H, N, D, M, seed=seed, **flags, group=8, stray_every=stray_every,
                     device=_DEV)
    assert_close(run_triton(cast(case, torch.float32)), run_reference(case), 1e-4, "out")


@pytest.mark.parametrize("shape", GROUP_SHAPES[:3])
def test_per_query_kernel_on_shared_lists(shape):
    # The float32 / float64 forwards run the per-query kernel (TUNING_GROUP); with the tile
    # budget at 0 it stays so whatever the table says.
    B, H, N, D, M = shape
    case = make_case(B, H, N, D, M, seed=25, group=8, device=_DEV)
    with tuning.override(GROUP_TILE=0):
        assert common._group_blocks(D, M, torch.float32) is None
        assert_close(run_triton(cast(case, torch.float32)), run_reference(case), 1e-4, "out")


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("stray_every", STRAYS)
def test_group_shared_lists_fp64(stray_every):
    case = make_case(2, 3, 61, 12, 24, seed=21, empty_rows=True, blank=False, group=8,
                     stray_every=stray_every, device=_DEV)
    out, lse, _ = forward._attn_forward(case["q"], case["k"], case["v"], case["member_idx"],
                                     case["pe_table"], case["pe_idx"], case["mask"],
                                     case["blank_k"], case["blank_v"], 0.37)
    assert_close(out, run_reference(case, scale=0.37), 1e-12, "out")
    empty = (~case["mask"].any(-1))[:, None, :].expand_as(lse)
    assert bool(empty.any()) and bool(torch.isinf(lse[empty]).all())
    assert bool(torch.isfinite(lse[~empty]).all())


@pytest.mark.parametrize("stray_every", STRAYS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_group_shared_lists_low_precision(dtype, stray_every):
    case = make_case(2, 2, 61, 32, 40, seed=22, group=8, stray_every=stray_every,
                     device=_DEV)
    ref = run_reference(case)
    out = run_triton(cast(case, dtype, param_dtype=torch.float32))
    pt = run_reference(cast(case, dtype))
    ok, err, bound = testing.within_lowp_rule(out, pt, ref, dtype)
    assert ok, f"err {err:.3e} > bound {bound:.3e}"


def test_cdiv_is_tritons():
    # The launch grids use a plain-Python ceil division (triton.cdiv is a constexpr
    # function, slow on the host); it must agree with Triton's for every size, 0 included.
    import triton
    for a in (0, 1, 7, 8, 9, 63, 64, 65, 2**31 + 3):
        for b in (1, 8, 64, 1024):
            assert common._cdiv(a, b) == triton.cdiv(a, b)


@pytest.mark.parametrize("n_blocks,B,H,step,per_sm,want", [
    (32, 32, 8, 1, 4, (8, 1)),   # config_3_large's grid has 4 programs per SM: no split
    (32, 32, 8, 1, 8, (4, 2)),   # but under 8 (the Gluon forward's rule): 2 head groups
    (1, 1, 8, 1, 4, (1, 8)), (7, 3, 5, 1, 4, (1, 5)), (7, 3, 5, 2, 4, (2, 3)),
    (3, 2, 6, 4, 4, (4, 2)), (1, 2, 3, 2, 4, (2, 2)),
])
def test_head_group_split(n_blocks, B, H, step, per_sm, want, monkeypatch):
    # The split of the head loop on a GPU with 132 SMs (a device object only: no GPU used):
    # heads per program a multiple of step, enough groups to cover every head.
    monkeypatch.setitem(common._SM_COUNT, 0, 132)
    hpg, nhg = common._head_groups(n_blocks, B, H, torch.device("cuda:0"), step, per_sm)
    assert (hpg, nhg) == want
    assert hpg % step == 0 and hpg * nhg >= H > hpg * (nhg - 1)


def test_head_groups(monkeypatch):
    # On a GPU small grids split the heads over programs; force the split here.
    case = make_case(1, 3, 30, 12, 10, seed=7, device=_DEV)
    ref = run_reference(case)
    monkeypatch.setattr(common, "_head_groups", lambda n, B, H, dev, step=1, per_sm=4: (2, 2))
    assert_close(run_triton(case), ref, 1e-12, "out")


def test_unavailable_reason():
    assert tk.unavailable_reason(torch.device("cuda", 0), torch.float32) is None
    assert tk.unavailable_reason(torch.device("cuda"), torch.float64) is None
    assert tk.MAX_HEAD_DIM >= 128
    if _DEV.type == "cpu":
        assert tk.unavailable_reason(torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize("version,ok", [("3.4.0", False), ("3.5.1", True), ("3.10.0+git1a2b", True),
                                        ("2.3.1", False), ("3.6.0rc1", True)])
def test_unavailable_with_old_triton(version, ok, monkeypatch):
    import triton

    monkeypatch.setattr(launch, "_TRITON_RELEASE", launch._release(version))
    monkeypatch.setattr(triton, "__version__", version)
    why = tk.unavailable_reason(_DEV, torch.float32)
    if ok:
        assert why is None
    else:
        assert why is not None and "triton >= 3.5" in why and version in why


def test_unavailable_without_interpreter():
    code = (
        "import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from cluster import triton_kernels as tk\n"
        "print(tk.unavailable_reason(torch.device('cpu'), torch.float32))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "TRITON_INTERPRET=1" in res.stdout and "CUDA GPU" in res.stdout


@pytest.mark.parametrize("dims", [(2, 33, 23, 9, 3, 20), (1, 17, 40, 5, 1, 80)],
                         ids=["w3_c20", "w1_c80"])
def test_weighted_features_forward(dims):
    B, N, Nf, M, W, C = dims
    g = torch.Generator().manual_seed(8)
    w = torch.randn(B, N, M, W, generator=g, dtype=torch.float64).to(_DEV)
    f = torch.randn(B, Nf, C, generator=g, dtype=torch.float64).to(_DEV)
    idx = torch.randint(0, Nf, (B, N, M), generator=g)
    idx[:, :, 1] = idx[:, :, 0]  # duplicates
    idx = idx.to(_DEV)
    ref = reference.weighted_features(w, f, idx)
    assert_close(ops.weighted_features(w, f, idx, backend="triton"), ref, 1e-12, "fp64")
    out = ops.weighted_features(w.float(), f.float(), idx.int(), backend="triton")
    assert out.dtype == torch.float32 and out.shape == (B, N, W, C)
    assert_close(out, ref, 1e-4, "fp32")
