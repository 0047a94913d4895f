"""Documented behaviours pinned against independent computations (issue 32).

a. build_neighborhoods on padded clusters (N not a multiple of the cluster size): cluster
   means over the real tokens only, and each token's nearest clusters, against a
   brute-force float64 numpy computation written here.
b. ClusterAttention's dropout: identity in eval (local and global mode); in training the
   local path drops the attention weights *blank included* (reference.cluster_attention's
   documented semantics), checked against a hand-written computation with a fixed seed.
c. Parameter dtypes beside activations in ops.check_inputs / ops.cluster_attention: a
   parameter in q's dtype or float32 is accepted, every other mix is a TypeError naming
   the argument.
d. deterministic=None resolves to torch.are_deterministic_algorithms_enabled(): what the
   backend's entry point receives is recorded.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster import neighbors as nbr
from cluster import ops, testing
from cluster.nn import ClusterAttention

# --------------------------------------------------------------------------- a. neighbourhoods


def _brute_force(pos_s: np.ndarray, cs: int, nnc: int, lists: str):
    """Means over real tokens, nearest cluster ids (ties: lower id), member_idx and mask,
    all from plain float64 numpy on the reordered positions."""
    B, N, _ = pos_s.shape
    NC = -(-N // cs)
    means = np.stack([pos_s[:, c * cs:min(N, (c + 1) * cs)].mean(axis=1) for c in range(NC)],
                     axis=1)  # [B, NC, 2]
    M = nnc * cs
    member = np.empty((B, N, M), dtype=np.int64)
    valid = np.empty((B, N, M), dtype=bool)
    nearest = np.empty((B, N if lists == "aff" else NC, nnc), dtype=np.int64)
    for b in range(B):
        if lists == "aff":
            d = ((pos_s[b, :, None, :] - means[b, None, :, :]) ** 2).sum(-1)  # [N, NC]
            nearest[b] = np.argsort(d, axis=1, kind="stable")[:, :nnc]
            per_token = nearest[b]
        else:
            d = ((means[b, :, None, :] - means[b, None, :, :]) ** 2).sum(-1)  # [NC, NC]
            order = np.argsort(d, axis=1, kind="stable")
            for c in range(NC):  # itself first, then the nearest others
                rest = [x for x in order[c] if x != c]
                nearest[b, c] = [c] + rest[:nnc - 1]
            per_token = nearest[b][np.arange(N) // cs]
        tok = per_token[:, :, None] * cs + np.arange(cs)  # [N, nnc, cs]
        tok = tok.reshape(N, M)
        valid[b] = tok < N
        member[b] = np.minimum(tok, N - 1)
    return means, nearest, member, valid


# jittered positions (grid=False): no equidistant clusters, so the ranking is unique
PADDED = [
    pytest.param(57, 8, 16, 8, 8, id="n57_cs8_one_real_token_in_last"),
    pytest.param(61, 8, 24, 8, 8, id="n61_cs8"),
    pytest.param(45, 4, 12, 7, 7, id="n45_cs4"),
    pytest.param(99, 8, 32, 10, 10, id="n99_cs8_three_real_tokens_in_last"),
]


@pytest.mark.parametrize("lists", nbr.LISTS)
@pytest.mark.parametrize("N,cs,nbhd,h,w", PADDED)
def test_padded_clusters_match_brute_force(N, cs, nbhd, h, w, lists):
    assert N % cs != 0
    pos = nbr.make_synthetic_positions(4, N, h, w, seed=N + cs, grid=False)
    nb = nbr.build_neighborhoods(pos, cs, nbhd, h, w, knn_method="torch", lists=lists)
    assert torch.equal(nb.pos, pos.gather(1, nb.order[..., None].expand(-1, -1, 2)))
    ps = nb.pos.double().numpy()
    _, nearest, member, valid = _brute_force(ps, cs, nbhd // cs, lists)
    np.testing.assert_array_equal(nb.nearest_clusters.numpy(), nearest)
    np.testing.assert_array_equal(nb.member_idx.numpy(), member)
    np.testing.assert_array_equal(nb.cluster_mask.numpy(), valid)
    # the short cluster's padding slots are exactly the invalid ones, each pointing at N - 1
    assert (nb.member_idx[~nb.cluster_mask] == N - 1).all()


@pytest.mark.parametrize("N,cs,nbhd,h,w", PADDED)
def test_short_cluster_mean_is_over_real_tokens(N, cs, nbhd, h, w):
    """The tokens of the short last cluster list their own cluster first (it is the cluster
    whose real-token mean is nearest to them), which a mean over the padded size (padding
    at the origin, or at the last token) would not give on these positions."""
    pos = nbr.make_synthetic_positions(4, N, h, w, seed=N + cs, grid=False) + 3.0
    nb = nbr.build_neighborhoods(pos, cs, nbhd, h + 3, w + 3, knn_method="torch")
    ps = nb.pos.double().numpy()
    means, nearest, _, _ = _brute_force(ps, cs, nbhd // cs, "aff")
    last = (N - 1) // cs
    real = ps[:, last * cs:]
    np.testing.assert_allclose(means[:, last], real.mean(axis=1), rtol=0, atol=1e-12)
    # a wrong (padded) mean lies elsewhere: the check below can tell them apart
    padded = real.sum(axis=1) / cs
    assert np.abs(padded - means[:, last]).max() > 1.0
    got = nb.nearest_clusters.numpy()
    np.testing.assert_array_equal(got, nearest)
    if N - last * cs == 1:  # a lone real token: its own cluster mean is itself
        assert (got[:, last * cs:, 0] == last).all()


def test_tokens_near_the_short_cluster_on_a_grid():
    """Integer grid (equidistant clusters): the chosen clusters' distances are the nnc
    smallest, in order, and ties go to the lower cluster id."""
    N, cs, nbhd = 61, 8, 32
    pos = nbr.make_synthetic_positions(3, N, 8, 8, seed=11, grid=True)
    nb = nbr.build_neighborhoods(pos, cs, nbhd, 8, 8, knn_method="torch")
    ps = nb.pos.double().numpy()
    means, nearest, _, _ = _brute_force(ps, cs, nbhd // cs, "aff")
    d = ((ps[:, :, None, :] - means[:, None, :, :]) ** 2).sum(-1)  # [B, N, NC]
    got = nb.nearest_clusters.numpy()
    np.testing.assert_allclose(np.take_along_axis(d, got, 2), np.take_along_axis(d, nearest, 2),
                               rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got, nearest)


# --------------------------------------------------------------------------- b. dropout

_CFG = testing.Config("drop", B=2, N=61, C=12, H=3, M=16, ragged=True)


def _inputs(seed=0):
    x = testing.make_inputs(_CFG, seed=seed, mask=True)
    nb = x.extras["neighborhoods"]
    feat = torch.randn(_CFG.B, _CFG.N, _CFG.C, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)
    return feat, x.member_idx, x.mask, nb.pe_idx, x.extras["R"]


def _pair(R, p):
    torch.manual_seed(3)
    m = ClusterAttention(_CFG.C, _CFG.H, attn_drop=p, rel_pos_width=R, backend="reference").double()
    plain = ClusterAttention(_CFG.C, _CFG.H, rel_pos_width=R, backend="reference").double()
    plain.load_state_dict(m.state_dict())
    return m, plain


def _global_inputs(feat, R):
    B, N, _ = feat.shape
    T = (2 * R + 1) ** 2
    g = torch.Generator().manual_seed(5)
    pe_idx = torch.randint(0, T, (B, N, N), generator=g)
    cmask = torch.rand(B, N, N, generator=g) > 0.3
    return pe_idx, cmask


@pytest.mark.parametrize("mode", ["local", "global"])
def test_attn_dropout_is_identity_in_eval(mode):
    feat, idx, mask, pe_idx, R = _inputs()
    m, plain = _pair(R, 0.5)
    m.eval()
    plain.eval()
    if mode == "global":
        pe_idx, mask = _global_inputs(feat, R)
        idx = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval never takes the warned training path
        a = m(feat, idx, mask, pe_idx, mode == "global")
        a2 = m(feat, idx, mask, pe_idx, mode == "global")
    b = plain(feat, idx, mask, pe_idx, mode == "global")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)


def test_eval_local_path_calls_the_fused_op(monkeypatch):
    """attn_drop > 0 but eval: the op of the configured backend runs, not the unfused path."""
    feat, idx, mask, pe_idx, R = _inputs()
    m, _ = _pair(R, 0.5)
    m.eval()
    calls = []
    real = ops.cluster_attention
    monkeypatch.setattr(ops, "cluster_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m(feat, idx, mask, pe_idx, False)
    assert calls == [1]
    m.train()
    with pytest.warns(RuntimeWarning, match="attn_drop"):
        m(feat, idx, mask, pe_idx, False)
    assert calls == [1]  # training with attn_drop > 0: the reference path, not the op


def _by_hand(m, feat, idx, mask, pe_idx, p, seed):
    """Local attention with the dropout drawn on the [B, H, N, M + 1] weights (the blank's
    weight the last column), each kept weight scaled by 1 / (1 - p)."""
    B, N, C = feat.shape
    H, D = m.num_heads, C // m.num_heads
    q = m.q(feat).view(B, N, H, D).permute(0, 2, 1, 3)
    kv = m.kv(feat).view(B, N, H, 2, D).permute(3, 0, 2, 1, 4)
    k, v = kv[0], kv[1]
    table = m.pos_embed(m.pre_table.double())  # [T, H]
    bk, bv = m.blank_k.view(H, D), m.blank_v.view(H, D)
    gi = idx.long()
    kg = torch.stack([k[b][:, gi[b]] for b in range(B)])  # [B, H, N, M, D]
    vg = torch.stack([v[b][:, gi[b]] for b in range(B)])
    logits = m.scale * torch.einsum("bhnd,bhnmd->bhnm", q, kg)
    logits = logits + table[pe_idx.long()].permute(0, 3, 1, 2)
    logits = logits.masked_fill(~mask.bool()[:, None], float("-inf"))
    blank = m.scale * torch.einsum("bhnd,hd->bhn", q, bk)[..., None]
    w = torch.softmax(torch.cat([logits, blank], -1), -1)  # [B, H, N, M + 1]
    torch.manual_seed(seed)
    keep = F.dropout(torch.ones_like(w), p, training=True)  # the same draw as nn.Dropout's
    w = w * keep
    out = torch.einsum("bhnm,bhnmd->bhnd", w[..., :-1], vg) + w[..., -1:] * bv[None, :, None, :]
    return m.proj(out.permute(0, 2, 1, 3).reshape(B, N, C)), keep


def test_attn_dropout_in_training_acts_on_weights_blank_included():
    p, seed = 0.4, 1234
    feat, idx, mask, pe_idx, R = _inputs()
    m, _ = _pair(R, p)
    m.train()
    torch.manual_seed(seed)
    with pytest.warns(RuntimeWarning, match="attn_drop"):
        got = m(feat, idx, mask, pe_idx, False)
    want, keep = _by_hand(m, feat, idx, mask, pe_idx, p, seed)
    # the draw does drop blank weights, so a dropout that spares the blank differs
    assert (keep[..., -1] == 0).any() and (keep[..., -1] != 0).any()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # and it is not the eval output
    m.eval()
    assert not torch.allclose(got, m(feat, idx, mask, pe_idx, False))


def test_global_attn_dropout_in_training_is_seeded_and_active():
    feat, _, _, _, R = _inputs()
    pe_idx, cmask = _global_inputs(feat, R)
    m, plain = _pair(R, 0.5)
    m.train()
    plain.train()
    torch.manual_seed(9)
    a = m(feat, None, cmask, pe_idx, True)
    torch.manual_seed(9)
    b = m(feat, None, cmask, pe_idx, True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, plain(feat, None, cmask, pe_idx, True))


# --------------------------------------------------------------------------- c. parameter dtypes

_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
PARAMS = ("pe_table", "blank_k", "blank_v")


def _op_args(act, params):
    c = testing.random_case(1, 2, 40, 8, 6, seed=3)
    args = {n: c[n].to(act) for n in ("q", "k", "v")}
    args.update({n: c[n] for n in ("member_idx", "pe_idx", "mask")})
    for n in PARAMS:
        args[n] = c[n].to(params.get(n, act))
    return args


def _call(fn, a):
    return fn(a["q"], a["k"], a["v"], a["member_idx"], pe_table=a["pe_table"],
              pe_idx=a["pe_idx"], mask=a["mask"], blank_k=a["blank_k"], blank_v=a["blank_v"],
              backend="reference")


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("act", ["fp16", "bf16"])
def test_float32_parameter_beside_16_bit_activations_accepted(act, name):
    for params in ({name: torch.float32}, dict.fromkeys(PARAMS, torch.float32)):
        a = _op_args(_DT[act], params)
        checked = _call(ops.check_inputs, a)
        assert getattr(checked, name).dtype == torch.float32  # passed on, not cast
        out = _call(ops.cluster_attention, a)
        assert out.dtype == _DT[act] and torch.isfinite(out).all()


@pytest.mark.parametrize("act", list(_DT))
def test_parameters_in_the_activations_dtype_accepted(act):
    out = _call(ops.cluster_attention, _op_args(_DT[act], {}))
    assert out.dtype == _DT[act]


# float32 parameters are allowed beside 16-bit activations only: beside float64 ones they
# would be a mix the docs do not allow (its gradient cast down to float32).
REFUSED = [(act, par) for act in ("fp32", "fp16", "bf16") for par in _DT
           if par != act and par != "fp32"] + [("fp64", "fp16"), ("fp64", "bf16"), ("fp64", "fp32")]


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("act,par", REFUSED, ids=[f"{a}-{p}" for a, p in REFUSED])
def test_other_parameter_dtype_mixes_refused_naming_the_argument(act, par, name):
    a = _op_args(_DT[act], {name: _DT[par]})
    also = " or torch.float32" if act in ("fp16", "bf16") else ""
    for fn in (ops.check_inputs, ops.cluster_attention):
        with pytest.raises(TypeError, match=rf"^{name}: expected dtype {_DT[act]} \(that of q\)"
                                            rf"{also}, got {_DT[par]}$"):
            _call(fn, a)


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("act,other", [("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp16"),
                                       ("fp16", "bf16"), ("fp32", "fp64")])
def test_activation_dtype_mixes_refused_naming_the_argument(act, other, name):
    a = _op_args(_DT[act], {})
    a[name] = a[name].to(_DT[other])
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype {_DT[act]} \(that of q\)"):
        _call(ops.check_inputs, a)


# --------------------------------------------------------------------------- d. deterministic


@pytest.fixture
def restore_deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn)


@pytest.fixture
def record_backend(monkeypatch):
    """Replace the reference backend's entry point in cluster.ops by a recorder."""
    seen = []
    real = ops._ReferenceBackend.cluster_attention

    def recorder(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ops._ReferenceBackend, "cluster_attention", staticmethod(recorder))
    return seen


