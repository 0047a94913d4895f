"""Sharding and per-worker devices: deterministic, complete, disjoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cluster import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_shards_partition_ids(k):
    ids = [f"tests/x.py::test_{i}[p{i % 7}]" for i in range(500)]
    parts = [testing.split_shard(ids, i, k)[0] for i in range(1, k + 1)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert sum(len(p) for p in parts) == len(ids)
    if k > 1:
        assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("spec", ["0/2", "3/2", "a/b", "1", "1/0"])
def test_bad_shard_spec(spec):
    with pytest.raises(ValueError, match="--shard"):
        testing.parse_shard(spec)


@pytest.mark.parametrize("n_gpus", [1, 2, 4, 8])
def test_worker_to_device_mapping(n_gpus):
    """With W = n_gpus xdist workers every worker gets its own GPU; more workers wrap around."""
    devs = [testing.worker_device(w, n_gpus) for w in range(n_gpus)]
    assert [d.index for d in devs] == list(range(n_gpus))
    assert all(d.type == "cuda" for d in devs)
    assert testing.worker_device(n_gpus, n_gpus).index == 0
    assert testing.worker_device(None, n_gpus) == torch.device("cuda", 0)
    assert testing.worker_device(3, 0) == torch.device("cpu")


def _collect(*args):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           "tests/integration/test_validation.py", "tests/integration/test_shards.py", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if "::" in line}


def test_sharded_collection_adds_up_to_full_run():
    full = _collect()
    assert len(full) > 20
    parts = [_collect("--shard", f"{i}/3") for i in (1, 2, 3)]
    assert set().union(*parts) == full
    assert sum(len(p) for p in parts) == len(full)
