"""The backend's entry points and their torch registration.

``cluster_attention`` and ``weighted_features`` are what :mod:`cluster.ops` calls. Custom
ops (``torch.ops.cluster_triton.*``) keep torch.compile from tracing into Triton launches
(and the host-side sorts of the backward): dynamo sees one opaque op per direction, with
fake implementations giving output metadata, and autograd goes through
register_autograd. Absent optional gradients come back as empty tensors because custom
ops cannot return None. Eager calls of cluster_attention take ``_AttnFunction`` instead:
the same forward, context and backward without the custom-op layer's host time.
"""

from __future__ import annotations

import torch

from .backward import _attn_backward
from .common import _acc_dtype, _dense_like, _lastdim_unit
from .forward import _attn_forward
from .weighted import _wf_backward, _wf_forward

Tensor = torch.Tensor


@torch.library.custom_op("cluster_triton::attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, member_idx: Tensor, pe_table: Tensor | None,
    pe_idx: Tensor | None, mask: Tensor | None, blank_k: Tensor | None,
    blank_v: Tensor | None, scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    # The custom op's backward builds its own union map: ops cannot pass it between them.
    return _attn_forward(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v,
                         scale)[:2]


@_attn_fwd_op.register_fake
def _attn_fwd_fake(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                   deterministic):
    B, H, N, D = q.shape
    # out in q's layout, as _attn_forward allocates it
    return _dense_like(_lastdim_unit(q)), q.new_empty((B, H, N), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("cluster_triton::attn_bwd", mutates_args=())
def _attn_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    member_idx: Tensor, pe_table: Tensor | None, pe_idx: Tensor | None, mask: Tensor | None,
    blank_k: Tensor | None, blank_v: Tensor | None, scale: float, deterministic: bool,
    compute_kv: bool, compute_pe: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _attn_backward(dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask,
                          blank_k, blank_v, scale, deterministic, compute_kv, compute_pe)


@_attn_bwd_op.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k,
                   blank_v, scale, deterministic, compute_kv, compute_pe):
    B, H, N, D = q.shape
    dq = _dense_like(_lastdim_unit(q))  # as _attn_backward allocates it
    if compute_kv:
        dk = _dense_like(_lastdim_unit(k))  # as _attn_backward allocates dk and dv
        dv = torch.empty_like(dk, dtype=v.dtype)
    else:
        dk, dv = q.new_empty(0, dtype=k.dtype), q.new_empty(0, dtype=v.dtype)
    if pe_table is not None and compute_pe:
        dpe = pe_table.new_empty(pe_table.shape)
    else:
        dpe = q.new_empty(0)
    if blank_k is not None:
        dbk, dbv = blank_k.new_empty((H, D)), blank_v.new_empty((H, D))
    else:
        dbk, dbv = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dpe, dbk, dbv


def _save_attn_context(ctx, inputs, out, lse):
    """What either autograd path keeps for :func:`_attn_backward_autograd`."""
    q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale, deterministic = inputs
    ctx.save_for_backward(q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k,
                          blank_v)
    ctx.scale = scale
    ctx.deterministic = deterministic


def _attn_setup_context(ctx, inputs, output):
    out, lse = output
    _save_attn_context(ctx, inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def _attn_backward_autograd(ctx, dout, _dlse, backward=_attn_bwd_op, **kept):
    q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k, blank_v = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv, dpe, dbk, dbv = backward(
        dout, q, k, v, out, lse, member_idx, pe_table, pe_idx, mask, blank_k, blank_v,
        ctx.scale, ctx.deterministic, bool(need[1] or need[2]), bool(need[4]), **kept,
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        None,
        dpe if (pe_table is not None and need[4]) else None,
        None,
        None,
        dbk if (blank_k is not None and need[7]) else None,
        dbv if (blank_v is not None and need[8]) else None,
        None,
        None,
    )


_attn_fwd_op.register_autograd(_attn_backward_autograd, setup_context=_attn_setup_context)


@torch.library.custom_op("cluster_triton::wf_fwd", mutates_args=())
def _wf_fwd_op(weights: Tensor, feat: Tensor, member_idx: Tensor) -> Tensor:
    return _wf_forward(weights, feat, member_idx)


@_wf_fwd_op.register_fake
def _wf_fwd_fake(weights, feat, member_idx):
    B, N, M, W = weights.shape
    return feat.new_empty((B, N, W, feat.shape[-1]))


@torch.library.custom_op("cluster_triton::wf_bwd", mutates_args=())
def _wf_bwd_op(dout: Tensor, weights: Tensor, feat: Tensor, member_idx: Tensor,
               need_w: bool, need_f: bool) -> tuple[Tensor, Tensor]:
    return _wf_backward(dout, weights, feat, member_idx, need_w, need_f)


@_wf_bwd_op.register_fake
def _wf_bwd_fake(dout, weights, feat, member_idx, need_w, need_f):
    dw = weights.new_empty(weights.shape) if need_w else weights.new_empty(0)
    df = feat.new_empty(feat.shape) if need_f else feat.new_empty(0)
    return dw, df


def _wf_setup_context(ctx, inputs, output):
    weights, feat, member_idx = inputs
    ctx.save_for_backward(weights, feat, member_idx)


def _wf_backward_autograd(ctx, dout):
    weights, feat, member_idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    dw, df = _wf_bwd_op(dout, weights, feat, member_idx, bool(need[0]), bool(need[1]))
    return (dw if need[0] else None, df if need[1] else None, None)


_wf_fwd_op.register_autograd(_wf_backward_autograd, setup_context=_wf_setup_context)


class _AttnFunction(torch.autograd.Function):
    """Eager twin of the custom op: the same forward, context and backward, without the
    custom-op layer, whose host time per training step is more than the whole GPU time of
    the smaller AFF shapes (benchmarks/TUNING.md)."""

    @staticmethod
    def forward(ctx, q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                deterministic, grad_mode):
        inputs = (q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                  deterministic)
        need = ctx.needs_input_grad
        # The backward's union map, built by the forward where its union kernel reads it
        # (needs_input_grad ignores torch.no_grad: grad_mode is the caller's mode).
        keep = (deterministic, bool(need[1] or need[2])) if grad_mode and any(need) else None
        out, lse, ctx.kept_map = _attn_forward(*inputs[:10], keep=keep)
        _save_attn_context(ctx, inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return (*_attn_backward_autograd(ctx, dout, None, backward=_attn_backward,
                                         kept=ctx.kept_map), None)


def cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                      deterministic):
    """Fused cluster attention; arguments already validated by :func:`cluster.ops.check_inputs`.

    torch.compile traces the custom op (one opaque node per direction, fake tensors for
    shapes); eager calls take the autograd.Function, same kernels, less host overhead.
    """
    args = (q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, float(scale),
            bool(deterministic))
    if torch.compiler.is_compiling():
        return _attn_fwd_op(*args)[0]
    return _AttnFunction.apply(*args, torch.is_grad_enabled())


def weighted_features(weights, feat, member_idx):
    """Fused ``out[b,i,w,c] = sum_j weights[b,i,j,w] * feat[b, member_idx[b,i,j], c]``."""
    return _wf_fwd_op(weights, feat, member_idx)
