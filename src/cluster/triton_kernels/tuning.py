"""Every measured knob of the triton backend: one line each, with its reason.

The measurements behind each value (figures, the variants that lost, the logs under
benchmarks/results/) are in benchmarks/TUNING.md, one row per knob; change a value here
and the row there together.

Widths: the tables keyed by ``(kind, width)`` take width 4 for float32 (float64 uses the
float32 entries, with half the tile) and 2 for float16 / bfloat16. Kinds: ``"fwd"``,
``"bwd_q"``, ``"bwd_kv"`` (the forward, the query side and the key side of the backward);
TUNING_MAXNREG adds ``"_group"`` for a kind's group kernel and ``"fwd_gluon"``.

The tables are read-only views (``types.MappingProxyType``) and the scalars plain module
attributes. The host code reads every knob through this module when it launches
(``tuning.TUNING[kind, width]``, ``tuning.GROUP_TILE``), so :func:`override` changes what
the next launch does. Tests, build_check and the tuners in benchmarks/ change knobs only
through it, never by assigning to this module.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping

from . import launch

# ------------------------------------------------------------------ attention kernels
# (rows per program, slots per chunk at most, gather-tile elements, num_warps) of the per-query
# and per-key kernels; few warps make the reductions over D and slots cheap (benchmarks/tune.py).
_TUNING: dict[tuple[str, int], tuple[int, int, int, int]] = {
    ("fwd", 4): (16, 32, 4096, 1),
    ("fwd", 2): (8, 32, 2048, 1),
    ("bwd_q", 4): (8, 32, 1024, 1),
    ("bwd_q", 2): (8, 32, 1024, 1),
    ("bwd_kv", 4): (8, 32, 1024, 1),
    ("bwd_kv", 2): (8, 32, 1024, 1),
}
# num_warps of the group kernels (one cluster of 8 queries or keys a program), 0 = the
# per-query / per-key kernel instead:
_TUNING_GROUP: dict[tuple[str, int], int] = {
    ("fwd", 4): 0 if launch._INTERPRET else 1,  # FMA group path; the interpreter: per-query, far cheaper
    ("fwd", 2): 1,  # one tensor-core gather of the cluster's keys beats 8 per-query gathers
    ("bwd_q", 4): 0,  # float32 tl.dot runs on FMA units through shared memory: slower
    ("bwd_q", 2): 1,  # query-cluster backward wins at M = 48 and 64 with 8-row tiles
    ("bwd_kv", 4): 0,  # float32 tl.dot again: the per-key walk wins
    ("bwd_kv", 2): 2,  # key-cluster backward: 8 x 8 score blocks on tensor cores beat the walk
}
# Heads per group-kernel tile (block-diagonal, 8 rows a head):
_TUNING_GROUP_HEADS: dict[str, int] = {
    "fwd": 1,  # 2 heads double the gathered k / v tiles: slower
    "bwd_kv": 2,  # 2 heads (and 2 map entries a chunk, KV_GROUP_TILE): faster at every AFF shape
}
# num_warps of the union kernels (union.py: AFF's per-token lists of whole clusters), 0 = off
# (TUNING.md has their figures):
_TUNING_UNION: dict[tuple[str, int], int] = {
    ("fwd", 4): 0,  # float32 tl.dot runs on FMA units through shared memory: 2x the per-query kernel
    ("fwd", 2): 1,  # 0.31 ms against the per-query kernel's 0.39, where the backward's map is built anyway
    ("bwd_q", 4): 0,  # as the forward: 3x the per-query kernel
    ("bwd_q", 2): 0,  # 2 % off the step at affmae_stage1, a loss at highres: not worth a map in the forward
}
# Group forwards on FMA units (broadcast products, one gather per cluster) instead of tl.dot:
_TUNING_GROUP_FMA: dict[tuple[str, int], bool] = {
    ("fwd", 4): True,  # float32: beats the per-query kernel at every AFF shape, with one warp
}
# The float32 forward on the Gluon kernel (gluon_forward.py), where its Triton allows:
_TUNING_GLUON: dict[str, bool] = {
    "fwd": True,  # explicit 2 x 4 register blocks and async copies: beats the FMA group path
}
# D-chunk of the Gluon kernel's q . k dots and slot chunk of its p v dots:
_TUNING_GLUON_CHUNKS: dict[str, int] = {
    "dc": 16,  # gl.dot_fma takes K >= 16; 32 ran the same
    "kc": 16,  # the same
}
# Register cap (ptxas .maxnreg) per kernel and width, absent = the compiler's choice; a cap
# trades spills for programs resident per SM (the group forward and query-cluster backward lose):
_TUNING_MAXNREG: dict[tuple[str, int], int] = {
    ("bwd_kv_group", 2): 128,  # 2-warp key-cluster backward: faster at every AFF shape
    ("bwd_q", 2): 80,  # per-query backward, 16-bit
    ("bwd_q", 4): 128,  # per-query backward, float32
    ("bwd_kv", 4): 128,  # per-key backward, float32
    ("fwd_gluon", 4): 128,  # Gluon forward: 16 programs an SM beat 12 (at 168)
}

# Largest [BLOCK_M, BLOCK_D] key tile of the group kernels; longer lists take the per-query ones.
GROUP_TILE = 8192
# Union entries (key clusters) kept per group; a group whose union is larger takes the per-query kernels.
UNION_CAP = 32
# num_warps of the union map kernel: 1 beat 2 (a chain of per-query merges, little to share).
UNION_MAP_WARPS = 1
# Union entries per dense tile of the union kernels: 4 (32 keys) beat 2, 8 and 16 in the forward.
UNION_CHUNK = 4
# Longest lists the union map takes: its [M, M / 8]-sized tiles stay in registers.
UNION_MAX_M = 128
# Widest heads the union kernels take: a [UNION_CHUNK * 8, D] key tile within registers.
UNION_MAX_D = 128
# Pipeline depth of the group forward's head loop: 2 beat 1, 3 (the default) and 4.
GROUP_FWD_STAGES = 2
# Pipeline depth of the query-cluster backward's head loop: 2 beat 1 and 3.
GROUP_BWDQ_STAGES = 2
# Key-cluster backward's [entries * 8, BLOCK_D] query tile a head: 2 map entries at D = 32 beat 4.
KV_GROUP_TILE = 512
# Gluon forward: split the heads over more programs below 8 programs per SM (16 fit at 128 registers).
GLUON_PER_SM = 8

# ------------------------------------------------------------------ other kernels
# Weighted-feature gather tile (elements): <= ~170 registers without spills on sm_90 (float64: half).
TILE_BUDGET = 4096
# num_warps of the weighted-feature, reverse-map, amax and tail kernels (TILE_BUDGET's setting).
NUM_WARPS = 4
# Fast-mode d_pe_table replicas: spread the atomics on a few hundred addresses, up to this memory.
DPE_REPLICA_BYTES = 16 << 20
# ... and at most this many replicas.
DPE_MAX_REPLICAS = 128
# Rows of one head per program of the max |dout|, max |v| kernel: 256-1024 programs at AFF shapes.
AMAX_ROWS = 512
# d_pe_table's replica-sum tiles [TAIL_PE_ROWS x TAIL_PE_BLOCK]: the fastest of a 48-setting sweep.
TAIL_PE_ROWS = 16
TAIL_PE_BLOCK = 64
# Blank partial-row sums: 4k-element tiles, enough loads in flight per program.
TAIL_TILE = 4096
# ... at least this many tiles of rows per piece,
TAIL_MIN_TILES = 4
# ... at most this many pieces (the last program of a column chunk reads them all).
TAIL_MAX_PIECES = 512
# Slots per program of the counting-sort reverse-map kernels.
KEY_BLOCK = 1024
# Deterministic token-level map: about this many programs in all,
RANGE_PROGRAMS = 1024
# ... ranges of at least this many slots,
RANGE_MIN = 1024
# ... [B, ranges, N + 1] int32 counts of at most 16 MiB,
RANGE_COUNT_WORDS = 1 << 22
# ... and the fill walks this many slots at a time with one warp.
RANGE_BLOCK = 32
# Float64 deterministic d_pe_table: each table row's sum cut into up to this many pieces,
SEGMENT_PIECES = 32
# ... while the grid stays within this many programs (mostly empty programs cost more).
SEGMENT_PROGRAMS = 1 << 18

TUNING = types.MappingProxyType(_TUNING)
TUNING_GROUP = types.MappingProxyType(_TUNING_GROUP)
TUNING_GROUP_HEADS = types.MappingProxyType(_TUNING_GROUP_HEADS)
TUNING_UNION = types.MappingProxyType(_TUNING_UNION)
TUNING_GROUP_FMA = types.MappingProxyType(_TUNING_GROUP_FMA)
TUNING_GLUON = types.MappingProxyType(_TUNING_GLUON)
TUNING_GLUON_CHUNKS = types.MappingProxyType(_TUNING_GLUON_CHUNKS)
TUNING_MAXNREG = types.MappingProxyType(_TUNING_MAXNREG)

# The tables by name (what override changes in place) and the scalar knobs.
_TABLES: dict[str, dict] = {
    "TUNING": _TUNING, "TUNING_GROUP": _TUNING_GROUP, "TUNING_GROUP_HEADS": _TUNING_GROUP_HEADS,
    "TUNING_UNION": _TUNING_UNION,
    "TUNING_GROUP_FMA": _TUNING_GROUP_FMA, "TUNING_GLUON": _TUNING_GLUON,
    "TUNING_GLUON_CHUNKS": _TUNING_GLUON_CHUNKS, "TUNING_MAXNREG": _TUNING_MAXNREG,
}
_SCALARS = frozenset(name for name, value in list(globals().items())
                     if name.isupper() and type(value) is int)


def knobs() -> list[str]:
    """The names :func:`override` takes: the tables, then the scalar knobs."""
    return [*_TABLES, *sorted(_SCALARS)]


@contextlib.contextmanager
def override(table: str | None = None, entries: Mapping | None = None, /,
             **changes) -> Iterator[None]:
    """Change knobs for the duration of a ``with`` block, then restore them exactly.

    ``override(TUNING_GROUP={("bwd_q", 4): 2}, GROUP_TILE=0)``, or for one table
    ``override("TUNING_GROUP", {("bwd_q", 4): 2})``. A table's entries are merged over the
    table as it is (keys it lacks are added); an entry whose value is None is removed
    (TUNING_MAXNREG: the compiler's choice). A scalar knob takes the value given. Every
    launch inside the block sees the changes; on exit the tables and scalars are what
    they were on entry, whatever the block did, so overrides nest. Unknown names raise
    KeyError before anything changes.
    """
    if table is not None:
        if table in changes:
            raise TypeError(f"override: {table!r} given twice")
        changes[table] = {} if entries is None else entries
    for name, value in changes.items():
        if name in _TABLES:
            if not isinstance(value, Mapping):
                raise TypeError(f"override: {name} takes a mapping of entries, not {value!r}")
        elif name not in _SCALARS:
            raise KeyError(f"override: no tuning knob {name!r}; knobs: {', '.join(knobs())}")
        elif isinstance(value, Mapping):
            raise TypeError(f"override: {name} is a scalar knob, not a table")
    module = globals()
    saved_tables = {name: dict(_TABLES[name]) for name in changes if name in _TABLES}
    saved_scalars = {name: module[name] for name in changes if name in _SCALARS}
    try:
        for name, value in changes.items():
            if name in _TABLES:
                target = _TABLES[name]
                for key, entry in value.items():
                    if entry is None:
                        target.pop(key, None)
                    else:
                        target[key] = entry
            else:
                module[name] = value
        yield
    finally:
        for name, saved in saved_tables.items():
            _TABLES[name].clear()
            _TABLES[name].update(saved)
        module.update(saved_scalars)
