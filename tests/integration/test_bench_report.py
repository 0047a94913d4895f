"""The benchmark's report formatting, on synthetic records: the GPU-time cells and log
fields are filled only on a GPU, which the CPU smoke never reaches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench  # noqa: E402

META = {"device": "Test GPU", "date": "2026-11-29T00:00:00+00:00", "torch": "2.x", "triton": "3.x",
        "cuda": "13.0", "python": "3.11", "git_commit": "0123456789abcdef", "git_dirty": False,
        "copy_bandwidth_gbps": 4000.0}


def _records(gpu_ms):
    dims = bench.SHAPES["affmae_stage1"]
    recs = []
    for mode in bench.MODES:
        rec = bench.base_record("shape", "affmae_stage1", dims, "triton", "bfloat16", mode)
        floor_ms = rec["floor_bytes"] / 4e12 * 1e3
        rec.update(status="ok", time_ms=1.5, reps=50, floor_ms=floor_ms, gbps=1.0,
                   x_floor=1.5 / floor_ms, first_call_s=0.1)
        if gpu_ms is not None:
            rec.update(gpu_ms=gpu_ms, gpu_x_floor=gpu_ms / floor_ms)
        recs.append(rec)
    return recs


def test_markdown_has_gpu_time_and_its_floor_ratio():
    recs = _records(0.5)
    table = bench.to_markdown(META, recs)
    header = next(line for line in table.splitlines() if line.startswith("| backend"))
    row = next(line for line in table.splitlines() if line.startswith("| triton |"))
    assert "fwd GPU ms (x floor)" in header and "fwd+bwd GPU ms (x floor)" in header
    assert header.count("|") == row.count("|")
    ratio = recs[0]["gpu_x_floor"]
    assert f"0.500 ({ratio:.2f})" in row


def test_markdown_and_log_without_gpu_time(capsys):
    recs = _records(None)
    lines = bench.to_markdown(META, recs).splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| backend")).split("|")]
    row = [c.strip() for c in next(x for x in lines if x.startswith("| triton |")).split("|")]
    for col in ("fwd GPU ms (x floor)", "fwd+bwd GPU ms (x floor)"):
        assert row[header.index(col)] == "–"
    assert row[header.index("fwd+bwd ms")] == "1.500"
    bench.progress(recs[0])
    assert "GPU" not in capsys.readouterr().out
    gpu = _records(0.25)[1]
    bench.progress(gpu)
    assert f"GPU 0.250 ms x{gpu['gpu_x_floor']:.2f}" in capsys.readouterr().out


def _rounds_ctx(rounds):
    """time_rounds' context on the CPU: ``rounds`` rounds, 2 reps in all per case."""
    import types

    import torch

    opt = types.SimpleNamespace(rounds=rounds, smoke_reps=2)
    return {"device": torch.device("cpu"), "opt": opt, "bandwidth": 1e10}


def _pending(kind, shape, dims, name, dtype, mode, step):
    rec = bench.base_record(kind, shape, dims, name, dtype, mode)
    rec["status"] = "pending"
    return (rec, step, [], None)


def test_rounds_interleave_the_cases():
    # --rounds: the pending cases of one shape and dtype take turns, round by round, and a
    # case's time is the median of its rounds' medians.
    calls = []
    timers = [_pending("shape", "affmae_stage1", bench.SHAPES["affmae_stage1"], name, "float16",
                       "fwd", lambda name=name: calls.append(name)) for name in ("triton", "cuda")]
    recs = [t[0] for t in timers]
    bench.time_rounds(_rounds_ctx(3), timers)
    assert calls == ["triton", "cuda"] * 3  # one rep per round (ceil(2 / 3))
    for rec in recs:
        assert rec["status"] == "ok" and len(rec["round_ms"]) == 3 and rec["reps"] == 3
        assert abs(rec["time_ms"] - sorted(rec["round_ms"])[1]) < 1e-3
    assert timers == []


def test_rounds_oom_stops_the_sweep():
    # A case that runs out of memory while timed in rounds is recorded as "oom" (the others
    # keep their times), and the sweep's larger N then skip that backend and mode.
    dims = (8, 4096, 64, 2, 48)

    def oom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    timers = [_pending("sweep", "sweep_N4096", dims, name, "float16", "fwd+bwd", step)
              for name, step in (("triton", lambda: None), ("reference", oom))]
    recs = [t[0] for t in timers]
    bench.time_rounds(_rounds_ctx(2), timers)
    assert [r["status"] for r in recs] == ["ok", "oom"]
    oom_at = {}
    for rec in recs:
        bench._note_oom(rec, oom_at)
    assert oom_at == {("reference", "aff", "fwd+bwd"): 4096}


def test_graph_step_attention_takes_the_leaves_it_is_given():
    # graph_step's eager and compiled steps share one builder: the op must run on the
    # leaves passed in (a compiled graph's inputs), not on the Inputs' own tensors.
    import os

    import torch
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    import graph_step

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = bench.build_inputs(bench.SMOKE_SHAPE[1], dev).cast(torch.float32, True)
    leaves = [t.detach().clone().requires_grad_() for t in x.leaves()]
    graph_step.attention(x, False)(*leaves).backward(x.dout)
    assert all(t.grad is not None for t in leaves)
    assert all(t.grad is None for t in x.leaves())


