"""The union map and the union kernels (cluster.triton_kernels.union): AFF's per-token lists
of whole clusters, forward and backward, against a plain-Python map and the float64
reference, with groups the map leaves to the other kernels in the same batch.
"""

from __future__ import annotations

import pytest
import torch

from cluster import reference, testing
from cluster.testing import random_case as make_case

from .. import _triton

_DEV, _WHY = _triton.DEV, _triton.WHY
pytestmark = _triton.PYTESTMARK

if _WHY is None:
    from cluster import ops
    from cluster.triton_kernels import tuning, union

PARAMS = ("q", "k", "v", "pe_table", "blank_k", "blank_v")
KWARGS = ("pe_table", "pe_idx", "mask", "blank_k", "blank_v")


def python_map(idx, valid, N, ucap, old_group=False):
    """(uinfo [B][G], {(b, g): (clusters, slots)}) as the docstring of union.py defines them."""
    B, _, M = idx.shape
    G, J = -(-N // 8), M // 8
    info, entries = [], {}
    for b in range(B):
        row = []
        for g in range(G):
            keys, slots, broken, stray = [], {}, False, False
            for r in range(8):
                q = g * 8 + r
                if q >= N:
                    continue
                lead = g * 8
                if r > 0 and all(
                        (valid is None or valid[b, lead, s]) and idx[b, q, s] == idx[b, lead, s]
                        for s in range(M) if valid is None or valid[b, q, s]):
                    # It follows the lead (its valid slots name what the lead's valid slots
                    # name): the lead's blocks, whatever it masks of them.
                    for key in slots:
                        slots[key][r] = slots[key][0]
                    continue
                seen = {}
                for c in range(J):
                    live = [(t, int(idx[b, q, 8 * c + t])) for t in range(8)
                            if valid is None or valid[b, q, 8 * c + t]]
                    stray |= any(i != int(idx[b, g * 8, 8 * c + t]) for t, i in live)
                    if not live:
                        continue
                    bases = {i - t for t, i in live}
                    base = bases.pop()
                    if bases or base % 8 or any(not 0 <= i < N for _, i in live):
                        broken = True
                        continue
                    occ = seen.get(base // 8, 0)
                    seen[base // 8] = occ + 1
                    key = (base // 8, occ)
                    if key not in slots:
                        keys.append(key)
                        slots[key] = [-1] * 8
                    slots[key][r] = c
            whole = not broken and len(keys) <= ucap
            row.append(-2 if (old_group and not stray) else len(keys) if whole else -1)
            if whole:
                entries[b, g] = ([k[0] for k in keys], [slots[k] for k in keys])
        info.append(row)
    return info, entries


def assert_map(idx, valid, N, old_group=False):
    m = union._union_map(idx.to(_DEV), None if valid is None else valid.to(_DEV).view(torch.uint8),
                         old_group)
    info, entries = python_map(idx, valid, N, m.ucap, old_group)
    assert m.uinfo.tolist() == info
    for (b, g), (clusters, slots) in entries.items():
        n = len(clusters)
        assert m.uc[b, g, :n].tolist() == clusters, (b, g)
        assert m.slot[b, g, :n].tolist() == slots, (b, g)
        assert m.uc[b, g, n:].eq(-1).all() and m.slot[b, g, n:].eq(-1).all(), (b, g)
    return m


def test_map_of_aff_lists():
    inp = testing.make_inputs(testing.Config("t", B=2, N=61, C=24, H=2, M=24), seed=5)
    m = assert_map(inp.member_idx, inp.mask, 61)
    assert m.uinfo.ge(0).all(), "AFF's lists: every group in the map"
    assert int(m.uinfo.max()) > 3, "AFF's per-token lists: unions larger than one query's list"


@pytest.mark.parametrize("case", ["per_token", "duplicates", "broken", "shared", "follows",
                                  "over_cap"])
def test_map_matches_python(case):
    B, N, M = 2, 45, 32
    g = torch.Generator().manual_seed(7)
    idx, valid = testing.per_token_cluster_idx(B, N, M, group=8, pool=6, generator=g)
    old_group = False
    cap = {}
    if case == "duplicates":
        # Query 3 names its first cluster again in block 2; query 12 names one twice.
        idx[0, 3, 16:24] = idx[0, 3, 0:8]
        idx[1, 12, 8:16] = idx[1, 12, 0:8]
    elif case == "broken":
        idx[0, 9, 5] = (idx[0, 9, 5] + 1) % N  # a block straddling two clusters
        idx[1, 17, 8:16] = idx[1, 17, 8:16].flip(0)  # a cluster out of order
        idx[1, 30, 0] = 10 * N  # out of range
        valid[1, 33, 3] = False
        idx[1, 33, 3] = 10 * N  # out of range but masked: still in the map
    elif case == "shared":
        idx[:, 8:16] = idx[:, 8:9]
        valid[:, 8:16] = valid[:, 8:9]
        old_group = True
    elif case == "follows":
        # Group 1 shares one list naming cluster 0 twice (blocks 0 and 2) and cluster 2 in
        # block 1, which the lead masks: query 10 masks the first use whole and still
        # follows the lead, query 11 has block 1 valid, so it merges on its own. Group 3
        # shares query 24's list but query 27 names other clusters.
        idx[:, 8:16] = idx[:, 8:9]
        valid[:, 8:16] = valid[:, 8:9]
        for blk, cl in ((0, 0), (1, 2), (2, 0)):
            idx[:, 8:16, 8 * blk:8 * blk + 8] = torch.arange(8 * cl, 8 * cl + 8)
            valid[:, 8:16, 8 * blk:8 * blk + 8] = blk != 1
        valid[:, 11, 8:16] = True
        valid[:, 10, 0:8] = False
        idx[:, 24:32] = idx[:, 24:25]
        valid[:, 24:32] = valid[:, 24:25]
        idx[:, 27, 8:16] = idx[:, 40, 0:8]
    elif case == "over_cap":
        # Unions of 5 or 6 clusters past a cap of 4, but group 0's (one list) within it.
        idx[:, 0:8] = idx[:, 0:1]
        valid[:, 0:8] = valid[:, 0:1]
        cap = dict(UNION_CAP=4)
    with tuning.override(**cap):
        m = assert_map(idx, valid, N, old_group)
    if case == "broken":
        assert m.uinfo[0, 1] == -1 and m.uinfo[1, 2] == -1 and m.uinfo[1, 3] == -1
        assert m.uinfo[1, 4] >= 0
    if case == "shared":
        assert m.uinfo[:, 1].eq(-2).all() and m.uinfo[:, 0].ne(-2).all()
    if case == "over_cap":
        assert m.uinfo.eq(-1).any() and m.uinfo.ge(0).any()
    if case == "follows":
        # Query 10 names entry 0 (cluster 0's first use) through the lead's block 0, which
        # it masks; merged on its own it would name it through block 2. Query 11 names
        # cluster 2, which the lead's valid slots do not.
        assert m.uc[:, 1, 0].eq(0).all() and m.slot[:, 1, 0, 2].eq(0).all()
        assert all(2 in m.uc[b, 1, :int(m.uinfo[b, 1])].tolist() for b in range(B))
        assert m.uinfo[:, 1].ge(0).all() and m.uinfo[:, 3].ge(0).all()


def _leaves(case, dtype):
    pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out = dict(case)
    for n in PARAMS:
        if case[n] is not None:
            x = case[n].to(_DEV, dtype if n in ("q", "k", "v") else pd)
            out[n] = x.detach().clone().requires_grad_()
    for n in ("member_idx", "pe_idx", "mask"):
        if case[n] is not None:
            out[n] = case[n].to(_DEV)
    return out


def _fwd_bwd(case, dtype, backend, dout, deterministic=False):
    c = _leaves(case, dtype)
    kw = {n: c[n] for n in KWARGS}
    if backend == "reference":
        out = reference.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw)
    else:
        out = ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw,
                                    backend="triton", deterministic=deterministic)
    out.backward(dout.to(out.dtype))
    return out, {n: c[n].grad for n in PARAMS if c[n] is not None}


def _mixed_case(seed, **flags):
    # Per-token lists with one group of each kind beside them in batch 0: a query naming a
    # cluster twice (in the map, two entries), a straddling block (the per-query kernels),
    # and batch 1 all in the map, so the key side takes the group-level map there.
    case = make_case(2, 2, 45, 12, 32, seed=seed, per_token_pool=6, **flags)
    idx = case["member_idx"].clone()
    idx[0, 3, 16:24] = idx[0, 3, 0:8]
    idx[0, 9, 5] = (idx[0, 9, 5] + 1) % 45
    # Batch 1's group 2 shares one list naming cluster 1 twice (blocks 0 and 2) and cluster
    # 3 in block 1, which the lead masks: query 18 masks the first use (it takes the lead's
    # entries), query 19 has block 1 valid (it merges its own).
    idx[1, 16:24] = idx[1, 16:17]
    for blk, cl in ((0, 1), (1, 3), (2, 1)):
        idx[1, 16:24, 8 * blk:8 * blk + 8] = torch.arange(8 * cl, 8 * cl + 8)
    case["member_idx"] = idx
    if case["mask"] is not None:
        case["mask"][0, 9, 5] = True
        case["mask"][1, 16:24] = case["mask"][1, 16:17]
        case["mask"][1, 16:24, 0:24] = True
        case["mask"][1, 16:24, 8:16] = False
        case["mask"][1, 19, 8:16] = True
        case["mask"][1, 18, 0:8] = False
    return case


def _check(case, dtype, tol, deterministic, cap=None):
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(case["q"].shape, generator=g, dtype=torch.float64).to(_DEV)
    ref_out, ref_g = _fwd_bwd(case, torch.float64, "reference", dout)
    with tuning.override(**(cap or {})):
        out, grads = _fwd_bwd(case, dtype, "triton", dout, deterministic)
    for name, x, want in [("out", out, ref_out)] + [(f"d{n}", grads[n], ref_g[n]) for n in ref_g]:
        err = (x.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= tol * max(1.0, scale), f"{name}: max abs err {err:.3e} (scale {scale:.2e})"


FLAGS = [dict(pe=True, mask=True, blank=True), dict(pe=False, mask=False, blank=False),
         dict(pe=True, mask=True, blank=False, empty_rows=True)]


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("flags,deterministic", [(FLAGS[0], False), (FLAGS[0], True),
                                                 (FLAGS[1], False), (FLAGS[2], True)],
                         ids=["pe_mask_blank-fast", "pe_mask_blank-det", "plain-fast",
                              "empty_rows-det"])
def test_union_kernels_fp32(flags, deterministic):
    case = _mixed_case(41, **flags)
    m = union._union_map(case["member_idx"].to(_DEV),
                         None if case["mask"] is None else case["mask"].to(_DEV).view(torch.uint8),
                         False)
    assert m.uinfo[0, 1] == -1 and m.uinfo[0, 0] >= 0 and m.uinfo[1].ge(0).all()
    _check(case, torch.float32, 2e-5, deterministic)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_union_kernels_over_cap(deterministic):
    # UNION_CAP 4: groups whose union is larger go to the per-query kernels, the rest stay.
    case = make_case(2, 2, 45, 12, 24, seed=43, per_token_pool=6)
    case["member_idx"][:, 8:16] = case["member_idx"][:, 8:9].clone()
    case["mask"][:, 8:16] = case["mask"][:, 8:9].clone()
    _check(case, torch.float32, 2e-5, deterministic, cap=dict(UNION_CAP=4))


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("chunk", [2, 8])
def test_union_kernels_chunks(chunk):
    # Unions of up to 6 entries in chunks of 2 and 8: several chunks or one a group.
    case = _mixed_case(44)
    _check(case, torch.float32, 2e-5, False, cap=dict(UNION_CHUNK=chunk))


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_union_kernels_low_precision(dtype):
    # 16-bit operands and outputs: errors of a few 2^-8 of the largest value.
    case = _mixed_case(45)
    _check(case, dtype, 4e-2, False)


@pytest.mark.usefixtures("group_kernels_on")
def test_union_kernels_aff_lists_fp64():
    # AFF's own lists (make_inputs), float64 through the union kernels: exact to rounding.
    inp = testing.make_inputs(testing.Config("t", B=2, N=45, C=24, H=2, M=24), seed=6)
    case = dict(q=inp.q, k=inp.k, v=inp.v, member_idx=inp.member_idx, pe_table=inp.pe_table,
                pe_idx=inp.pe_idx, mask=inp.mask, blank_k=inp.blank_k, blank_v=inp.blank_v)
    _check(case, torch.float64, 1e-12, True)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_union_kernels_gradcheck_fp64(deterministic):
    # gradcheck also runs the backward twice and compares: the fast mode's float atomics
    # (d_pe_table, and dk / dv of the batches with a token-level map) vary in the last bit
    # on a GPU, so it gets a tolerance far below the check's own; the deterministic mode none.
    case = make_case(1, 2, 21, 5, 16, seed=47, T=3, per_token_pool=3)
    c = _leaves(case, torch.float64)
    names = [n for n in PARAMS if c[n] is not None]

    def f(*xs):
        kw = dict(zip(names, xs))
        return ops.cluster_attention(kw["q"], kw["k"], kw["v"], c["member_idx"],
                                     pe_table=kw["pe_table"], pe_idx=c["pe_idx"], mask=c["mask"],
                                     blank_k=kw["blank_k"], blank_v=kw["blank_v"],
                                     backend="triton", deterministic=deterministic)

    nondet = 0.0 if deterministic or c["q"].device.type != "cuda" else 1e-12
    assert torch.autograd.gradcheck(f, tuple(c[n] for n in names), eps=1e-6, atol=1e-7,
                                    fast_mode=True, nondet_tol=nondet)


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_map_built_once_a_step(monkeypatch, deterministic):
    # With the union forward on, the forward builds the backward's map and the backward
    # takes it; a forward under no_grad builds none (nothing would read it after).
    calls = []
    real = union._union_map
    monkeypatch.setattr(union, "_union_map", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    c = _leaves(_mixed_case(48), torch.float32)
    kw = {n: c[n] for n in KWARGS}
    with torch.no_grad():
        ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw, backend="triton",
                              deterministic=deterministic)
    assert calls == []
    out = ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], **kw, backend="triton",
                                deterministic=deterministic)
    assert len(calls) == 1, "the forward builds the map"
    out.sum().backward()
    assert len(calls) == 1, "the backward takes the forward's map"
    assert c["k"].grad.abs().sum() > 0


def _module_views(case, dtype):
    # AFF's module layout: q a [B, N, H, D] buffer seen as [B, H, N, D], k and v the two
    # halves of one [B, N, H, 2, D] (nn.ClusterAttention's unbind).
    q = case["q"].to(_DEV, dtype).permute(0, 2, 1, 3).contiguous().requires_grad_()
    kv = torch.stack([case["k"], case["v"]], -2).to(_DEV, dtype).permute(0, 2, 1, 3, 4)
    kv = kv.contiguous().requires_grad_()
    k, v = (t.permute(0, 2, 1, 3) for t in kv.unbind(3))
    return q, kv, q.permute(0, 2, 1, 3), k, v


@pytest.mark.parametrize("kind", ["union", "per_query", "shared_group"])
def test_module_layout_in_every_kernel(kind):
    # out and dq come back in q's layout (no copy for the module's reshape and projection),
    # and every kernel that writes them addresses that layout: values against float64.
    case = (make_case(2, 2, 45, 12, 24, seed=50, group=8) if kind == "shared_group"
            else _mixed_case(49))
    if kind == "per_query":
        ctx = tuning.override(TUNING_UNION={key: None for key in tuning.TUNING_UNION})
    else:
        ctx = tuning.override(
            TUNING_GROUP={key: warps or 2 for key, warps in tuning.TUNING_GROUP.items()},
            TUNING_UNION={key: warps or 1 for key, warps in tuning.TUNING_UNION.items()})
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(case["q"].shape, generator=g, dtype=torch.float64).to(_DEV)
    ref_out, ref_g = _fwd_bwd(case, torch.float64, "reference", dout)
    c = _leaves(case, torch.float32)
    qb, kvb, q, k, v = _module_views(case, torch.float32)
    seen, seen_kv = [], []
    q.register_hook(lambda grad: seen.append(grad.stride()))
    for t in (k, v):
        t.register_hook(lambda grad: seen_kv.append(grad.stride()))
    with ctx:
        out = ops.cluster_attention(q, k, v, c["member_idx"], **{n: c[n] for n in KWARGS},
                                    backend="triton")
        assert out.stride() == q.stride(), "out in q's layout"
        out.backward(dout.to(out.dtype).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3))
    assert seen == [q.stride()], "dq in q's layout"
    B, H, N, D = q.shape
    # dk and dv dense in k's order of dims ([B, N, H, D] in memory), not k's own strides
    assert seen_kv == [(N * H * D, D, H * D, 1)] * 2, "dk and dv in k's layout"
    got = {"out": out, "dq": qb.grad.permute(0, 2, 1, 3), "dk": kvb.grad[..., 0, :].permute(0, 2, 1, 3),
           "dv": kvb.grad[..., 1, :].permute(0, 2, 1, 3)}
    want = {"out": ref_out, "dq": ref_g["q"], "dk": ref_g["k"], "dv": ref_g["v"]}
    for name in got:
        err = (got[name].double() - want[name]).abs().max().item()
        assert err <= 2e-5 * max(1.0, want[name].abs().max().item()), f"{name}: {err:.3e}"


@pytest.mark.usefixtures("group_kernels_on")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_token_map_only_where_flagged(monkeypatch, deterministic):
    # The key side builds the token-level reverse map (a [B, N * M] buffer) only where the
    # group-level map flags a batch: never on AFF's lists, and for _mixed_case's batch 0
    # (a straddling block) yes, with the gradients right either way.
    from cluster.triton_kernels import backward
    calls = []
    for name in ("_reverse_map_counting", "_reverse_map_stable"):
        real = getattr(backward, name)
        monkeypatch.setattr(backward, name,
                            lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    inp = testing.make_inputs(testing.Config("t", B=2, N=45, C=24, H=2, M=24), seed=8)
    aff = dict(q=inp.q, k=inp.k, v=inp.v, member_idx=inp.member_idx, pe_table=inp.pe_table,
               pe_idx=inp.pe_idx, mask=inp.mask, blank_k=inp.blank_k, blank_v=inp.blank_v)
    _check(aff, torch.float32, 2e-5, deterministic)
    assert calls == [], "AFF's lists: no token-level map"
    _check(_mixed_case(51), torch.float32, 2e-5, deterministic)
    assert calls == [1], "a flagged batch: the token-level map"
