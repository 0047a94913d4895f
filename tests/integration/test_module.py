"""The AFF-compatible module: parameters, checkpoints, edge cases, dropout, training."""

from __future__ import annotations

import warnings

import pytest
import torch

from cluster import testing
from cluster.nn import ClusterAttention
from cluster.testing import CONFIGS

AFF_PARAMS = {
    "q.weight": lambda c, h: (c, c), "q.bias": lambda c, h: (c,),
    "kv.weight": lambda c, h: (2 * c, c), "kv.bias": lambda c, h: (2 * c,),
    "blank_k": lambda c, h: (c,), "blank_v": lambda c, h: (c,),
    "pos_embed.weight": lambda c, h: (h, 5), "pos_embed.bias": lambda c, h: (h,),
    "proj.weight": lambda c, h: (c, c), "proj.bias": lambda c, h: (c,),
}


def _layer_inputs(cfg, seed=0, **recipe):
    x = testing.make_inputs(cfg, seed=seed, **recipe)
    nb = x.extras["neighborhoods"]
    feat = torch.randn(cfg.B, cfg.N, cfg.C, generator=torch.Generator().manual_seed(seed + 1))
    return feat, x.member_idx, x.mask, nb.pe_idx, x.extras["R"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_parameter_names_and_shapes(cfg):
    m = ClusterAttention(cfg.C, cfg.H)
    shapes = {n: tuple(t.shape) for n, t in m.state_dict().items()}
    assert shapes == {n: f(cfg.C, cfg.H) for n, f in AFF_PARAMS.items()}


def test_state_dict_round_trip():
    """An AFF checkpoint (same keys) loads strictly and reproduces the outputs."""
    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    a = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R).eval()
    aff_ckpt = {k: v.clone() for k, v in a.state_dict().items()}  # what AFF would save
    b = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R).eval()
    missing = b.load_state_dict(aff_ckpt, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    torch.testing.assert_close(a(feat, idx, mask, pe_idx, False), b(feat, idx, mask, pe_idx, False),
                               atol=0, rtol=0)


def test_relative_position_table_not_in_state_dict():
    assert "pre_table" not in ClusterAttention(8, 2).state_dict()


def test_local_equals_op():
    cfg = CONFIGS[1]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    m = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R, backend="reference").eval()
    out = m(feat, idx, mask, pe_idx, False)
    assert out.shape == feat.shape
    # the same with the op called by hand
    B, N, C = feat.shape
    H, D = cfg.H, cfg.C // cfg.H
    q = m.q(feat).view(B, N, H, D).permute(0, 2, 1, 3)
    kv = m.kv(feat).view(B, N, H, 2, D).permute(3, 0, 2, 1, 4)
    from cluster import ops
    o = ops.cluster_attention(q, kv[0], kv[1], idx, pe_table=m.pos_embed(m.pre_table),
                              pe_idx=pe_idx, mask=mask, blank_k=m.blank_k.view(H, D),
                              blank_v=m.blank_v.view(H, D), backend="reference")
    expect = m.proj(o.permute(0, 2, 1, 3).reshape(B, N, C))
    torch.testing.assert_close(out, expect)


def test_global_mode_matches_reference():
    """Global attention (all tokens + blank) via SDPA equals the dense reference."""
    from cluster import reference

    cfg = CONFIGS[0]
    feat, _, _, _, R = _layer_inputs(cfg)
    feat = feat.double()
    m = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R).double().eval()
    B, N, C = feat.shape
    H, D = cfg.H, C // cfg.H
    pe_idx = torch.randint(0, m.pre_table.shape[0], (B, N, N), generator=torch.Generator().manual_seed(1))
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[:, -5:] = False
    cmask = key_mask[:, None, :].expand(B, N, N)
    out = m(feat, None, cmask, pe_idx, True)
    q = m.q(feat).view(B, N, H, D).permute(0, 2, 1, 3)
    kv = m.kv(feat).view(B, N, H, 2, D).permute(3, 0, 2, 1, 4)
    bias = m.pos_embed(m.pre_table)[pe_idx].permute(0, 3, 1, 2)
    o = reference.global_attention(q, kv[0], kv[1], bias, key_mask, m.blank_k.view(H, D),
                                   m.blank_v.view(H, D))
    expect = m.proj(o.permute(0, 2, 1, 3).reshape(B, N, C))
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=1e-10)


def test_global_mode_bad_pe_idx():
    m = ClusterAttention(8, 2)
    with pytest.raises(ValueError, match="pe_idx"):
        m(torch.randn(1, 40, 8), None, None, torch.zeros(1, 40, 5, dtype=torch.long), True)


