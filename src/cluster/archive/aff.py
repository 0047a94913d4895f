"""Import path of the old implementation, as AFF-MAE test code expects it.

``cluster.archive.aff.ClusterAttention`` is :class:`cluster.nn.ClusterAttention` on the
unfused CUDA extension (AutoFocusFormer's original kernels' design); where the extension
cannot run it warns once and uses the reference backend.
"""

from __future__ import annotations

from .. import nn as _nn

__all__ = ["ClusterAttention"]


class ClusterAttention(_nn.ClusterAttention):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0, backend="cuda", **kwargs):
        kwargs.setdefault("fallback", True)
        super().__init__(dim, num_heads, attn_drop, proj_drop, backend, **kwargs)
