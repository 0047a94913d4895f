"""Unfused CUDA backend of :mod:`cluster.ops`: AutoFocusFormer's original kernel design.

Three gather products run as separate CUDA kernels (``csrc/``, registered as
``torch.ops.cluster.*``) and everything between them is plain PyTorch, composed as
AFF's ``ClusterAttention`` module does::

    attn = qk_forward(q, k, member_idx) * scale + pe_table[pe_idx]     # [B, H, N, M]
    attn = softmax(cat(attn, blank logit)) in float32, back to q's dtype
    out  = av_forward(attn_without_blank, v, member_idx) + p_blank * blank_v

It is the baseline the fused backends are measured against, so it keeps the original's
memory traffic (the [B, H, N, M] logits round-trip through global memory). Differences
from the original kernels: float32 accumulation for half types, bfloat16, 64-bit index
arithmetic, masks with exact zero weight, and an optional deterministic backward.

Ops (all take a trailing ``deterministic=False``; forwards ignore it):

``qk_forward(q, k, member_idx)``            -> attn ``[B,H,N,M]``
``av_forward(attn, v, member_idx)``         -> out ``[B,H,N,D]``
``wf_forward(weights, feat, member_idx)``   -> out ``[B,N,W,C]``
and ``*_backward(grad, *inputs)`` returning the gradients of the two float inputs.

Determinism: the key-side gradients (dk, dv, d_feat) sum over every (query, slot) that
names a key. By default that is an ``atomicAdd`` into a float32 buffer, like the
original: fast, not bitwise reproducible. With ``deterministic=True`` each backward
instead sorts ``member_idx`` into a reverse map (key -> the slots naming it) and lets
one thread sum each output in a fixed order. The rest of the composition is PyTorch;
the position-bias gradient comes from ``index_put_`` (indexing backward), which
PyTorch makes deterministic under ``torch.use_deterministic_algorithms(True)``.

Loading and building live in :mod:`cluster.cuda_build` (nothing is built at import);
``python -m cluster.cuda_ext build`` builds ahead of time, ``python -m cluster.cuda_ext
check-compile`` compiles ``csrc/`` without a GPU.
"""

from __future__ import annotations

import importlib
import sys

import torch

from . import cuda_build, reference
from .cuda_build import build_dir, csrc_dir, load, main  # noqa: F401  (the backend's build interface)

__all__ = [
    "MAX_HEAD_DIM",
    "unavailable_reason",
    "cluster_attention",
    "weighted_features",
    "query_key",
    "attention_value",
    "load",
    "build_dir",
    "csrc_dir",
    "main",
]

# The kernels loop over D serially in one thread and have no hard limit; beyond this the
# unfused design is the wrong tool and no cluster-attention model uses such heads.
MAX_HEAD_DIM = 1024

NAMESPACE = cuda_build.NAMESPACE
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The C++ schemas (csrc/cluster_ops.cpp), repeated so that the Python side can be
# exercised against emulated ops on a machine without CUDA; a GPU test checks they agree.
SCHEMAS = {
    "qk_forward": "qk_forward(Tensor q, Tensor k, Tensor member_idx, bool deterministic=False) -> Tensor",
    "qk_backward": "qk_backward(Tensor grad_attn, Tensor q, Tensor k, Tensor member_idx, "
                   "bool deterministic=False) -> (Tensor, Tensor)",
    "av_forward": "av_forward(Tensor attn, Tensor v, Tensor member_idx, bool deterministic=False) -> Tensor",
    "av_backward": "av_backward(Tensor grad_out, Tensor attn, Tensor v, Tensor member_idx, "
                   "bool deterministic=False) -> (Tensor, Tensor)",
    "wf_forward": "wf_forward(Tensor weights, Tensor feat, Tensor member_idx, bool deterministic=False) -> Tensor",
    "wf_backward": "wf_backward(Tensor grad_out, Tensor weights, Tensor feat, Tensor member_idx, "
                   "bool deterministic=False) -> (Tensor, Tensor)",
}

