"""The suite's own checks must fail on broken backends.

Each mutant below is a plausible kernel bug, installed as the "triton" backend for the
duration of one test; the very helpers the forward/backward tests use must then raise, on
AFF's per-token lists and on the shared lists.
"""

from __future__ import annotations

import types

import pytest
import torch

from cluster import ops, reference, testing
from cluster.testing import CONFIGS, RAGGED_CONFIGS

from ..backward.test_backward import _check_grads
from ..forward.test_forward import _check_against_reference


def _reference_cache():
    store = {}

    def get(cfg, seed, **recipe):
        key = (cfg, seed, tuple(sorted(recipe.items())))
        if key not in store:
            store[key] = testing.reference_result(cfg, seed=seed, **recipe)
        return store[key]

    return get


class _GatherDroppingDuplicateGrads(torch.autograd.Function):
    """Gather rows; in backward drop the gradient of repeated indices within a row."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.n = x.shape[2]
        return reference._gather_rows(x, idx)

    @staticmethod
    def backward(ctx, g):  # g: [B, H, N, M, D]
        (idx,) = ctx.saved_tensors
        B, H, N, M, D = g.shape
        first = torch.ones_like(idx, dtype=torch.bool)
        for j in range(1, M):
            first[..., j] = ~(idx[..., :j] == idx[..., j : j + 1]).any(-1)
        g = g * first[:, None, :, :, None]
        out = g.new_zeros(B, H, ctx.n, D)
        flat = idx.long().reshape(B, 1, N * M, 1).expand(B, H, N * M, D)
        return out.scatter_add_(2, flat, g.reshape(B, H, N * M, D)), None


def _attention(q, kg, vg, pe_table, pe_idx, mask, blank_k, blank_v, scale, drop_blank=False):
    logits = scale * (q.unsqueeze(3) * kg).sum(-1)
    if pe_table is not None:
        logits = logits + pe_table.to(q.dtype)[pe_idx.long()].permute(0, 3, 1, 2)
    valid = None if mask is None else mask.unsqueeze(1).expand_as(logits)
    use_blank = blank_k is not None and not drop_blank
    if use_blank:
        bl = scale * (q * blank_k.to(q.dtype)[None, :, None, :]).sum(-1, keepdim=True)
        logits = torch.cat([logits, bl], -1)
        if valid is not None:
            valid = torch.cat([valid, torch.ones_like(valid[..., :1])], -1)
    p = reference.masked_softmax(logits, valid)
    if use_blank:
        p, pb = p[..., :-1], p[..., -1:]
    out = (p.unsqueeze(-1) * vg).sum(3)
    if use_blank:
        out = out + pb * blank_v.to(q.dtype)[None, :, None, :]
    return out


def _mutant(kind):
    def cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                          deterministic):
        idx = member_idx
        if kind == "wrong_neighbor":
            # off by one in the gather: the neighbour next to the listed one
            idx = (member_idx + 1) % q.shape[2]
        if kind == "dup_grad":
            kg = _GatherDroppingDuplicateGrads.apply(k, idx)
            vg = _GatherDroppingDuplicateGrads.apply(v, idx)
        else:
            kg = reference._gather_rows(k, idx)
            vg = reference._gather_rows(v, idx)
        if kind == "ignore_mask":
            mask = None
        return _attention(q, kg, vg, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                          drop_blank=(kind == "dropped_blank"))

    return types.SimpleNamespace(
        MAX_HEAD_DIM=1 << 20, unavailable_reason=lambda d, t: None,
        cluster_attention=cluster_attention, weighted_features=reference.weighted_features,
    )


@pytest.fixture
def install_mutant(monkeypatch):
    def install(kind):
        real = ops._backend_module
        mod = _mutant(kind)
        monkeypatch.setattr(ops, "_backend_module",
                            lambda name: (mod, None) if name == "triton" else real(name))
    return install


def test_unmutated_stand_in_passes(install_mutant, fwd_tol, bwd_tol):
    """Control: the stand-in without a bug passes the same checks, so failures below are the bugs'."""
    install_mutant("none")
    cache = _reference_cache()
    _check_against_reference("triton", CONFIGS[0], torch.float32, torch.device("cpu"), cache, fwd_tol)
    _check_grads("triton", RAGGED_CONFIGS[0], torch.float32, torch.device("cpu"), cache, bwd_tol,
                 duplicates=True, empty_rows=True)


@pytest.mark.parametrize("lists", testing.LISTS)
@pytest.mark.parametrize("kind", ["wrong_neighbor", "dropped_blank", "ignore_mask"])
def test_forward_checks_catch(kind, lists, install_mutant, fwd_tol):
    install_mutant(kind)
    with pytest.raises(AssertionError):
        _check_against_reference("triton", CONFIGS[0], torch.float32, torch.device("cpu"),
                                 _reference_cache(), fwd_tol, lists=lists)


@pytest.mark.parametrize("lists", testing.LISTS)
def test_backward_checks_catch_missing_duplicate_accumulation(lists, install_mutant, bwd_tol):
    install_mutant("dup_grad")
    cache = _reference_cache()
    # the forward is right, so only the gradient checks can see this bug
    _check_against_reference("triton", RAGGED_CONFIGS[0], torch.float32, torch.device("cpu"),
                             cache, 1e-4, duplicates=True, lists=lists)
    with pytest.raises(AssertionError, match="dk|dv"):
        _check_grads("triton", RAGGED_CONFIGS[0], torch.float32, torch.device("cpu"), cache,
                     bwd_tol, duplicates=True, empty_rows=True, lists=lists)
