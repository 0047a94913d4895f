"""`python -m cluster.validate` (the main job): verdict, exit status and a report even when a backend crashes."""

import json

import pytest

from cluster import testing, validate


def _run(tmp_path, *args, lists="aff"):
    rc = validate.main([*args, "--dtypes", "fp32", "--configs", "config_1_small", "--lists", lists,
                        "--out", str(tmp_path)])
    with open(tmp_path / "validate.json") as f:
        return rc, json.load(f)


def test_reference_alone_passes_and_writes_both_reports(tmp_path):
    rc, rep = _run(tmp_path, "--backends", "reference")
    assert rc == 0 and rep["verdict"] == "PASS"
    assert [(c["backend"], c["config"], c["ok"]) for c in rep["cases"]] == [("reference", "config_1_small", True)]
    assert "**Verdict: PASS**" in (tmp_path / "validate.md").read_text()


def test_a_crashing_backend_fails_the_verdict_but_the_report_is_written(tmp_path, monkeypatch):
    real = testing.run_case

    def run_case(x, backend, **kw):
        if backend == "cuda":
            raise RuntimeError("simulated kernel crash")
        return real(x, backend=backend, **kw)

    # Pretend the cuda backend is present so that both the per-case run and the pairwise
    # comparison call it and crash.
    monkeypatch.setattr(validate, "_supported", lambda b, d, t: None)
    monkeypatch.setattr(testing, "run_case", run_case)
    rc, rep = _run(tmp_path, "--backends", "reference,cuda")
    assert rc == 1 and rep["verdict"] == "FAIL"
    crashed = [c for c in rep["cases"] if c["backend"] == "cuda"]
    assert len(crashed) == 1 and not crashed[0]["ok"]
    assert "simulated kernel crash" in crashed[0]["error"]
    assert all("cuda" not in p["pair"] for p in rep["pairs"])


def test_both_lists_and_long_dtype_names(tmp_path):
    """AFF's lists and the shared lists, each a row named by its lists; float32 is fp32."""
    rc = validate.main(["--backends", "reference", "--dtypes", "float32", "--configs",
                        "config_1_small,ragged_n61_d12_m24", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "validate.json").read_text())
    assert rc == 0
    # Shared lists are extra cases at the suite configurations, not at the ragged ones.
    assert sorted((c["config"], c["lists"]) for c in rep["cases"]) == [
        ("config_1_small", "aff"), ("config_1_small", "cluster"), ("ragged_n61_d12_m24", "aff")]
    assert "| reference | - | float32 | config_1_small | cluster |" in (tmp_path / "validate.md").read_text()
    for bad in (["--lists", "token"], ["--dtypes", "fp8"]):
        with pytest.raises(SystemExit):
            validate.main(["--backends", "reference", *bad, "--out", str(tmp_path)])


def test_unknown_config_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        validate.main(["--configs", "no_such_config", "--out", str(tmp_path)])


@pytest.mark.parametrize("bad,named", [(["--backends", "reference,foo"], "--backends"),
                                       (["--configs", "config_1_small,nope"], "unknown nope")])
def test_unknown_names_are_usage_errors_naming_the_option(tmp_path, capsys, bad, named):
    with pytest.raises(SystemExit) as e:
        validate.main([*bad, "--out", str(tmp_path)])
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "validate.json").exists()


def test_help_lists_the_choices_of_every_option(capsys):
    with pytest.raises(SystemExit):
        validate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for choice in ("reference", "triton", "cuda", "float32", "bf16", "config_1_small",
                   "ragged_m5_c3", "aff", "cluster", "2024", "reports"):
        assert choice in text, choice
