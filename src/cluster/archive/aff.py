"""Import path of the old implementation, as AFF-MAE test code expects it.

``cluster.archive.aff.ClusterAttention`` is :class:`cluster.nn.ClusterAttention` on the
unfused CUDA extension (AutoFocusFormer's original kernels' design); where the extension
cannot run it warns once and uses the reference backend.

Its relative-position table defaults to AFF-MAE's, ``rel_pos_width = AFFMAE_REL_POS_WIDTH``
= 2048 // 4 - 1 = 511 (a 1023 x 1023 table), as does ``cluster.cluster_attn``'s: AFF-MAE's
tests construct both with ``(dim=, num_heads=[, proj_drop=])`` only and build ``pe_idx`` for
2048-pixel inputs, which AFF's 224-pixel table (R = 55, the default of
:class:`cluster.ClusterAttention`) cannot hold. Every keyword can still be given.
"""

from __future__ import annotations

from .. import nn as _nn
from ..nn import AFFMAE_REL_POS_WIDTH

__all__ = ["AFFMAE_REL_POS_WIDTH", "ClusterAttention"]


class ClusterAttention(_nn.ClusterAttention):
    """:class:`cluster.nn.ClusterAttention` with ``backend="cuda"``, ``fallback=True`` and
    ``rel_pos_width=511`` (AFF-MAE's 2048-pixel table) by default."""

    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0, backend="cuda", **kwargs):
        kwargs.setdefault("fallback", True)
        kwargs.setdefault("rel_pos_width", AFFMAE_REL_POS_WIDTH)
        super().__init__(dim, num_heads, attn_drop, proj_drop, backend, **kwargs)
