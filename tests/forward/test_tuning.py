"""The triton backend's knobs (cluster.triton_kernels.tuning) and the package's layout.

tuning.override is how tests, build_check and the tuners change a knob; these check that
it changes what the host code reads, restores it exactly, and refuses names it does not
know before touching anything. The layout checks keep the package legible: no file
grows back into a monolith, and every knob has its row of measurements in
benchmarks/TUNING.md.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from .. import _triton

pytestmark = _triton.PYTESTMARK

if _triton.WHY is None:
    from cluster.triton_kernels import common, tuning

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "cluster" / "triton_kernels"


def _snapshot():
    return ({name: dict(getattr(tuning, name)) for name in tuning._TABLES},
            {name: getattr(tuning, name) for name in tuning._SCALARS})


def test_override_changes_what_launches_read_and_restores():
    import torch
    before = _snapshot()
    assert common._maxnreg("bwd_q", torch.float32) == 128
    with tuning.override(TUNING={("fwd", 4): (4, 8, 256, 1)}, GROUP_TILE=0,
                         TUNING_MAXNREG={("bwd_q", 4): None, ("new", 2): 64}):
        assert tuning.TUNING["fwd", 4] == (4, 8, 256, 1)
        assert tuning.GROUP_TILE == 0
        assert ("bwd_q", 4) not in tuning.TUNING_MAXNREG
        assert tuning.TUNING_MAXNREG["new", 2] == 64
        # the host code reads through the module at call time
        assert common._group_blocks(32, 64, torch.float16) is None
        assert common._maxnreg("bwd_q", torch.float32) is None
        assert common._maxnreg("new", torch.bfloat16) == 64
        with tuning.override("TUNING", {("fwd", 4): (2, 8, 128, 1)}):
            assert tuning.TUNING["fwd", 4] == (2, 8, 128, 1)
        assert tuning.TUNING["fwd", 4] == (4, 8, 256, 1)
    assert _snapshot() == before
    assert common._maxnreg("bwd_q", torch.float32) == 128
    assert common._group_blocks(32, 64, torch.float16) is not None


def test_override_restores_after_an_exception():
    before = _snapshot()
    with pytest.raises(RuntimeError, match="inside"):
        with tuning.override(AMAX_ROWS=7, TUNING_GROUP={("fwd", 2): 0}):
            raise RuntimeError("inside")
    assert _snapshot() == before


@pytest.mark.parametrize("kwargs,error,match", [
    ({"NO_SUCH_KNOB": 1}, KeyError, "no tuning knob 'NO_SUCH_KNOB'"),
    ({"TUNING": 3}, TypeError, "takes a mapping"),
    ({"GROUP_TILE": {"a": 1}}, TypeError, "scalar knob"),
])
def test_override_rejects_bad_names_before_changing_anything(kwargs, error, match):
    before = _snapshot()
    with pytest.raises(error, match=match):
        with tuning.override(AMAX_ROWS=3, **kwargs):
            pass
    assert _snapshot() == before


def test_tables_are_read_only():
    with pytest.raises(TypeError):
        tuning.TUNING["fwd", 4] = (1, 1, 1, 1)


def test_every_knob_has_a_row_in_tuning_md():
    text = (ROOT / "benchmarks" / "TUNING.md").read_text()
    missing = [name for name in tuning.knobs() if f"`{name}" not in text]
    assert not missing, f"knobs without a row in benchmarks/TUNING.md: {missing}"


def test_package_files_stay_small_and_say_what_they_hold():
    sizes = {}
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        sizes[path.name] = text.count("\n")
        assert re.match(r'\s*"""\S', text), f"{path.name} does not start with what it holds"
    assert not (PACKAGE.parent / "triton_kernels.py").exists()
    assert max(sizes.values()) <= 600, sizes
