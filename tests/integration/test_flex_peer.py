"""The benchmark's FlexAttention peer (benchmarks/flex_peer.py) on the CPU: eager
FlexAttention (forward only: torch has no FlexAttention backward on the CPU) against the
float64 reference, its block mask against create_block_mask's, and its refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import flex_peer  # noqa: E402

from cluster import neighbors, reference  # noqa: E402

CPU = torch.device("cpu")
WHY = flex_peer.unavailable_reason(CPU, mode="fwd")
pytestmark = pytest.mark.skipif(WHY is not None, reason=str(WHY))


def _case(lists="aff", B=2, N=203, H=2, D=16, M=32, R=6, seed=1):
    """N = 203: the last cluster has 3 tokens and 5 masked slots; off-grid positions and a
    small R, so the bias rounds and clamps offsets."""
    h, w = 15, 14
    pos = neighbors.make_synthetic_positions(B, N, h, w, seed=seed, grid=False)
    nb = neighbors.build_neighborhoods(pos, 8, M, h, w, R=R, knn_method="torch", lists=lists)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    T = nb.table_width ** 2
    t = dict(q=randn(B, H, N, D), k=randn(B, H, N, D), v=randn(B, H, N, D), pe=randn(T, H),
             bk=randn(H, D), bv=randn(H, D))
    return nb, t


def _reference(nb, t, scale):
    return reference.cluster_attention(t["q"], t["k"], t["v"], nb.member_idx, t["pe"], nb.pe_idx,
                                       nb.cluster_mask, t["bk"], t["bv"], scale)


@pytest.mark.parametrize("lists", ["aff", "cluster"])
@pytest.mark.parametrize("method", flex_peer.BLOCK_MASK_METHODS)
def test_flex_peer_matches_the_reference(lists, method):
    nb, t = _case(lists)
    assert not bool(nb.cluster_mask.all())  # masked slots of the short last cluster are in play
    scale = 0.3
    want = _reference(nb, t, scale)
    for block_size in (16, 64):
        masks = flex_peer.build_masks(nb.member_idx, nb.cluster_mask, nb.pos, nb.R,
                                      block_size=block_size, method=method)
        got = flex_peer.flex_cluster_attention(t["q"], t["k"], t["v"], masks, pe_table=t["pe"],
                                               blank_k=t["bk"], blank_v=t["bv"], scale=scale,
                                               compiled=False)
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_flex_peer_in_float32():
    nb, t = _case("aff", B=1)
    want = _reference(nb, t, 0.25)
    t32 = {k: v.float() for k, v in t.items()}
    masks = flex_peer.build_masks(nb.member_idx, nb.cluster_mask, nb.pos, nb.R)
    got = flex_peer.flex_cluster_attention(t32["q"], t32["k"], t32["v"], masks, pe_table=t32["pe"],
                                           blank_k=t32["bk"], blank_v=t32["bv"], scale=0.25,
                                           compiled=False)
    assert (got.double() - want).abs().max().item() < 1e-5


def _dense(num, idx, nkb):
    return flex_peer._dense_of(num, idx, nkb)


@pytest.mark.parametrize("block_size", [16, 64])
def test_kv_block_mask_is_create_block_mask(block_size):
    # The block mask built from the clusters' kv blocks is the one create_block_mask
    # computes from the mask_mod over the whole batch: partial and full tiles, both ways.
    from torch.nn.attention.flex_attention import create_block_mask

    nb, _ = _case("aff")
    B, N, _ = nb.member_idx.shape
    masks = flex_peer.build_masks(nb.member_idx, nb.cluster_mask, nb.pos, nb.R,
                                  block_size=block_size)
    mine = masks.block_mask
    theirs = create_block_mask(flex_peer.make_mask_mod(masks.member, N, 8), B, 1, N, N + 1,
                               device="cpu", BLOCK_SIZE=block_size)
    nkb = -(-(N + 1) // block_size)
    for a in ("kv", "full_kv"):
        got = _dense(getattr(mine, a + "_num_blocks"), getattr(mine, a + "_indices"), nkb)
        want = _dense(getattr(theirs, a + "_num_blocks"), getattr(theirs, a + "_indices"), nkb)
        assert torch.equal(got, want), a
    assert torch.equal(mine.q_num_blocks, theirs.q_num_blocks)
    assert torch.equal(mine.full_q_num_blocks, theirs.full_q_num_blocks)
    assert mine.seq_lengths == (N, N + 1)
    if block_size == 16:
        assert masks.full_tiles > 0  # the full-tile count is exercised
    assert 0 < masks.sparsity_pct < 100


def test_mask_mod_admits_the_blank_and_real_cluster_tokens_only():
    nb, _ = _case("aff", B=1)
    N = nb.member_idx.shape[1]
    masks = flex_peer.build_masks(nb.member_idx, nb.cluster_mask, nb.pos, nb.R)
    mask_mod = flex_peer.make_mask_mod(masks.member, N, 8)
    b, h = torch.tensor(0), torch.tensor(0)
    for i in (0, 57, N - 1):
        admitted = {kv for kv in range(N + 1)
                    if bool(mask_mod(b, h, torch.tensor(i), torch.tensor(kv)))}
        valid = set(nb.member_idx[0, i][nb.cluster_mask[0, i]].tolist())
        assert admitted == valid | {N}


def test_duplicate_slots_are_refused():
    nb, t = _case("aff", B=1)
    member, mask = nb.member_idx.clone(), nb.cluster_mask.clone()
    member[0, 10, 8:16] = member[0, 10, 0:8]  # token 10 lists its nearest cluster twice
    mask[0, 10, 8:16] = mask[0, 10, 0:8]
    with pytest.raises(ValueError, match="duplicate slots: token 10 of batch 0"):
        flex_peer.build_masks(member, mask, nb.pos, nb.R)


def test_lists_that_are_not_whole_clusters_are_refused():
    nb, _ = _case("aff", B=1)
    mask = nb.cluster_mask.clone()
    mask[0, 3, 1] = False  # a real token masked out: not what a cluster mask is
    with pytest.raises(ValueError, match="not the tokens of one cluster"):
        flex_peer.build_masks(nb.member_idx, mask, nb.pos, nb.R)
    with pytest.raises(ValueError, match="block_size"):
        flex_peer.build_masks(nb.member_idx, nb.cluster_mask, nb.pos, nb.R, block_size=12)


def test_runner_records_its_block_mask():
    # bench.py's flex row: the masks are built in the first call of a case and reused.
    import types

    nb, t = _case("aff", B=1)
    x = types.SimpleNamespace(q=t["q"], k=t["k"], v=t["v"], member_idx=nb.member_idx,
                              mask=nb.cluster_mask, pos=nb.pos, R=nb.R, pe_table=t["pe"],
                              blank_k=t["bk"], blank_v=t["bv"], scale=0.3)
    runner = flex_peer.FlexRunner(compiled=False)
    runner.new_case()
    with torch.no_grad():
        out = runner(x)
    masks = runner.masks
    with torch.no_grad():
        runner(x)
    assert runner.masks is masks
    fields = runner.after_first_call(x)
    assert fields["block_mask_method"] == "kv-blocks" and fields["block_size"] == 64
    assert fields["block_mask_s"] >= 0 and fields["block_mask_warm_s"] >= 0
    assert fields["compiled"] is False and fields["kv_len"] == nb.member_idx.shape[1] + 1
    torch.testing.assert_close(out, _reference(nb, t, 0.3), atol=1e-12, rtol=1e-12)
    assert "backward on the CPU" in flex_peer.unavailable_reason(CPU, mode="fwd+bwd")