def test_empty_batch():
    m = ClusterAttention(8, 2, backend="reference")
    feat = torch.randn(0, 40, 8, requires_grad=True)
    idx = torch.zeros(0, 40, 8, dtype=torch.long)
    out = m(feat, idx, None, torch.zeros_like(idx), False)
    assert out.shape == (0, 40, 8)
    out.sum().backward()
    assert feat.grad.shape == feat.shape


def test_single_token_and_m1():
    m = ClusterAttention(8, 2, backend="reference")
    feat = torch.randn(2, 1, 8)
    idx = torch.zeros(2, 1, 1, dtype=torch.long)
    out = m(feat, idx, None, torch.full_like(idx, m.pre_table.shape[0] // 2), False)
    assert out.shape == (2, 1, 8) and torch.isfinite(out).all()


def test_n_not_multiple_of_cluster_size():
    cfg = testing.Config("n61", B=2, N=61, C=16, H=2, M=16, ragged=True)
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg, mask=False)
    # the last cluster is padded: its missing members are masked out
    assert not mask.all()
    m = ClusterAttention(16, 2, rel_pos_width=R)
    out = m(feat, idx, mask, pe_idx, False)
    assert out.shape == feat.shape and torch.isfinite(out).all()


def test_dropout_identity_in_eval():
    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    torch.manual_seed(0)
    m = ClusterAttention(cfg.C, cfg.H, attn_drop=0.5, proj_drop=0.5, rel_pos_width=R)
    torch.manual_seed(0)
    plain = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R)
    m.eval()
    plain.eval()
    torch.testing.assert_close(m(feat, idx, mask, pe_idx, False), plain(feat, idx, mask, pe_idx, False))


def test_proj_dropout_reproducible_in_train():
    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    m = ClusterAttention(cfg.C, cfg.H, proj_drop=0.3, rel_pos_width=R).train()
    torch.manual_seed(42)
    a = m(feat, idx, mask, pe_idx, False)
    torch.manual_seed(42)
    b = m(feat, idx, mask, pe_idx, False)
    torch.manual_seed(43)
    c = m(feat, idx, mask, pe_idx, False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    assert (a == 0).float().mean() > 0.1  # dropout really dropped


def test_attn_dropout_in_train_warns_and_drops():
    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    m = ClusterAttention(cfg.C, cfg.H, attn_drop=0.5, rel_pos_width=R).train()
    with pytest.warns(RuntimeWarning, match="attn_drop"):
        a = m(feat, idx, mask, pe_idx, False)
    m.eval()
    assert not torch.allclose(a, m(feat, idx, mask, pe_idx, False))


def test_gradient_reaches_every_parameter():
    cfg = CONFIGS[1]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    m = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R)
    m(feat, idx, mask, pe_idx, False).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_stacked_blocks_learn():
    """Three residual blocks fit a fixed random target on a tiny task: the loss goes down."""
    cfg = testing.Config("learn", B=4, N=64, C=16, H=2, M=16, ragged=True)
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(ClusterAttention(16, 2, rel_pos_width=R) for _ in range(3))
    norms = torch.nn.ModuleList(torch.nn.LayerNorm(16) for _ in range(3))
    target = torch.randn(feat.shape, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.Adam([*blocks.parameters(), *norms.parameters()], lr=3e-3)
    losses = []
    for _ in range(40):
        x = feat
        for blk, nrm in zip(blocks, norms):
            x = x + blk(nrm(x), idx, mask, pe_idx, False)
        loss = torch.nn.functional.mse_loss(x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses[::10]


def test_import_paths_and_fallback_warning():
    """AFF-MAE's two import paths exist; each falls back to the reference with a warning."""
    from cluster import ops
    from cluster.archive.aff import ClusterAttention as Old
    from cluster.cluster_attn import ClusterAttention as New

    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    for cls, backend in ((New, "triton"), (Old, "cuda")):
        m = cls(cfg.C, cfg.H, rel_pos_width=R)
        assert m.backend == backend
        if ops.backend_unavailable_reason(backend, feat.device, feat.dtype) is None:
            continue
        with pytest.warns(RuntimeWarning, match="reference"):
            out = m(feat, idx, mask, pe_idx, False)
        assert out.shape == feat.shape
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only once per module
            m(feat, idx, mask, pe_idx, False)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_heads"):
        ClusterAttention(10, 3)
    with pytest.raises(ValueError, match="backend"):
        ClusterAttention(8, 2, backend="fast")


def test_feat_shape_error():
    m = ClusterAttention(8, 2)
    with pytest.raises(ValueError, match="feat"):
        m(torch.randn(1, 40, 9), torch.zeros(1, 40, 8, dtype=torch.long), None,
          torch.zeros(1, 40, 8, dtype=torch.long), False)


def test_default_rel_pos_width_aff_and_affmae():
    """cluster.ClusterAttention keeps AFF's table (R=55); AFF-MAE's two paths take 511."""
    from cluster.archive.aff import ClusterAttention as Old
    from cluster.cluster_attn import ClusterAttention as New

    assert ClusterAttention(8, 2).rel_pos_width == 55
    assert New(dim=8, num_heads=2).rel_pos_width == Old(dim=8, num_heads=2).rel_pos_width == 511
    assert New(8, 2, rel_pos_width=7).pre_table.shape == (225, 5)


def test_needed_rel_pos_width_is_smallest_table():
    from cluster.nn import needed_rel_pos_width

    for top in list(range(0, 300)) + [12320, 12321, 1046528, 1046529]:
        brute = next(r for r in range(600) if (2 * r + 1) ** 2 > top)
        assert needed_rel_pos_width(top) == brute, top


def test_bias_table_float32_under_autocast_without_copy():
    """Under autocast the [T, 5] table goes to pos_embed as the buffer itself (no per-step
    cast or copy) and the [T, H] bias reaches the op in float32, beside bfloat16 q."""
    from cluster import ops

    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    m = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R, backend="reference")
    inputs, seen = [], {}
    m.pos_embed.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    real = ops.cluster_attention

    def spy(q, k, v, member_idx, **kw):
        seen.update(q=q.dtype, pe_table=kw["pe_table"].dtype)
        return real(q, k, v, member_idx, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(ops, "cluster_attention", spy)
    try:
        for x in (feat, feat.bfloat16()):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x, idx, mask, pe_idx, False)
            assert out.dtype == torch.bfloat16
            assert seen == {"q": torch.bfloat16, "pe_table": torch.float32}
            assert inputs[-1] is m.pre_table
    finally:
        mp.undo()
    # without autocast a float64 module still computes its table in float64
    m64 = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R).double()
    assert m64._bias_table(feat.double()).dtype == torch.float64