@pytest.mark.parametrize("flag,warn_only", [(True, False), (False, False), (True, True)])
def test_deterministic_none_follows_torch(flag, warn_only, restore_deterministic, record_backend):
    a = _op_args(torch.float32, {})
    torch.use_deterministic_algorithms(flag, warn_only=warn_only)
    _call(ops.cluster_attention, a)
    for explicit in (True, False):
        ops.cluster_attention(a["q"], a["k"], a["v"], a["member_idx"], backend="reference",
                              deterministic=explicit)
    assert record_backend == [flag, True, False]
    assert all(type(x) is bool for x in record_backend)


@pytest.mark.parametrize("flag", [True, False])
def test_module_deterministic_none_follows_torch(flag, restore_deterministic, record_backend):
    feat, idx, mask, pe_idx, R = _inputs()
    m = ClusterAttention(_CFG.C, _CFG.H, rel_pos_width=R, backend="reference").double().eval()
    fixed = ClusterAttention(_CFG.C, _CFG.H, rel_pos_width=R, backend="reference",
                             deterministic=not flag).double().eval()
    torch.use_deterministic_algorithms(flag)
    m(feat, idx, mask, pe_idx, False)
    fixed(feat, idx, mask, pe_idx, False)
    assert record_backend == [flag, not flag]


