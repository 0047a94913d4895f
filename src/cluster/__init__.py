"""cluster-attention: cluster attention for AutoFocusFormer-style point/cluster backbones.

``cluster.ops.cluster_attention`` is the op (backends: reference, triton, cuda);
``cluster.ClusterAttention`` the AFF-compatible module; ``cluster.neighbors`` builds the
op's inputs from token positions.
"""

from .ops import (
    BackendUnavailableError,
    available_backends,
    cluster_attention,
    weighted_features,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ClusterAttention",
    "available_backends",
    "cluster_attention",
    "weighted_features",
]


def __getattr__(name):
    # The module pulls in the neighbourhood code; keep `import cluster` light.
    if name == "ClusterAttention":
        from .nn import ClusterAttention

        return ClusterAttention
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
