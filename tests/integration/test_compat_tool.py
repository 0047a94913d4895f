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


def _build(ok, failing=()):
    return {"ok": ok, "arch": ["90"], "summary": "build_check: ...", "failing": list(failing)}


def test_table_shows_whether_the_kernels_build(tmp_path):
    good, bad = _report("torchA-tritonA"), _report("torchB-tritonB")
    good["build"] = _build(True)
    bad["build"], bad["ok"] = _build(False, ["_attn_fwd_kernel"]), False
    _write(tmp_path, "a", good)
    _write(tmp_path, "b", bad)
    compat.cmd_table(str(tmp_path))
    rows = [line for line in (tmp_path / "README.md").read_text().splitlines()
            if line.startswith("| torch")]
    assert "| yes (sm_90) |" in rows[0]
    assert "**no** (sm_90: _attn_fwd_kernel)" in rows[1]


def test_diff_flags_kernels_that_stop_building(tmp_path, capsys):
    old, new = _report("old"), _report("new")
    old["build"], new["build"] = _build(True), _build(False, ["_wf_fwd_kernel"])
    assert compat.cmd_diff(_write(tmp_path, "o", old), _write(tmp_path, "n", new), 0.5) == 1
    out = capsys.readouterr().out
    assert "REGRESSION: kernels no longer build for sm_90: _wf_fwd_kernel" in out


def test_build_check_output_is_parsed(monkeypatch):
    out = ("build_check: 3 launches of 2 kernels -> front end, sm_90\n"
           "  ok      0.1 s  _a_kernel {'num_warps': 4}\n"
           "  FAIL  _b_kernel {'num_warps': 1}\nCompilationError: ...\n"
           "  NOT REACHED  _c_kernel: no recorded launch builds it\n"
           "build_check: 1 failed, 1 kernels not reached (2 s)\n")

    class Done:
        returncode, stdout, stderr = 1, out, ""

    seen = []
    monkeypatch.setattr(compat.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Done())
    res = compat._build_check(["90", "80"])
    assert seen[0][1:] == ["-m", "cluster.build_check", "--arch", "90", "80"]
    assert res["ok"] is False and res["failing"] == ["_b_kernel", "_c_kernel"]
    assert res["summary"].startswith("build_check: 1 failed") and "CompilationError" in res["tail"]


def _pair(torch_v, triton_v, **kw):
    rep = _report(f"torch{torch_v}-triton{triton_v}", **kw)
    rep.update(torch_requested=torch_v, triton_requested=triton_v, commit="abc")
    return rep


def test_upgrade_verdicts_pick_the_newest_torch_and_the_newest_triton(tmp_path):
    # Version order, not string order: 2.15 after 2.9, 3.10 after 3.9.
    for t, tr in [("2.13.0", "3.6.0"), ("2.13.0", "3.10.0"), ("2.9.1", "3.5.1"),
                  ("2.15.0", "3.9.0")]:
        _write(tmp_path, f"{t}-{tr}", _pair(t, tr, failing=["t::x"] if tr == "3.10.0" else ()))
    ups = compat.upgrades(compat._reports(str(tmp_path)), "torch2.13.0-triton3.6.0")
    assert ups == {"torch": "torch2.15.0-triton3.9.0", "triton": "torch2.13.0-triton3.10.0"}
    compat.cmd_table(str(tmp_path), "torch2.13.0-triton3.6.0")
    md = (tmp_path / "README.md").read_text()
    assert "| newest torch | torch2.15.0-triton3.9.0 | OK to upgrade |" in md
    assert "| newest triton | torch2.13.0-triton3.10.0 | **REGRESSION** |" in md
    assert "NEWLY FAILING: t::x" in (tmp_path / "upgrade-triton.txt").read_text()
    assert "VERDICT: OK to upgrade" in (tmp_path / "upgrade-torch.txt").read_text()


def test_readme_states_the_committed_upgrade_verdicts():
    # The README's compat section quotes reports/compat's verdicts; a re-run that changes
    # them must change the README too.
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    reps = compat._reports(os.path.join(root, "reports", "compat"))
    readme = open(os.path.join(root, "README.md")).read()
    base = "torch2.13.0-triton3.6.0"
    for what, pair in compat.upgrades(reps, base).items():
        _lines, bad = compat.diff_lines(reps[base], reps[pair])
        verdict = "REGRESSION" if bad else "OK to upgrade"
        assert f"| newest {what} | {pair} | {verdict}" in readme, (what, pair, verdict)
