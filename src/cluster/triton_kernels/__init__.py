"""Fused Triton backend of :mod:`cluster.ops`: cluster attention and weighted features.

Cluster attention is a batched gather-GEMV (every query may have its own key list), so the
per-query kernels use elementwise-product-and-reduce tiles ``[rows, slots, BLOCK_D]``
instead of ``tl.dot``: exact float32 (no tf32), the same code for float64. With shared
lists (``lists="cluster"``) the 8 tokens of a cluster share one key list made of whole key
clusters. The group kernels check that at run time and then use ``tl.dot``: the group
forward and the query-cluster backward (one program per 8 queries) gather the group's
keys and values once. The key-cluster backward (one program per 8 keys) walks a
group-level reverse map of (query group, union entry) pairs, each a dense 8 x 8 block of
scores, built from the union map of union.py: per group of 8 queries, the union of the key
clusters its queries name and the slot block each query names each one in. That covers
AFF's own per-token lists (whole key clusters, each query its own) as well as shared ones.
Each group kernel takes only the groups (key side: the batches) that have its layout, and
the per-query / per-key kernel launched after it takes the rest, decided on the device: on
AFF's per-token lists the query side goes to the per-query kernel, the key
side to the key-cluster kernel. In 16-bit a forward with grad takes the union forward
(one dense tile per chunk of a group's union) on the map it builds for the backward and
hands over; under no_grad it keeps the per-query kernel (a map for the forward alone costs
what the union kernel saves). The union query side stays off (``TUNING_UNION``;
benchmarks/TUNING.md). ``tuning.TUNING_GROUP`` (and
``TUNING_GROUP_HEADS``) say where the group kernels are used on the GPU (16-bit). The
float32 forward takes the Gluon kernel of gluon_forward.py (``TUNING_GLUON``; D <= 64,
lists up to 256 slots, Triton 3.6-3.8) and otherwise the group kernel's FMA path
(``TUNING_GROUP_FMA``).
``TUNING_MAXNREG`` caps the registers of some kernels (launch options only).

Determinism: the forward, dq and the blank gradients never use atomics, so they are
bitwise reproducible in both modes. With ``deterministic`` False the backward takes two
shortcuts whose summation order follows the GPU's scheduling: the position-bias table
gradient is summed with float atomics, and the token-level reverse neighbour map (which
queries name each key, walked by the per-key kernel) is built by an atomic counting sort,
so dk / dv add the same terms in a run-dependent order. ``deterministic=True`` sums the
table gradient in int64 fixed point (integer atomics: exact, so any order gives the same
bits; float64 sorts and sums segments in a fixed order instead) and builds both reverse
maps in slot order: the group-level one with a stable sort, the token-level one (for the
batches the group-level map does not serve; none on AFF's inputs, and the kernels learn
which on the device: no sync) by a counting sort in slot ranges that ranks equal keys by
slot. The fast mode builds the group-level map by a counting sort too.

The kernels read ``TRITON_INTERPRET`` when they are decorated, i.e. at import: set it
before importing this package to run them on the CPU interpreter.

Layout: one file per pass, each kernel beside the host code that launches it, so that
a change to one pass is read and reviewed in one file. Every file starts with what it
holds; a reader starts at ``autograd.py`` (the entry points), then ``forward.py`` and
``backward.py`` (the backward's plan, step by step), which lead to the rest:

* ``autograd.py``: ``cluster_attention`` / ``weighted_features``, the custom ops, their
  fake implementations and the eager autograd Function.
* ``forward.py``: the per-query and group forward kernels, the Gluon dispatch,
  ``_attn_forward``; ``gluon_forward.py``: the Gluon float32 forward kernel itself.
* ``backward.py``: ``_attn_backward``, the backward's plan and buffers;
  ``backward_q.py``: the query side (dq, delta, blank partials, d_pe_table terms);
  ``backward_kv.py``: the key side (dk, dv); ``backward_tail.py``: max |dout| / |v|, the
  tail reductions of d_pe_table and the blank gradients, float64's segment sum;
  ``reverse_map.py``: every reverse neighbour map, token-level and group-level;
  ``union.py``: the union map of AFF's per-token lists (each cluster of queries' union of
  key clusters), which the key-cluster backward walks and the union kernels read.
* ``weighted.py``: the weighted-feature kernels and their launches.
* ``common.py``: host helpers and the ``@triton.jit`` building blocks the passes share.
* ``launch.py``: version gates, ``_INTERPRET``, the launcher ``_Launch``,
  ``unavailable_reason``. ``tuning.py``: every measured knob, one line each, and
  ``tuning.override``; the measurements are in benchmarks/TUNING.md.

Names that tests and tools switch have one home and are read from it at call time:
``launch._INTERPRET``, ``launch._TRITON_RELEASE``, ``launch._driver``, ``launch._hooked``,
``launch._LAUNCH_KEYS``, ``launch._Launch.run`` (build_check records launches through
it), ``common._head_groups``, ``common._SM_COUNT``, ``forward._attn_fwd_gluon_kernel``;
the knobs only through ``tuning.override``.
"""

from __future__ import annotations

from . import (  # noqa: F401  (the submodules, as attributes of the package)
    autograd,
    backward,
    backward_kv,
    backward_q,
    backward_tail,
    common,
    forward,
    gluon_forward,
    launch,
    reverse_map,
    tuning,
    union,
    weighted,
)
from .autograd import cluster_attention, weighted_features
from .launch import MAX_HEAD_DIM, unavailable_reason

__all__ = [
    "MAX_HEAD_DIM",
    "unavailable_reason",
    "cluster_attention",
    "weighted_features",
]

# The modules that hold kernels (gluon_forward's raw Gluon kernel launches through
# forward._attn_fwd_gluon_kernel).
_KERNEL_MODULES = (forward, backward_q, backward_kv, backward_tail, reverse_map, union, weighted)


def kernels() -> dict[str, launch._Launch]:
    """Every kernel of the backend by name, each a :class:`launch._Launch` (the Gluon
    forward only on a Triton that builds it): what build_check records and compiles."""
    found: dict[str, launch._Launch] = {}
    for module in _KERNEL_MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, launch._Launch):
                found.setdefault(name, obj)
    return found