def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the CUDA backend runs on ``device`` with ``dtype``, else why not.

    On a CUDA device the first call loads the extension, building it if needed.
    """
    device = torch.device(device)
    if dtype not in DTYPES:
        return f"the cuda backend supports float32, float16 and bfloat16, not {dtype}"
    if device.type != "cuda":
        why = cuda_build._environment_reason()
        return why if why is not None else f"no CUDA device: the tensors are on {device}"
    return cuda_build._load_once()


def _require() -> None:
    why = cuda_build._load_once()
    if why is not None:
        from .ops import BackendUnavailableError

        raise BackendUnavailableError(f"backend 'cuda' is unavailable: {why}")


# ================================================ fake impls and autograd (Python side)


def _register_python_side(ns: str) -> None:
    """Fake impls (for torch.compile / meta tensors) and autograd formulas of ``ns::*``.

    Takes the namespace so the same registrations can be checked on CPU against
    emulated ops. Must run from this module: the C++ library names it as the home of
    its fake impls (set_python_module).
    """
    if ns in cuda_build._State.registered:
        return
    ops = getattr(torch.ops, ns)

    def qk_forward_fake(q, k, member_idx, deterministic=False):
        torch._check(q.dim() == 4 and member_idx.dim() == 3, lambda: "qk_forward: bad ranks")
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], member_idx.shape[2]))

    def qk_backward_fake(grad_attn, q, k, member_idx, deterministic=False):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def av_forward_fake(attn, v, member_idx, deterministic=False):
        torch._check(attn.dim() == 4 and v.dim() == 4, lambda: "av_forward: bad ranks")
        return v.new_empty((attn.shape[0], attn.shape[1], attn.shape[2], v.shape[3]))

    def av_backward_fake(grad_out, attn, v, member_idx, deterministic=False):
        return attn.new_empty(attn.shape), v.new_empty(v.shape)

    def wf_forward_fake(weights, feat, member_idx, deterministic=False):
        torch._check(weights.dim() == 4 and feat.dim() == 3, lambda: "wf_forward: bad ranks")
        return feat.new_empty((weights.shape[0], weights.shape[1], weights.shape[3], feat.shape[2]))

    def wf_backward_fake(grad_out, weights, feat, member_idx, deterministic=False):
        return weights.new_empty(weights.shape), feat.new_empty(feat.shape)

    for name, fn in (("qk_forward", qk_forward_fake), ("qk_backward", qk_backward_fake),
                     ("av_forward", av_forward_fake), ("av_backward", av_backward_fake),
                     ("wf_forward", wf_forward_fake), ("wf_backward", wf_backward_fake)):
        torch.library.register_fake(f"{ns}::{name}", fn)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.deterministic = bool(inputs[3]) if len(inputs) > 3 else False
        ctx.n_inputs = len(inputs)

    def grads(ctx, first, second):
        need = ctx.needs_input_grad
        return ((first if need[0] else None), (second if need[1] else None),
                *([None] * (ctx.n_inputs - 2)))

    def qk_backward(ctx, grad):
        q, k, member_idx = ctx.saved_tensors
        return grads(ctx, *ops.qk_backward(grad, q, k, member_idx, ctx.deterministic))

    def av_backward(ctx, grad):
        attn, v, member_idx = ctx.saved_tensors
        return grads(ctx, *ops.av_backward(grad, attn, v, member_idx, ctx.deterministic))

    def wf_backward(ctx, grad):
        weights, feat, member_idx = ctx.saved_tensors
        return grads(ctx, *ops.wf_backward(grad, weights, feat, member_idx, ctx.deterministic))

    torch.library.register_autograd(f"{ns}::qk_forward", qk_backward, setup_context=setup)
    torch.library.register_autograd(f"{ns}::av_forward", av_backward, setup_context=setup)
    torch.library.register_autograd(f"{ns}::wf_forward", wf_backward, setup_context=setup)
    cuda_build._State.registered.add(ns)


# ======================================================================== composition


def _compose_attention(ops, q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v,
                       scale, deterministic):
    """AFF's module around the qk / av ops of namespace ``ops``."""
    dt = q.dtype
    attn = ops.qk_forward(q, k, member_idx, deterministic) * scale  # [B, H, N, M]
    if pe_table is not None:
        attn = attn + pe_table.to(dt)[pe_idx.long()].permute(0, 3, 1, 2)
    valid = None
    if mask is not None:
        valid = mask.unsqueeze(1).expand_as(attn)
    if blank_k is not None:
        blank_logit = scale * (q * blank_k.to(dt)[None, :, None, :]).sum(-1, keepdim=True)
        attn = torch.cat([attn, blank_logit], dim=-1)
        if valid is not None:
            valid = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    # AFF fills masked slots with a large negative number; exact -inf with a guarded
    # denominator gives them weight 0 and leaves fully masked rows at 0 instead of NaN.
    # Half types take the softmax in float32 (float64 stays float64 for gradchecks).
    acc = torch.float64 if dt == torch.float64 else torch.float32
    p = reference.masked_softmax(attn.to(acc), valid).to(dt)
    if blank_k is not None:
        p, p_blank = p[..., :-1], p[..., -1:]
    out = ops.av_forward(p, v, member_idx, deterministic)
    if blank_v is not None:
        out = out + p_blank * blank_v.to(dt)[None, :, None, :]
    return out


def cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                      deterministic):
    """Cluster attention from the unfused kernels; arguments checked by :func:`cluster.ops.check_inputs`.

    ``deterministic=True`` selects the atomic-free backward kernels (see the module
    docstring); the forward is deterministic either way.
    """
    _require()
    return _compose_attention(torch.ops.cluster, q, k, v, member_idx, pe_table, pe_idx, mask,
                              blank_k, blank_v, float(scale), bool(deterministic))


def weighted_features(weights, feat, member_idx):
    """``out[b,i,w,c] = sum_j weights[b,i,j,w] * feat[b, member_idx[b,i,j], c]``.

    The backward is atomic-free when ``torch.are_deterministic_algorithms_enabled()``.
    """
    _require()
    return torch.ops.cluster.wf_forward(weights, feat, member_idx,
                                        torch.are_deterministic_algorithms_enabled())


def query_key(q, k, member_idx, deterministic: bool = False):
    """``attn[b,h,i,j] = <q[b,h,i], k[b,h,member_idx[b,i,j]]>``, differentiable."""
    _require()
    return torch.ops.cluster.qk_forward(q, k, member_idx, deterministic)


def attention_value(attn, v, member_idx, deterministic: bool = False):
    """``out[b,h,i] = sum_j attn[b,h,i,j] * v[b,h,member_idx[b,i,j]]``, differentiable."""
    _require()
    return torch.ops.cluster.av_forward(attn, v, member_idx, deterministic)


# The C++ library names this module as the home of its fake impls, so torch imports it
# when it meets the ops without them (library loaded as `cluster._C` or by hand):
# register them then, without building anything.
if __name__ != "__main__" and cuda_build._ops_defined():
    _register_python_side(NAMESPACE)

if __name__ == "__main__":
    # Run the imported module's main: fake impls must be registered from
    # `cluster.cuda_ext`, the module the C++ library names, not from `__main__`.
    sys.exit(importlib.import_module("cluster.cuda_build").main())