# --------------------------------------------------------------------------- survivors of nox -s mutants


def test_shared_lists_put_own_cluster_first_among_equal_means():
    """Equal cluster means (here every token in one cell): the kNN's tie-break by lower id
    would rank cluster 0 first for every cluster; the shared lists put each cluster's own
    id first (Neighborhoods.nearest_clusters' documented order), AFF's convention."""
    pos = torch.full((2, 12, 2), 1.5)
    for nbhd in (3, 6, 9):
        nb = nbr.build_neighborhoods(pos, 3, nbhd, 4, 4, knn_method="torch", lists="cluster")
        own = nb.nearest_clusters[:, :, 0]
        assert torch.equal(own, torch.arange(4).expand(2, 4)), nbhd
        _, nearest, member, valid = _brute_force(nb.pos.double().numpy(), 3, nbhd // 3, "cluster")
        np.testing.assert_array_equal(nb.nearest_clusters.numpy(), nearest)
        np.testing.assert_array_equal(nb.member_idx.numpy(), member)


def test_default_scale_is_inverse_sqrt_head_dim():
    a = _op_args(torch.float64, {})
    D = a["q"].shape[-1]
    assert _call(ops.check_inputs, a).scale == D ** -0.5
    out = _call(ops.cluster_attention, a)
    explicit = ops.cluster_attention(a["q"], a["k"], a["v"], a["member_idx"],
                                     pe_table=a["pe_table"], pe_idx=a["pe_idx"], mask=a["mask"],
                                     blank_k=a["blank_k"], blank_v=a["blank_v"],
                                     scale=1.0 / np.sqrt(D), backend="reference")
    torch.testing.assert_close(out, explicit, rtol=1e-12, atol=1e-12)
    doubled = ops.cluster_attention(a["q"], a["k"], a["v"], a["member_idx"], scale=2.0 / np.sqrt(D),
                                    pe_table=a["pe_table"], pe_idx=a["pe_idx"], mask=a["mask"],
                                    blank_k=a["blank_k"], blank_v=a["blank_v"], backend="reference")
    assert not torch.allclose(out, doubled)


def test_integer_mask_nonzero_is_valid_negative_included():
    a = _op_args(torch.float64, {})
    g = torch.Generator().manual_seed(2)
    ints = torch.randint(-3, 3, a["mask"].shape, generator=g)
    assert (ints < 0).any() and (ints == 0).any() and (ints > 0).any()
    want = _call(ops.cluster_attention, dict(a, mask=ints != 0))
    for dt in (torch.int64, torch.int32, torch.int8):
        got = _call(ops.cluster_attention, dict(a, mask=ints.to(dt)))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(_call(ops.check_inputs, dict(a, mask=ints)).mask, ints != 0)


@pytest.mark.parametrize("lists", nbr.LISTS)
def test_make_inputs_builds_the_lists_it_is_asked_for(lists):
    cfg = testing.Config("lists", B=2, N=61, C=8, H=2, M=16, ragged=True)
    x = testing.make_inputs(cfg, seed=5, lists=lists, mask=False)
    nb = x.extras["neighborhoods"]
    assert nb.lists == lists
    pos, h, w = x.extras["pos"], x.extras["h"], x.extras["w"]
    # the same positions, built here: positions are already in cluster order
    again = nbr.build_neighborhoods(pos, cfg.cluster_size, cfg.M, h, w, R=x.extras["R"],
                                    knn_method="torch", lists=lists)
    assert torch.equal(x.member_idx, again.member_idx)
    assert torch.equal(x.mask, again.cluster_mask)
    idx = x.member_idx[:, :56].reshape(2, 7, 8, cfg.M)  # the 7 full clusters
    shared = bool((idx == idx[:, :, :1]).all())
    assert shared == (lists == "cluster")


def test_within_lowp_rule_bound():
    """err(x) <= 2 * err(PyTorch in dtype) + one rounding unit at the reference's size."""
    ref = torch.linspace(-2.0, 2.0, 50, dtype=torch.float64)
    pt = ref + 0.01
    atol = testing.lowp_atol(ref, torch.bfloat16)
    assert atol == torch.finfo(torch.bfloat16).eps * 2.0
    ok, err, bound = testing.within_lowp_rule(ref + 0.015, pt, ref, torch.bfloat16)
    assert ok and bound == pytest.approx(0.02 + atol)
    ok, err, bound = testing.within_lowp_rule(ref + 0.02 + 2 * atol, pt, ref, torch.bfloat16)
    assert not ok and err > bound
    nan = ref.clone()
    nan[3] = float("nan")
    assert not testing.within_lowp_rule(nan, pt, ref, torch.bfloat16)[0]
