"""build_neighborhoods' default lists are AFF's: each token's own nearest cluster means.

Every expectation here is recomputed from positions with plain loops (no call into the
builder's kNN), so a builder that shares one list per cluster, ranks clusters by the
distance between means, or takes a short cluster's mean over its padding fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from cluster import neighbors as nbr


def _expected_aff(pos_s: torch.Tensor, cs: int, nnc: int):
    """Per token: the nnc cluster ids whose mean (over real tokens) is nearest to the
    token's position, nearest first, ties by lower id. Written as loops over tokens."""
    B, N, _ = pos_s.shape
    NC = -(-N // cs)
    p = pos_s.double()
    means = torch.stack([p[:, c * cs:min(N, (c + 1) * cs)].mean(1) for c in range(NC)], dim=1)
    out = torch.empty(B, N, nnc, dtype=torch.long)
    for b in range(B):
        for i in range(N):
            d = [(float(((p[b, i] - means[b, c]) ** 2).sum()), c) for c in range(NC)]
            out[b, i] = torch.tensor([c for _, c in sorted(d)[:nnc]])
    return out, means


@pytest.mark.parametrize("N,cs,nbhd,grid", [(128, 8, 32, True), (61, 8, 24, True),
                                            (100, 8, 48, False), (37, 1, 5, True),
                                            (90, 4, 12, False)],
                         ids=["full", "short_last", "jitter", "cluster_of_1", "cs4_jitter"])
def test_default_lists_are_each_tokens_nearest_clusters(N, cs, nbhd, grid):
    B, h, w = 2, 11, 12
    pos = nbr.make_synthetic_positions(B, N, h, w, seed=N, grid=grid)
    nb = nbr.build_neighborhoods(pos, cs, nbhd, h, w, knn_method="torch")
    assert nb.lists == "aff"
    nnc, M = nbhd // cs, nbhd
    want, _ = _expected_aff(nb.pos, cs, nnc)
    assert nb.nearest_clusters.shape == (B, N, nnc)
    assert torch.equal(nb.nearest_clusters, want)
    # member_idx: the whole clusters, in list order; padding of a short cluster masked.
    tok = want[..., None] * cs + torch.arange(cs)
    tok = tok.reshape(B, N, M)
    assert torch.equal(nb.cluster_mask, tok < N)
    assert torch.equal(nb.member_idx, tok.clamp(max=N - 1))
    assert nb.member_idx.shape == nb.pe_idx.shape == (B, N, M)
    # pe_idx: each token's own offset to each neighbour (rounded, clamped), not its cluster's.
    W, R = nb.table_width, nb.R
    nbp = nb.pos.gather(1, nb.member_idx.view(B, -1, 1).expand(-1, -1, 2)).view(B, N, M, 2)
    off = (nbp - nb.pos[:, :, None]).round().clamp(-R, R)
    assert torch.equal(nb.pe_idx, ((off[..., 1] + R) * W + off[..., 0] + R).long())


def test_short_cluster_mean_over_real_tokens_only():
    """A token next to the short last cluster: its ranking uses the mean of the real tokens.

    Built so the two conventions disagree: with padding at (0, 0) counted, the last
    cluster's mean moves far from its tokens and drops out of their own lists."""
    N, cs = 61, 8
    pos = nbr.make_synthetic_positions(3, N, 8, 8, seed=4)
    nb = nbr.build_neighborhoods(pos, cs, 16, 8, 8, knn_method="torch")
    last = (N - 1) // cs
    want, means = _expected_aff(nb.pos, cs, 2)
    assert torch.equal(nb.nearest_clusters, want)
    # The last cluster's real tokens list it among their two nearest (its true mean is
    # among them) in at least one batch element; a mean over the padded 8 would not be.
    padded_mean = torch.cat([nb.pos[:, 56:].double(), torch.zeros(3, 3, 2, dtype=torch.float64)],
                            1).mean(1)
    assert not torch.allclose(padded_mean, means[:, last])
    assert (nb.nearest_clusters[:, 56:] == last).any()
    masked = ~nb.cluster_mask
    assert int(masked.sum()) == 3 * int((nb.nearest_clusters == last).sum())


def test_aff_lists_differ_within_a_cluster_and_shared_lists_do_not():
    """At a realistic shape AFF's 8 tokens of a cluster do not share one list (0 % share an
    ordered list, the union is well above nnc); lists="cluster" shares one per cluster."""
    B, N, M, cs = 2, 1024, 64, 8
    h = math.ceil(math.sqrt(N))
    w = math.ceil(N / h)
    pos = nbr.make_synthetic_positions(B, N, h, w, seed=0)
    aff = nbr.build_neighborhoods(pos, cs, M, h, w, knn_method="torch")
    shared = nbr.build_neighborhoods(pos, cs, M, h, w, knn_method="torch", lists="cluster")
    assert shared.lists == "cluster" and shared.nearest_clusters.shape == (B, N // cs, M // cs)
    groups = aff.member_idx.view(B, N // cs, cs, M)
    same = (groups == groups[:, :, :1]).all(-1).all(-1)
    assert same.float().mean() < 0.05
    union = torch.tensor([[len(set(aff.nearest_clusters[b, g * cs:(g + 1) * cs].flatten().tolist()))
                           for g in range(N // cs)] for b in range(B)], dtype=torch.float64)
    assert union.mean() > 1.3 * (M // cs)
    sg = shared.member_idx.view(B, N // cs, cs, M)
    assert (sg == sg[:, :, :1]).all()
    # Same clustering either way: only the lists differ.
    assert torch.equal(aff.order, shared.order) and torch.equal(aff.pos, shared.pos)
