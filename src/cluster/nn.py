"""AutoFocusFormer-compatible attention module.

``ClusterAttention`` keeps AFF's parameter names and shapes (``q``, ``kv``, ``blank_k``,
``blank_v``, ``pos_embed``, ``proj``) so an AFF checkpoint's state_dict loads unchanged, and
AFF's call ``forward(feat, member_idx, cluster_mask, pe_idx, global_attn)``.

Relative-position table widths: this module defaults to AFF's ``rel_pos_width`` R = 55
(``AFF_REL_POS_WIDTH``, 224-pixel images); AFF-MAE's import paths
(``cluster.cluster_attn``, ``cluster.archive.aff``) default to ``AFFMAE_REL_POS_WIDTH`` = 511.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from .neighbors import relative_position_table

__all__ = ["AFFMAE_REL_POS_WIDTH", "AFF_REL_POS_WIDTH", "ClusterAttention", "needed_rel_pos_width"]

# AFF's table: img_size // 4 - 1 for its 224-pixel images ((2R+1)^2 = 12321 rows).
AFF_REL_POS_WIDTH = 224 // 4 - 1
# AFF-MAE's tests build pe_idx for 2048-pixel inputs: img_size // 4 - 1 (a 1023 x 1023 table).
AFFMAE_REL_POS_WIDTH = 2048 // 4 - 1


def needed_rel_pos_width(max_pe_idx: int) -> int:
    """The smallest R whose table ((2R+1)^2 rows) holds row ``max_pe_idx`` (>= 0)."""
    # (2R+1)^2 > max  <=>  2R+1 >= isqrt(max)+1
    return (math.isqrt(max(0, int(max_pe_idx))) + 1) // 2


class ClusterAttention(nn.Module):
    """Local attention over nearest clusters (or global attention), AFF's module.

    Args:
        dim: channels C. num_heads: heads H (C % H == 0).
        attn_drop: dropout on attention weights. The fused kernels have no dropout, so in
            training with ``attn_drop > 0`` the local path runs the reference computation
            (and says so once per module with a warning).
        proj_drop: dropout after the output projection.
        backend: "auto" | "reference" | "triton" | "cuda" for the local path.
        fallback: if the chosen backend cannot run on the input's device/dtype, warn once
            and use the reference backend instead of raising.
        rel_pos_width: R of the relative-position table ((2R+1)^2 rows); AFF uses
            ``img_size // 4 - 1``, so the default here is AFF's 55 (224-pixel images,
            ``AFF_REL_POS_WIDTH``). ``pe_idx`` must be built against the same R
            (``build_neighborhoods(..., R=rel_pos_width)``); an index past the table raises
            an IndexError naming the R the indices need. AFF-MAE's import paths
            (``cluster.cluster_attn``, ``cluster.archive.aff``) default to 511 instead.
        deterministic: passed to the op (None follows torch's deterministic setting).
        check_indices: range-check ``member_idx`` and ``pe_idx`` before any launch (one
            device synchronisation per forward); False skips it for inputs known to be
            valid (e.g. inside a captured CUDA graph), and then an out-of-range index is
            undefined behaviour.

    The bias table ``pos_embed(pre_table)`` ([T, H], T = (2R+1)^2) is computed once per
    forward in the parameters' dtype: under autocast it stays float32 (the op takes float32
    parameters beside 16-bit activations), it is not downcast. ``pre_table`` is a
    non-persistent buffer (float32 [T, 5]: 0.24 MiB at R=55, 20 MiB at R=511), outside the
    state_dict as in AFF.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str = "auto", *, fallback: bool = False,
                 rel_pos_width: int = AFF_REL_POS_WIDTH, deterministic: bool | None = None,
                 check_indices: bool = True):
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS + ('auto',)}, got {backend!r}")
        self.dim = dim
        self.pos_dim = 2
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.fallback = fallback
        self.deterministic = deterministic
        self.check_indices = bool(check_indices)
        self.rel_pos_width = rel_pos_width

        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.blank_k = nn.Parameter(torch.randn(dim))
        self.blank_v = nn.Parameter(torch.randn(dim))
        self.pos_embed = nn.Linear(self.pos_dim + 3, num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Not persistent: AFF keeps the table outside the state_dict, and so must we for
        # checkpoints to load unchanged.
        self.register_buffer("pre_table", relative_position_table(rel_pos_width), persistent=False)
        self._warned: set[str] = set()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}, "
                f"rel_pos_width={self.rel_pos_width}")

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _bias_table(self, feat: torch.Tensor) -> torch.Tensor:
        """``pos_embed(pre_table)``: [T, H] in the parameters' dtype, never autocast's.

        Under autocast F.linear would cast the [T, 5] table and the weights to 16 bits (a
        copy of the table every step, and a 16-bit bias where the op takes float32). The
        table is cast only if it differs from the weights' dtype (after a partial .to()).
        """
        table = self.pre_table
        weight = self.pos_embed.weight
        if table.dtype != weight.dtype:
            table = table.to(weight.dtype)
        dev = feat.device.type
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return self.pos_embed(table)
        return self.pos_embed(table)

    def _pe_idx_error(self, pe_idx: torch.Tensor, T: int) -> IndexError:
        """The IndexError for a pe_idx outside this module's table: names rel_pos_width, the
        module's R and T, and the smallest R whose table holds the indices."""
        lo, hi = (int(t) for t in torch.aminmax(pe_idx.detach()))
        R = self.rel_pos_width
        msg = (f"pe_idx: values must lie in [0, T) = [0, {T}) of this module's relative-position "
               f"table (rel_pos_width R={R}, T=(2R+1)^2={T} rows), found min {lo}, max {hi}")
        if lo < 0:
            msg += "; negative rows index no table"
        if hi >= T:
            need = needed_rel_pos_width(hi)
            msg += (f"; these indices need rel_pos_width >= {need} (the smallest table holding "
                    f"row {hi}: (2*{need}+1)^2 = {(2 * need + 1) ** 2} rows). Build pe_idx with "
                    f"the module's R (build_neighborhoods(..., R={R})) or construct the module "
                    f"with the rel_pos_width the indices were built for (AFF: 55, 224-pixel "
                    f"images; AFF-MAE: 511, 2048-pixel images)")
        return IndexError(msg)

    def _local_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.backend == "auto" or not self.fallback:
            return self.backend
        why = ops.backend_unavailable_reason(self.backend, device, dtype)
        if why is None:
            return self.backend
        self._warn_once(f"fallback-{device.type}-{dtype}",
                        f"ClusterAttention: backend {self.backend!r} unavailable ({why}); "
                        "using the reference backend")
        return "reference"

    def forward(self, feat: torch.Tensor, member_idx: torch.Tensor | None,
                cluster_mask: torch.Tensor | None, pe_idx: torch.Tensor,
                global_attn: bool) -> torch.Tensor:
        """
        Args:
            feat: [B, N, C] token features.
            member_idx: [B, N, M] neighbour token indices (ignored when global_attn).
            cluster_mask: [B, N, M] nonzero = valid neighbour, or None
                (global mode: None or [B, N, N]).
            pe_idx: [B, N, M] (local) or [B, N, N] (global) rows of the position table.
            global_attn: attend to all N tokens instead of the neighbourhood.
        Returns [B, N, C].
        """
        if not isinstance(feat, torch.Tensor) or feat.dim() != 3 or feat.shape[-1] != self.dim:
            got = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
            raise ValueError(f"feat: expected shape [B, N, C] with C={self.dim}, got {got}")
        b, n, c = feat.shape
        h = self.num_heads
        d = c // h
        q = self.q(feat).view(b, n, h, d).permute(0, 2, 1, 3)  # b x h x n x d, a view
        # unbind, not kv[0] / kv[1]: its backward stacks dk and dv in one copy, where two
        # selects would each zero a whole kv-sized gradient and then add the two.
        k, v = (t.permute(0, 2, 1, 3) for t in self.kv(feat).view(b, n, h, 2, d).unbind(3))
        pe_table = self._bias_table(feat)  # T x h, once per forward
        blank_k = self.blank_k.view(h, d)
        blank_v = self.blank_v.view(h, d)

        if global_attn:
            out = self._global(q, k, v, pe_table, pe_idx, cluster_mask, blank_k, blank_v)
        else:
            if member_idx is None:
                raise ValueError("member_idx: required when global_attn is False")
            try:
                out = self._local(q, k, v, member_idx, pe_table, pe_idx, cluster_mask,
                                  blank_k, blank_v)
            except IndexError as exc:
                # The op's own range check (one sync, before any launch) found pe_idx outside
                # the table: say which table and which R the indices need.
                if not str(exc).startswith("pe_idx:") or not isinstance(pe_idx, torch.Tensor):
                    raise
                raise self._pe_idx_error(pe_idx, pe_table.shape[0]) from exc
        out = out.permute(0, 2, 1, 3).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def _local(self, q, k, v, member_idx, pe_table, pe_idx, cluster_mask, blank_k, blank_v):
        if self.training and self.attn_drop.p > 0:
            self._warn_once("attn_drop", "ClusterAttention: attn_drop > 0 in training runs "
                            "the reference (unfused) path; the fused kernels have no dropout")
            # The op's checks (and its IndexError for a bad pe_idx), then the reference.
            a = ops.check_inputs(
                q, k, v, member_idx, pe_table=pe_table, pe_idx=pe_idx, mask=cluster_mask,
                blank_k=blank_k, blank_v=blank_v, scale=self.scale, backend="reference",
                check_indices=self.check_indices,
            )
            return reference.cluster_attention(
                a.q, a.k, a.v, a.member_idx, a.pe_table, a.pe_idx, a.mask, a.blank_k, a.blank_v,
                a.scale, attn_dropout=self.attn_drop,
            )
        return ops.cluster_attention(
            q, k, v, member_idx, pe_table=pe_table, pe_idx=pe_idx, mask=cluster_mask,
            blank_k=blank_k, blank_v=blank_v, scale=self.scale,
            backend=self._local_backend(q.device, q.dtype),
            deterministic=self.deterministic, check_indices=self.check_indices,
        )

    def _global(self, q, k, v, pe_table, pe_idx, cluster_mask, blank_k, blank_v):
        b, h, n, d = q.shape
        if not isinstance(pe_idx, torch.Tensor) or tuple(pe_idx.shape) != (b, n, n):
            got = tuple(pe_idx.shape) if isinstance(pe_idx, torch.Tensor) else type(pe_idx).__name__
            raise ValueError(f"pe_idx: expected shape [B, N, N] = {(b, n, n)} in global mode, got {got}")
        # The gather below would fail with a bare index error on the CPU and a device-side
        # assert on a GPU: the op's own range check first (one sync), then this module's error.
        try:
            ops._check_ranges([ops._expect_index("pe_idx", pe_idx, pe_table.shape[0], "T",
                                                 self.check_indices)])
        except IndexError as exc:
            raise self._pe_idx_error(pe_idx, pe_table.shape[0]) from exc
        bias = pe_table[pe_idx.long()].permute(0, 3, 1, 2)  # b x h x n x n
        if cluster_mask is not None:
            if tuple(cluster_mask.shape) != (b, n, n):
                raise ValueError(f"cluster_mask: expected None or shape [B, N, N] = {(b, n, n)} "
                                 f"in global mode, got {tuple(cluster_mask.shape)}")
            bias = bias.masked_fill((cluster_mask == 0).unsqueeze(1), float("-inf"))
        # The blank token is one more key with zero bias; it keeps every row non-empty.
        k = torch.cat([k, blank_k.to(k.dtype)[None, :, None, :].expand(b, h, 1, d)], dim=2)
        v = torch.cat([v, blank_v.to(v.dtype)[None, :, None, :].expand(b, h, 1, d)], dim=2)
        bias = torch.cat([bias, bias.new_zeros(b, h, n, 1)], dim=-1)
        p = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p,
                                              scale=self.scale)
