"""The mutation catalogue cannot rot: each planted bug's original text occurs exactly once
in its file, its replacement differs, and its test paths exist (fast, no test run)."""

from __future__ import annotations

import os

import pytest

from .catalogue import CATALOGUE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_catalogue_ids_unique_and_large_enough():
    ids = [m.id for m in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len([m for m in CATALOGUE if not m.equivalent]) >= 25
    modules = {m.module for m in CATALOGUE}
    for part in ("reference.py", "ops.py", "nn.py", "neighbors.py", "testing.py",
                 "triton_kernels/"):
        assert any(part in mod for mod in modules), part


@pytest.mark.parametrize("m", CATALOGUE, ids=lambda m: m.id)
def test_original_occurs_exactly_once(m):
    with open(os.path.join(ROOT, m.module)) as f:
        text = f.read()
    assert text.count(m.original) == 1, f"{m.id}: {text.count(m.original)} matches in {m.module}"
    assert m.replacement != m.original
    assert m.what and "\n" not in m.what
    paths = [t for t in m.tests if not t.startswith("-") and t.endswith(".py")]
    assert paths, m.id
    for p in paths:
        assert os.path.exists(os.path.join(ROOT, p)), p
