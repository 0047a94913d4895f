"""The README's quick start runs as written (so it cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quick start has one python block"
    return blocks[0]


def test_quick_start_runs_and_restores_the_order():
    scope: dict = {}
    exec(compile(_quick_start(), str(README) + ":quick-start", "exec"), scope)
    feat, out, y, nb, attn = (scope[n] for n in ("feat", "out", "y", "nb", "attn"))
    assert out.shape == feat.shape and torch.isfinite(out).all()
    assert nb.lists == "aff" and attn.rel_pos_width == nb.R
    assert all(p.grad is not None for p in attn.parameters())
    # out is y in the input order: token order[b, i] of the input is row i of y.
    b, i = 1, 17
    assert torch.equal(out[b, nb.order[b, i]], y[b, i])


ROOT = README.parent
DOCS = ("README.md", "MAINTAINING.md", "CHANGELOG.md", "benchmarks/README.md",
        "benchmarks/TUNING.md", "benchmarks/results/latest/README.md",
        "benchmarks/results/runs/README.md", "benchmarks/results/experiments/README.md")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_a_short_user_document():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; history goes to CHANGELOG.md"
    headings = [line for line in lines if line.startswith("## ")]
    for needed in ("## Install", "## The two commands", "## Quick start", "## Speed"):
        assert needed in headings, needed
    assert headings.index("## Install") < headings.index("## Speed")


def test_every_relative_link_of_the_docs_resolves():
    broken = []
    for doc in DOCS:
        path = ROOT / doc
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{doc}: {target}")
    assert not broken, "\n".join(broken)