@pytest.mark.parametrize("where", ["local", "attn_drop", "global"])
def test_out_of_range_pe_idx_names_rel_pos_width(where):
    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    m = ClusterAttention(cfg.C, cfg.H, attn_drop=0.5 if where == "attn_drop" else 0.0,
                         backend="reference")  # R = 55: T = 12321
    if where == "global":
        pe_idx = torch.zeros(cfg.B, cfg.N, cfg.N, dtype=torch.long)
    bad = pe_idx.clone()
    bad.view(-1)[3] = 12321  # row 12321 = 111^2 needs R = 56
    ctx = pytest.warns(RuntimeWarning, match="attn_drop") if where == "attn_drop" else warnings.catch_warnings()
    with ctx, pytest.raises(IndexError) as info:
        m(feat, idx, mask, bad, where == "global")
    msg = str(info.value)
    for part in ("pe_idx:", "rel_pos_width R=55", "T=(2R+1)^2=12321", "rel_pos_width >= 56"):
        assert part in msg, (part, msg)
    bad.view(-1)[3] = -2
    with pytest.raises(IndexError, match="negative"):
        m.eval()(feat, idx, mask, bad, where == "global")


def test_member_idx_error_passes_through():
    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    m = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R, backend="reference")
    bad = idx.clone()
    bad[0, 0, 0] = cfg.N
    with pytest.raises(IndexError, match=r"^member_idx: values must lie in \[0, N\)"):
        m(feat, bad, mask, pe_idx, False)


def test_check_indices_false_reaches_the_op():
    """check_indices=False skips the op's range check (its one device sync)."""
    from cluster import ops

    cfg = CONFIGS[0]
    feat, idx, mask, pe_idx, R = _layer_inputs(cfg)
    seen = []
    real = ops.cluster_attention

    def spy(*a, **kw):
        seen.append(kw["check_indices"])
        return real(*a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(ops, "cluster_attention", spy)
    try:
        for flag in (True, False):
            m = ClusterAttention(cfg.C, cfg.H, rel_pos_width=R, backend="reference", check_indices=flag)
            m(feat, idx, mask, pe_idx, False)
    finally:
        mp.undo()
    assert seen == [True, False]