def _lists_records():
    recs = []
    for lists in bench.LISTS:
        for backend in ("triton", "flex"):
            for mode in bench.MODES:
                rec = bench.base_record("shape", "affmae_stage1", bench.SHAPES["affmae_stage1"],
                                        backend, "bfloat16", mode, lists)
                rec.update(status="ok", time_ms=1.0 if lists == "aff" else 2.0, reps=5, gbps=1.0,
                           x_floor=3.0, first_call_s=0.1)
                if backend == "flex":
                    rec.update(block_mask_method="kv-blocks", block_size=64, block_mask_s=0.5,
                               block_mask_warm_s=0.01, block_sparsity_pct=75.0,
                               block_tiles={"partial": 1, "full": 0, "all": 4}, masks_mib=33.7,
                               compiled=True)
                recs.append(rec)
    return recs


def test_records_and_markdown_name_the_lists():
    recs = _lists_records()
    assert {r["lists"] for r in recs} == {"aff", "cluster"}
    assert bench.base_record("shape", "s", bench.SMOKE_SHAPE[1], "triton", "float32", "fwd")["lists"] == "aff"
    lines = bench.to_markdown(META, recs).splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| backend")).split("|")]
    assert header[1:4] == ["backend", "lists", "dtype"]
    rows = {tuple(c.strip() for c in x.split("|")[1:4]): [c.strip() for c in x.split("|")]
            for x in lines if x.startswith(("| triton |", "| flex |"))}
    assert set(rows) == {(b, li, "bfloat16") for b in ("triton", "flex") for li in ("aff", "cluster")}
    for (_, li, _), row in rows.items():  # each row reads its own lists' records
        assert row[header.index("fwd ms")] == ("1.000" if li == "aff" else "2.000")
    flex = [x for x in lines if x.startswith("- flex (")]
    assert any("(aff)" in x and "kv-blocks 64x64" in x and "75.0% of tiles skipped" in x for x in flex)
    assert bench.row_label(recs[0]) == "triton (aff)" and bench.row_label(recs[-1]) == "flex (cluster)"
    old = _records(None)  # records of a run before the lists were named still format
    for r in old:
        del r["lists"]
    assert "| triton | – | bfloat16 |" in bench.to_markdown(META, old)


def test_lists_option(capsys):
    opt = bench.parse_args([])
    assert opt.lists == ["aff", "cluster"] and "flex" in opt.backends
    assert bench.parse_args(["--lists", "cluster"]).lists == ["cluster"]
    for bad, says in (("aff,knn", "unknown lists ['knn']"), (",", "at least one")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--lists", bad])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--flex-block-size", "12"])


def test_smoke_runs_both_lists_and_the_flex_peer(tmp_path):
    # The CPU smoke with the reference and the flex peer only (both fast): every record
    # names its lists, the flex forward is checked against float64, its backward skipped.
    import json

    rc = bench.main(["--smoke", "--device", "cpu", "--backends", "reference,flex",
                     "--smoke-reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("*-smoke.json")
    assert js.with_suffix(".md").exists()
    cases = json.loads(js.read_text())["cases"]
    assert [(r["lists"], r["backend"], r["mode"]) for r in cases] == [
        (li, b, m) for li in ("aff", "cluster") for b in ("reference", "flex") for m in bench.MODES]
    for r in cases:
        if r["backend"] == "flex" and r["mode"] == "fwd":
            assert r["status"] == "ok" and r["smoke_check"] == "ok" and r["max_abs_err_vs_fp64"] < 1e-5
            assert r["block_mask_method"] == "kv-blocks" and r["block_mask_s"] <= r["first_call_s"]
        elif r["backend"] == "flex":
            assert r["status"] == "skipped" and "backward on the CPU" in r["reason"]
        else:
            assert r["status"] == "ok"
    md = js.with_suffix(".md").read_text()
    assert "| flex | aff | float32 |" in md and "| reference | cluster | float32 |" in md


def test_latest_gets_a_copy_of_the_run_named_by_the_gpu_kind(tmp_path):
    run = tmp_path / "runs" / "test-gpu-2026-12-03-r1"
    run.mkdir(parents=True)
    for ext, body in ((".json", "{}"), (".md", "# table")):
        (run / f"test-gpu-2026-12-03-r1{ext}").write_text(body)
    copied = bench.copy_latest(run, "test-gpu-2026-12-03-r1", "test-gpu", tmp_path / "latest")
    assert sorted(p.name for p in copied) == ["test-gpu.json", "test-gpu.md"]  # no plot: skipped
    assert (tmp_path / "latest" / "test-gpu.md").read_text() == "# table"


def test_default_output_is_a_folder_under_runs():
    assert bench.RESULTS.name == "results" and (bench.RESULTS / "runs").is_dir()
    assert (bench.RESULTS / "latest").is_dir() and (bench.RESULTS / "experiments").is_dir()
