"""The compatibility-report tool: table rows for every pair (failed installs too) and the diff verdict."""

import json

import pytest

from cluster import compat


def _report(pair, failing=(), errors=None, install_ok=True, passed=10):
    tests = {"passed": passed, "failed": len(failing), "skipped": 1, "failing": list(failing)}
    return {"pair": pair, "install_ok": install_ok, "import_ok": install_ok, "extension": "no GPU",
            "tests": tests if install_ok else None, "errors": errors or {}, "seconds": 1.0,
            "ok": install_ok and not failing}


def _write(tmp_path, name, rep):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(rep))
    return str(p)


def test_table_has_a_row_per_pair_including_failed_install(tmp_path):
    _write(tmp_path, "a", _report("torchA-tritonA", errors={"triton|float32|c1": 1e-7}))
    _write(tmp_path, "b", _report("torchB-tritonB", install_ok=False))
    assert compat.cmd_table(str(tmp_path)) == 0
    md = (tmp_path / "README.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| torch")]
    assert len(rows) == 2
    assert "PASS" in rows[0] and "1.0e-07" in rows[0]
    assert "**no**" in rows[1] and "**FAIL**" in rows[1]


def test_diff_identical_reports_is_ok(tmp_path, capsys):
    rep = _report("p", errors={"triton|float32|c1": 1e-7})
    a, b = _write(tmp_path, "a", rep), _write(tmp_path, "b", rep)
    assert compat.cmd_diff(a, b, 0.5) == 0
    assert "VERDICT: OK" in capsys.readouterr().out


@pytest.mark.parametrize("change, needle", [
    ({"failing": ["tests/x.py::test_y"]}, "NEWLY FAILING: tests/x.py::test_y"),
    ({"errors": {"triton|float32|c1": 5e-5}}, "DRIFT UP triton|float32|c1"),
    ({"errors": {}}, "NEWLY MISSING: triton|float32|c1"),
    ({"install_ok": False}, "REGRESSION: install_ok"),
])
def test_diff_flags_each_kind_of_regression(tmp_path, capsys, change, needle):
    old = _report("old", errors={"triton|float32|c1": 1e-7})
    new = _report("new", **{"errors": {"triton|float32|c1": 1e-7}, **change})
    assert compat.cmd_diff(_write(tmp_path, "o", old), _write(tmp_path, "n", new), 0.5) == 1
    out = capsys.readouterr().out
    assert needle in out and "VERDICT: REGRESSION" in out


def test_diff_lists_newly_skipped_tests_without_judging_them(tmp_path, capsys):
    old = _report("old")
    new = _report("new")
    old["tests"]["skipped_ids"] = {"t::a": "no GPU"}
    new["tests"]["skipped_ids"] = {"t::a": "no GPU", "t::b": "needs a CPU build"}
    assert compat.cmd_diff(_write(tmp_path, "o", old), _write(tmp_path, "n", new), 0.5) == 0
    out = capsys.readouterr().out
    assert "newly skipped: t::b (needs a CPU build)" in out and "t::a" not in out


def test_diff_ignores_run_to_run_jitter_and_improvements(tmp_path, capsys):
    old = _report("old", errors={"ref|float32|c1": 1.0e-5, "ref|float32|c2": 1.0e-4})
    new = _report("new", errors={"ref|float32|c1": 1.2e-5, "ref|float32|c2": 2.0e-5})
    assert compat.cmd_diff(_write(tmp_path, "o", old), _write(tmp_path, "n", new), 0.5) == 0
    out = capsys.readouterr().out
    assert "c1" not in out and "drift down ref|float32|c2" in out and "VERDICT: OK" in out
