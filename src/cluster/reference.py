"""Plain-PyTorch reference implementations: the ground truth every backend is checked against.

Everything here is written for clarity, runs on any device and in float64, and is
differentiable through ordinary autograd. It materialises the gathered neighbours
(``[B, H, N, M, D]``), so it is memory-hungry by design: use it on test-sized inputs.

Semantics of cluster attention (also in the README):

For each batch ``b``, head ``h`` and query ``i``, over the valid slots ``j`` of ``member_idx[b, i]``::

    logit_j    = scale * <q[b,h,i], k[b,h,member_idx[b,i,j]]> + pe_table[pe_idx[b,i,j], h]
    logit_blank = scale * <q[b,h,i], blank_k[h]>
    p          = softmax over (valid j) + blank
    out[b,h,i] = sum_j p_j * v[b,h,member_idx[b,i,j]] + p_blank * blank_v[h]

Masked slots get weight exactly 0. A row with no valid slot and no blank outputs 0 (and
gets zero gradients), never NaN. Duplicated indices count once per occurrence.
"""

from __future__ import annotations

import torch

__all__ = [
    "cluster_attention",
    "global_attention",
    "query_key",
    "attention_value",
    "weighted_features",
    "masked_softmax",
]


def _gather_rows(x: torch.Tensor, member_idx: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, D], member_idx: [B, N, M] -> [B, H, N, M, D]."""
    B, H, N, D = x.shape
    M = member_idx.shape[-1]
    idx = member_idx.long().reshape(B, 1, N * M, 1).expand(B, H, N * M, D)
    return torch.gather(x, 2, idx).reshape(B, H, N, M, D)


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis that gives exactly 0 to invalid entries.

    A row without any valid entry yields all zeros with zero gradient (no NaN): the
    denominator is replaced by 1 *before* the division, so autograd never sees 0/0.
    """
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(logits - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return e / denom


def query_key(q: torch.Tensor, k: torch.Tensor, member_idx: torch.Tensor) -> torch.Tensor:
    """attn[b,h,i,j] = <q[b,h,i], k[b,h,member_idx[b,i,j]]> -> [B, H, N, M]."""
    return (q.unsqueeze(3) * _gather_rows(k, member_idx)).sum(-1)


def attention_value(attn: torch.Tensor, v: torch.Tensor, member_idx: torch.Tensor) -> torch.Tensor:
    """out[b,h,i] = sum_j attn[b,h,i,j] * v[b,h,member_idx[b,i,j]] -> [B, H, N, D]."""
    return (attn.unsqueeze(-1) * _gather_rows(v, member_idx)).sum(3)


def weighted_features(
    weights: torch.Tensor, feat: torch.Tensor, member_idx: torch.Tensor
) -> torch.Tensor:
    """out[b,i,w,c] = sum_j weights[b,i,j,w] * feat[b,member_idx[b,i,j],c] -> [B, N, W, C].

    weights: [B, N, M, W], feat: [B, Nf, C], member_idx: [B, N, M] in [0, Nf).
    """
    B, N, M = member_idx.shape
    C = feat.shape[-1]
    idx = member_idx.long().reshape(B, N * M, 1).expand(B, N * M, C)
    gathered = torch.gather(feat, 1, idx).reshape(B, N, M, C)
    return torch.einsum("bnmw,bnmc->bnwc", weights, gathered)


def cluster_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    member_idx: torch.Tensor,
    pe_table: torch.Tensor | None = None,
    pe_idx: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    blank_k: torch.Tensor | None = None,
    blank_v: torch.Tensor | None = None,
    scale: float | None = None,
    attn_dropout=None,
) -> torch.Tensor:
    """Reference cluster attention; arguments as in :func:`cluster.ops.cluster_attention`.

    Computes in q's dtype (so it doubles as the "same low precision" PyTorch baseline of
    the test suite); parameters given in float32 are cast to q's dtype. ``attn_dropout``, a
    callable such as ``nn.Dropout``, is applied to the attention weights (blank included)
    as AFF does; the fused backends have no such hook.
    """
    B, H, N, D = q.shape
    if scale is None:
        scale = D**-0.5
    dt = q.dtype
    logits = scale * query_key(q, k, member_idx)  # [B, H, N, M]
    if pe_table is not None:
        bias = pe_table.to(dt)[pe_idx.long()]  # [B, N, M, H]
        logits = logits + bias.permute(0, 3, 1, 2)
    valid = None
    if mask is not None:
        valid = (mask != 0).unsqueeze(1).expand_as(logits)
    if blank_k is not None:
        blank_logit = scale * (q * blank_k.to(dt)[None, :, None, :]).sum(-1, keepdim=True)
        logits = torch.cat([logits, blank_logit], dim=-1)
        if valid is not None:
            valid = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    p = masked_softmax(logits, valid)
    if attn_dropout is not None:
        p = attn_dropout(p)
    if blank_k is not None:
        p, p_blank = p[..., :-1], p[..., -1:]
    out = attention_value(p, v, member_idx)
    if blank_v is not None:
        out = out + p_blank * blank_v.to(dt)[None, :, None, :]
    return out


def global_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    blank_k: torch.Tensor | None = None,
    blank_v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention of every query to all N keys plus the blank token.

    bias: [B, H, N, N] additive logits; key_mask: [B, N] (nonzero = valid key).
    """
    B, H, N, D = q.shape
    if scale is None:
        scale = D**-0.5
    logits = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.to(q.dtype)
    valid = None
    if key_mask is not None:
        valid = (key_mask != 0)[:, None, None, :].expand_as(logits)
    if blank_k is not None:
        blank_logit = scale * (q * blank_k.to(q.dtype)[None, :, None, :]).sum(-1, keepdim=True)
        logits = torch.cat([logits, blank_logit], dim=-1)
        if valid is not None:
            valid = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    p = masked_softmax(logits, valid)
    if blank_k is not None:
        p, p_blank = p[..., :-1], p[..., -1:]
    out = p @ v
    if blank_v is not None:
        out = out + p_blank * blank_v.to(q.dtype)[None, :, None, :]
    return out
